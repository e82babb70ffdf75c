"""The task interface: what a capability hands to the one training loop in :mod:`animeai.engine`.

A task owns its models, optimizers, schedulers and data; the engine owns epochs, devices, mixed
precision, gradient accumulation, progress, evaluation cadence, best/resume checkpoints and the
metrics callback. The contract:

1. ``setup(accelerator)`` builds ``self.models``, ``self.optimizers``, ``self.train_loader`` and
   ``self.val_loader`` (plain PyTorch objects, not yet prepared).
2. The engine calls ``accelerator.prepare`` on all of them and writes the prepared objects back.
3. ``configure_schedulers(total_steps)`` builds LR schedulers once the per-process step count is known.
4. Per batch, ``training_step(batch)`` returns ``dict(loss=..., **logs)``. With
   ``manual_optimization = False`` the engine runs backward, clipping and the optimizer step of the
   single optimizer; a task with several optimizers (a GAN's alternating D/G steps) sets it to
   ``True`` and calls ``self.accelerator.backward`` / ``opt.step()`` itself (accumulation still works:
   prepared optimizers skip their step until gradients sync).
5. ``evaluate()`` returns float metrics (every process runs it; use ``gather_for_metrics``);
   ``monitor`` names the metric that picks the best model.
6. ``export()`` returns ``(tensors, metadata)`` for the model file of the best epoch.
7. ``run_files()`` returns ``{file name: text}`` written into the run folder once the run starts (e.g. the
   detector's ``split.json``); a task never writes into the run folder from ``setup``.
8. ``resume_safe_keys`` names task-specific config keys that a resumed run may change (besides the engine's
   :data:`animeai.runs.RESUME_SAFE_KEYS`).
9. ``prepare_data(cfg)`` (a class method, optional) runs once before the processes of a multi-process run start
   (the Ray driver calls it): e.g. validate the data into its manifest once, not once per worker.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class Task:
    name: str = "task"
    monitor: str = "val_loss"
    monitor_mode: str = "min"  # "min" or "max"
    manual_optimization: bool = False
    resume_safe_keys: frozenset[str] = frozenset()

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.accelerator = None
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.train_loader = None
        self.val_loader = None

    @classmethod
    def prepare_data(cls, cfg: Any) -> None:
        """Work done once per run before its processes start (nothing by default)."""

    # --- built by the task -------------------------------------------------------------------
    def setup(self, accelerator) -> None:
        raise NotImplementedError

    def configure_schedulers(self, total_steps: int) -> dict[str, Any]:
        return {}

    def training_step(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {}

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def run_files(self) -> dict[str, str]:
        return {}

    # --- shared helpers ----------------------------------------------------------------------
    def batch_size_of(self, batch) -> int:
        first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values()))
        return int(first.shape[0])

    def train_mode(self, mode: bool = True) -> None:
        for m in self.models.values():
            m.train(mode)

    def unwrap(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.models[name])
