"""Trainable tasks by name: each pairs a frozen config class with a :class:`~animeai.tasks.base.Task`."""

from __future__ import annotations

from animeai.config import DetectorConfig, DistillConfig, FusionConfig, GeneratorConfig
from animeai.tasks.base import Task
from animeai.tasks.detector import DetectorTask
from animeai.tasks.distill import DistillTask
from animeai.tasks.fusion import FusionTask
from animeai.tasks.generator import GeneratorTask

TASKS: dict[str, tuple[type, type[Task]]] = {
    "detector": (DetectorConfig, DetectorTask),
    "generator": (GeneratorConfig, GeneratorTask),
    "distill": (DistillConfig, DistillTask),
    "fusion": (FusionConfig, FusionTask),
}


def get_task(name: str) -> tuple[type, type[Task]]:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}'; available: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Task", "get_task"]
