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
from animeai.config import ConfigError, to_dict
from animeai.runs import (
    STATE_DIR,
    TRAINER_STATE,
    RunError,
    RunFolder,
    TrainingDiverged,
    check_resume_config,
    load_run_config,
    read_trainer_state,
    state_manifest,
    trainer_state_fields,
)
from animeai.tasks.base import Task

MAX_SKIPPED_STEPS = 10  # run.nonfinite=skip: this many non-finite steps in a row stop the run

# callback(metrics, state_dir, task) runs on every process after each epoch, once the resumable state is saved
# (Ray reports from it); state_dir is None on epochs without a saved state (run.save_every > 1).
# ``task.accelerator`` and ``task.models`` are available to it.
MetricsCallback = Callable[[dict[str, Any], Path | None, Task], None]


@dataclass
class TrainerState:
    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps
    best_metric: float | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    planned_epochs: int | None = None
    files: dict[str, Any] = field(default_factory=dict)  # manifest of the state folder: name -> size, sha256


@dataclass
class TrainResult:
    model_path: Path
    run_dir: Path
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]


def resolve_mixed_precision(value: str, cpu: bool = False) -> str:
    """``auto`` -> bf16/fp16 on a GPU, ``no`` on the CPU; an explicit mode the device cannot run is a
    ``ConfigError`` naming the flag (fp16 needs CUDA; bf16 needs a bf16-capable GPU, or the CPU)."""
    on_gpu = not cpu and torch.cuda.is_available()
    if value == "auto":
        if not on_gpu:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if value == "fp16" and not on_gpu:
        raise ConfigError("config key 'run.mixed_precision' (--mixed-precision) fp16 needs a CUDA GPU, and this run "
                          f"is on the CPU{' (--cpu)' if cpu else ' (no GPU found)'}; use auto, no or bf16")
    if value == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'run.mixed_precision' (--mixed-precision) bf16 is not supported by this GPU; "
                          "use auto or fp16")
    return value


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
        state.files = state_manifest(tmp)
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
    """The checked trainer state of a saved state folder (``RunError`` naming the damaged file otherwise)."""
    return TrainerState(**read_trainer_state(Path(state_dir), trainer_state_fields(TrainerState)))


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
    ``cfg.run.resume`` the run folder's own ``state/`` is used. The run-folder rules (lock, no mixing with an
    earlier run, checked resume state, nothing written before the run starts) are :mod:`animeai.runs`'.
    """
    run = cfg.run
    accelerator = accelerator or make_accelerator(run)
    accelerator.gradient_accumulation_steps = run.grad_accum
    run_dir = run.resolved_run_dir()
    out_path = Path(run.out)
    folder = RunFolder(run_dir, out_path, main=accelerator.is_main_process)
    resuming = resume_from is not None or run.resume
    try:
        folder.preflight(resume=resuming, overwrite=run.overwrite)
        state = TrainerState(planned_epochs=run.epochs)
        if resuming:
            resume_from = Path(resume_from) if resume_from is not None else run_dir / STATE_DIR
            state = load_trainer_state(resume_from)
            if run.resume and (run_dir / "config.yaml").is_file():
                check_resume_config(load_run_config(type(cfg), run_dir), cfg, run_dir, task.resume_safe_keys)
            if (run.resume and accelerator.is_main_process and state.best_epoch is not None
                    and not out_path.is_file()):
                raise RunError(f"cannot resume: the run's best model file {out_path} (epoch {state.best_epoch}) "
                               "is missing; restore it, or start over with --overwrite")
        set_seed(run.seed)
        task.accelerator = accelerator
        task.setup(accelerator)
        _prepare(task, accelerator)
        batches = len(task.train_loader)
        if run.max_steps_per_epoch and run.max_steps_per_epoch < batches:
            # A truncated epoch ends on a whole accumulation cycle, so no gradient leaks into the next epoch.
            batches = min(batches, max(run.grad_accum,
                                       run.max_steps_per_epoch - run.max_steps_per_epoch % run.grad_accum))
        steps_per_epoch = max(1, math.ceil(batches / run.grad_accum))
        task.schedulers = task.configure_schedulers(steps_per_epoch * run.epochs)
        if resuming:
            _load_state(accelerator, task, state, resume_from)
        folder.start(cfg, overwrite=run.overwrite and not resuming,
                     resumed_epoch=state.epoch if resuming else None, run_files=task.run_files())
        return _fit(cfg, task, accelerator, state, batches, folder, callbacks)
    finally:
        folder.close()


def _prepare(task: Task, accelerator: Accelerator) -> None:
    names, opt_names = list(task.models), list(task.optimizers)
    prepared = accelerator.prepare(
        *task.models.values(), *task.optimizers.values(), task.train_loader, task.val_loader
    )
    task.models = dict(zip(names, prepared[: len(names)]))
    task.optimizers = dict(zip(opt_names, prepared[len(names): len(names) + len(opt_names)]))
    task.train_loader, task.val_loader = prepared[-2], prepared[-1]


def _load_state(accelerator: Accelerator, task: Task, state: TrainerState, state_dir: Path) -> None:
    try:
        accelerator.load_state(str(state_dir))
        for k, s in task.schedulers.items():
            s.load_state_dict(state.schedulers[k])
    except Exception as exc:  # noqa: BLE001 - any failure here means the state does not fit this run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"cannot resume from {state_dir}: the saved state does not load into this run ({first}); "
                       "start fresh with --overwrite") from None
    accelerator.print(f"resumed from {state_dir}: {state.epoch} epoch(s) done, best {task.monitor}="
                      f"{state.best_metric}")
    if state.planned_epochs not in (None, cfg_epochs := task.cfg.run.epochs):
        accelerator.print(f"note: the run was planned for {state.planned_epochs} epochs, now {cfg_epochs}; "
                          "the learning-rate schedule continues the original plan")


def _all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all agree, so a skipped step never desynchronises DDP)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return bad.item() == 0


def _diverged(task: Task, epoch: int, step: int, loss: torch.Tensor, hint: str) -> TrainingDiverged:
    lr = _current_lr(task)
    return TrainingDiverged(
        f"training diverged at epoch {epoch + 1}, batch {step + 1}: the loss is {loss.item()} (learning rate "
        f"{lr:.3g}). {hint}The model file keeps the best epoch before this, if any; nothing is saved from the "
        "diverged weights. Lower --lr, set --grad-clip, or use --nonfinite skip")


def _finite_weights(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _fit(cfg, task: Task, accelerator: Accelerator, state: TrainerState, batches: int, folder: RunFolder,
         callbacks: Sequence[MetricsCallback]) -> TrainResult:
    run = cfg.run
    run_dir, out_path = folder.run_dir, folder.out
    history: list[dict[str, Any]] = []
    metrics_file = run_dir / "metrics.jsonl"
    model_params = [p for m in task.models.values() for p in m.parameters() if p.requires_grad]
    grad_clip = run_grad_clip(cfg)
    show_progress = run.progress and accelerator.is_local_main_process
    skipped_in_a_row = 0
    if state.epoch >= run.epochs:
        accelerator.print(f"the run already has {state.epoch} epoch(s) of {run.epochs}: nothing to train "
                          "(raise --epochs to continue it)")

    for epoch in range(state.epoch, run.epochs):
        last = epoch + 1 == run.epochs
        # The prepared loader forwards the epoch to the task's sampler (seeded shuffling that survives a resume);
        # without this, accelerate would count epochs itself from 0 after a restart.
        if hasattr(task.train_loader, "set_epoch"):
            task.train_loader.set_epoch(epoch)
        task.train_mode(True)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = skipped = 0
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
                finite = _all_finite(accelerator, loss)
                if not finite and (run.nonfinite == "error" or task.manual_optimization):
                    hint = "" if run.nonfinite == "error" else "(This task steps its own optimizers: it cannot skip.) "
                    raise _diverged(task, epoch, i, loss, hint)
                if not finite:
                    skipped += 1
                    skipped_in_a_row += 1
                    for opt in task.optimizers.values():
                        opt.zero_grad(set_to_none=True)
                    if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                        raise _diverged(task, epoch, i, loss, f"{MAX_SKIPPED_STEPS} steps in a row were skipped. ")
                elif not task.manual_optimization:
                    skipped_in_a_row = 0
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
            if finite:
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
        if skipped:
            metrics["skipped_steps"] = skipped
        is_best = False
        if last or (epoch + 1) % run.eval_every == 0:
            task.train_mode(False)
            t1 = time.perf_counter()
            metrics.update(task.evaluate())
            metrics["eval_s"] = time.perf_counter() - t1
            value = metrics.get(task.monitor)
            if value is None:
                raise KeyError(f"task {task.name} monitors '{task.monitor}' but evaluate() returned {sorted(metrics)}")
            is_best = _better(float(value), state.best_metric, task.monitor_mode)
        metrics["epoch_s"] = time.perf_counter() - t0
        metrics["best"] = is_best
        if is_best:
            state.best_metric, state.best_epoch = float(value), epoch + 1
            state.best_metrics = {k: v for k, v in metrics.items() if k != "best"}
            if accelerator.is_main_process:
                tensors, meta = task.export()
                bad = _finite_weights(tensors)
                if bad:
                    raise TrainingDiverged(f"the weights became NaN/inf at epoch {epoch + 1} (tensor {bad}); not "
                                           f"saving them to {out_path}. Lower --lr or set --grad-clip")
                meta.update(task=task.name, config=to_dict(cfg), metrics=state.best_metrics, epoch=epoch + 1)
                save_model_file(out_path, tensors, meta)
        state.epoch = epoch + 1
        if accelerator.is_main_process:
            # Metrics first, then the state: a crash in between re-runs the epoch and resume drops the extra line.
            with open(metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(_finite_or_none(metrics), allow_nan=False) + "\n")
        state_dir = None
        if last or (epoch + 1) % run.save_every == 0:
            state_dir = _save_state(accelerator, run_dir, state, task.schedulers)
        accelerator.print(f"epoch {epoch + 1}/{run.epochs}  {_format_metrics(metrics)}" + ("  *" if is_best else ""))
        history.append(metrics)
        for cb in callbacks:
            cb(metrics, state_dir, task)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.print(f"best {task.monitor} {state.best_metric} at epoch {state.best_epoch}; model: {out_path}")
    return TrainResult(out_path, run_dir, state.best_metrics, history)


def _finite_or_none(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: such values are written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def run_grad_clip(cfg: Any) -> float:
    optim = getattr(cfg, "optim", None)
    return float(getattr(optim, "grad_clip", 0.0) or 0.0)


def _current_lr(task: Task) -> float:
    for opt in task.optimizers.values():
        return float(opt.param_groups[0]["lr"])
    return float("nan")
