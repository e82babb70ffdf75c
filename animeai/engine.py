"""The one training loop: ``train(cfg, task, accelerator)`` on Hugging Face Accelerate.

The same function runs from the local CLI, in a notebook, and inside every Ray Train worker. It
owns epochs, devices, mixed precision, gradient accumulation, progress output (main process only),
evaluation each epoch, the best model file, resumable state and a metrics callback.

Run folder (``cfg.run.run_dir``)::

    config.yaml      the resolved config of the run
    metrics.jsonl    one JSON line per epoch
    state/           accelerate state (weights, optimizer, RNG) + trainer_state.json, after each epoch
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from animeai.checkpoint import save_model_file
from animeai.config import save_config, to_dict
from animeai.tasks.base import Task

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"

# callback(metrics, state_dir, task) runs on every process after each epoch, once the resumable state is saved
# (Ray reports from it). ``task.accelerator`` and ``task.models`` are available to it.
MetricsCallback = Callable[[dict[str, Any], Path, Task], None]


@dataclass
class TrainerState:
    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps
    best_metric: float | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    planned_epochs: int | None = None


@dataclass
class TrainResult:
    model_path: Path
    run_dir: Path
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]


def resolve_mixed_precision(value: str, cpu: bool = False) -> str:
    if value != "auto":
        return value
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(run_cfg, **kwargs) -> Accelerator:
    """The Accelerator a config asks for (mixed precision, accumulation, CPU)."""
    return Accelerator(
        mixed_precision=resolve_mixed_precision(run_cfg.mixed_precision, run_cfg.cpu),
        gradient_accumulation_steps=run_cfg.grad_accum,
        cpu=run_cfg.cpu,
        **kwargs,
    )


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


def _save_state(accelerator: Accelerator, run_dir: Path, state: TrainerState, schedulers: dict[str, Any]) -> Path:
    """Write the resumable state to a temporary folder, then swap it in (a crash never leaves half a state)."""
    final, tmp = run_dir / STATE_DIR, run_dir / f"{STATE_DIR}.tmp"
    state.schedulers = {k: s.state_dict() for k, s in schedulers.items()}
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1, default=float))
        old = run_dir / f"{STATE_DIR}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(state_dir: Path) -> TrainerState:
    path = Path(state_dir) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} not found (no completed epoch in {state_dir.parent}?)")
    return TrainerState(**json.loads(path.read_text()))


def _format_metrics(m: dict[str, Any]) -> str:
    parts = []
    for k, v in m.items():
        if k in ("epoch", "epochs"):
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)


def train(
    cfg: Any,
    task: Task,
    accelerator: Accelerator | None = None,
    *,
    callbacks: Sequence[MetricsCallback] = (),
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train ``task`` as ``cfg.run`` says; return where the best model went and the metric history.

    ``resume_from``: a state folder to continue from (Ray passes its checkpoint here); with
    ``cfg.run.resume`` the run folder's own ``state/`` is used.
    """
    run = cfg.run
    accelerator = accelerator or make_accelerator(run)
    accelerator.gradient_accumulation_steps = run.grad_accum
    run_dir = run.resolved_run_dir()
    out_path = Path(run.out)
    if resume_from is None and run.resume:
        resume_from = run_dir / STATE_DIR
        if not resume_from.is_dir():
            raise FileNotFoundError(f"--resume: no saved state in {resume_from}; train without --resume first")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    set_seed(run.seed)

    task.accelerator = accelerator
    task.setup(accelerator)
    names, opt_names = list(task.models), list(task.optimizers)
    prepared = accelerator.prepare(
        *task.models.values(), *task.optimizers.values(), task.train_loader, task.val_loader
    )
    task.models = dict(zip(names, prepared[: len(names)]))
    task.optimizers = dict(zip(opt_names, prepared[len(names): len(names) + len(opt_names)]))
    task.train_loader, task.val_loader = prepared[-2], prepared[-1]
    batches = len(task.train_loader)
    if run.max_steps_per_epoch and run.max_steps_per_epoch < batches:
        # A truncated epoch ends on a whole accumulation cycle, so no gradient leaks into the next epoch.
        batches = min(batches, max(run.grad_accum, run.max_steps_per_epoch - run.max_steps_per_epoch % run.grad_accum))
    steps_per_epoch = max(1, math.ceil(batches / run.grad_accum))
    task.schedulers = task.configure_schedulers(steps_per_epoch * run.epochs)

    state = TrainerState(planned_epochs=run.epochs)
    if resume_from is not None:
        resume_from = Path(resume_from)
        state = load_trainer_state(resume_from)
        accelerator.load_state(str(resume_from))
        for k, s in task.schedulers.items():
            s.load_state_dict(state.schedulers[k])
        accelerator.print(f"resumed from {resume_from}: {state.epoch} epoch(s) done, best {task.monitor}="
                          f"{state.best_metric}")
        if state.planned_epochs not in (None, run.epochs):
            accelerator.print(f"note: the run was planned for {state.planned_epochs} epochs, now {run.epochs}; "
                              "the learning-rate schedule continues the original plan")

    history: list[dict[str, Any]] = []
    metrics_file = run_dir / "metrics.jsonl"
    model_params = [p for m in task.models.values() for p in m.parameters() if p.requires_grad]
    grad_clip = run_grad_clip(cfg)
    show_progress = run.progress and accelerator.is_local_main_process

    for epoch in range(state.epoch, run.epochs):
        # The prepared loader forwards the epoch to the task's sampler (seeded shuffling that survives a resume);
        # without this, accelerate would count epochs itself from 0 after a restart.
        if hasattr(task.train_loader, "set_epoch"):
            task.train_loader.set_epoch(epoch)
        task.train_mode(True)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = 0
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=batches, desc=f"epoch {epoch + 1}/{run.epochs}", file=sys.stderr, leave=False,
                       dynamic_ncols=True)
        for i, batch in enumerate(task.train_loader):
            if i >= batches:
                break
            with accelerator.accumulate(*task.models.values()):
                logs = task.training_step(batch)
                loss = logs["loss"]
                if not task.manual_optimization:
                    (opt,) = task.optimizers.values()
                    accelerator.backward(loss)
                    if grad_clip and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model_params, grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    for s in task.schedulers.values():
                        s.step()
                    state.global_step += 1
            n = task.batch_size_of(batch)
            loss_sum += loss.detach().float() * n
            seen += n
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(seen), device=loss_sum.device)]), "sum")
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": (totals[0] / totals[1].clamp(min=1)).item(),
            "lr": _current_lr(task),
            "images_per_s": totals[1].item() / max(train_time, 1e-9),
        }
        task.train_mode(False)
        t1 = time.perf_counter()
        metrics.update(task.evaluate())
        metrics["eval_s"] = time.perf_counter() - t1
        metrics["epoch_s"] = time.perf_counter() - t0
        value = metrics.get(task.monitor)
        if value is None:
            raise KeyError(f"task {task.name} monitors '{task.monitor}' but evaluate() returned {sorted(metrics)}")
        is_best = _better(float(value), state.best_metric, task.monitor_mode)
        metrics["best"] = is_best
        if is_best:
            state.best_metric, state.best_epoch = float(value), epoch + 1
            state.best_metrics = {k: v for k, v in metrics.items() if k != "best"}
            if accelerator.is_main_process:
                tensors, meta = task.export()
                meta.update(task=task.name, config=to_dict(cfg), metrics=state.best_metrics, epoch=epoch + 1)
                save_model_file(out_path, tensors, meta)
        state.epoch = epoch + 1
        state_dir = _save_state(accelerator, run_dir, state, task.schedulers)
        if accelerator.is_main_process:
            with open(metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(metrics) + "\n")
        accelerator.print(f"epoch {epoch + 1}/{run.epochs}  {_format_metrics(metrics)}" + ("  *" if is_best else ""))
        history.append(metrics)
        for cb in callbacks:
            cb(metrics, state_dir, task)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.print(f"best {task.monitor} {state.best_metric} at epoch {state.best_epoch}; model: {out_path}")
    return TrainResult(out_path, run_dir, state.best_metrics, history)


def run_grad_clip(cfg: Any) -> float:
    optim = getattr(cfg, "optim", None)
    return float(getattr(optim, "grad_clip", 0.0) or 0.0)


def _current_lr(task: Task) -> float:
    for opt in task.optimizers.values():
        return float(opt.param_groups[0]["lr"])
    return float("nan")
