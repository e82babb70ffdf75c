"""Ray Train around the one engine loop: the same ``engine.train`` runs in every TorchTrainer worker.

Ray Train builds the process group (gloo on CPU, NCCL on GPU); Accelerate inside each worker picks it up
(``Accelerator(cpu=True)`` on CPU) and shards the data. After each epoch every worker calls
``ray.train.report``; rank 0 attaches the engine's resumable state plus the best model file as the Ray
checkpoint. A restarted worker group (``max_failures``) resumes from the latest checkpoint, so no completed
epoch is lost. The driver copies the best model file out of the final checkpoint to ``run.out``: the same
model file the local CLI writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from animeai.config import from_dict, to_dict, with_overrides
from animeai.data.remote import is_url
from animeai.engine import MetricsCallback, TrainResult, make_accelerator, train
from animeai.tasks import get_task

BEST_MODEL = "best_model.pth"
DEFAULT_STORAGE = "runs/ray"  # relative to the driver's working directory

# Ray Train V2 patches print() in its workers to log each line through the root logger (console handler),
# and also prints the line itself whenever sys.stdout is not sys.__stdout__, taking that for a third-party
# redirect. Ray's worker process always replaces sys.stdout (an unbuffered copy), so every print of a
# worker reached the job log twice. Turning the patch off leaves one plain print, still captured in the
# worker's log file under the Ray session's logs/ and streamed to the driver. Read by Ray when a trainer
# starts (driver -> controller -> workers); a value already set in the environment wins.
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Ray Train's own INFO lines ("Reporting training result N: TrainingReport(...)" from every worker for every
# epoch, "Checkpoint successfully created", worker-group start-up) stay in the session's logs/train/ files;
# the job output keeps warnings and errors. RunConfig(logging_config=LoggingConfig(log_level)) covers the
# `ray.train.*` loggers; see quiet_ray_train_console for the per-report line.
DEFAULT_RAY_LOG_LEVEL = "WARNING"


class DistributedError(RuntimeError):
    """A cluster that cannot run the requested job (unreachable, too small, data missing)."""


@dataclass(frozen=True)
class DistributedOptions:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    keep_checkpoints: int = 2
    storage_path: str | None = None  # local folder, NFS mount, s3://bucket/path, gs://bucket/path
    name: str | None = None
    check_resources: bool = True
    ray_log_level: str = DEFAULT_RAY_LOG_LEVEL  # ray.train's console lines (INFO shows per-report lines)


# ------------------------------------------------------------------------------------------ worker side


class RayReport:
    """Engine callback: every worker reports each epoch; rank 0 attaches state + best model as checkpoint
    on epochs that saved a state (all of them unless run.save_every > 1)."""

    def __init__(self, best_model: Path):
        self.best_model = best_model

    def __call__(self, metrics: dict[str, Any], state_dir: Path | None, task) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str))}
        if state_dir is not None and ray.train.get_context().get_world_rank() == 0:
            if self.best_model.is_file():
                shutil.copy2(self.best_model, state_dir / BEST_MODEL)
            ray.train.report(clean, checkpoint=Checkpoint.from_directory(str(state_dir)))
        else:
            ray.train.report(clean)


def quiet_ray_train_console(level: str = DEFAULT_RAY_LOG_LEVEL) -> None:
    """Drop, from this worker's console (the job output) only, Ray Train records below ``level`` that come
    from loggers named after a file path. Ray 2.60's train context module logs its per-report line through
    ``logging.getLogger(__file__)``: a top-level logger outside ``ray.train``, so ``LoggingConfig`` misses it
    and it propagates to the root logger's console handler. The session's logs/train/ file keeps it."""
    threshold = logging.getLevelName(level.upper())
    marker = f"{os.sep}ray{os.sep}train{os.sep}"

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= threshold or marker not in record.name

    for handler in logging.getLogger().handlers:
        if handler.get_name() == "console" and not getattr(handler, "_animeai_quiet", False):
            handler.addFilter(keep)
            handler._animeai_quiet = True


def run_worker(config: dict[str, Any], callbacks: Sequence[MetricsCallback] = ()) -> TrainResult:
    """The body of a TorchTrainer worker: rebuild the config, restore a checkpoint, run ``engine.train``."""
    cfg_cls, task_cls = get_task(config["task"])
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # keep `ray job logs` to epoch lines
    quiet_ray_train_console(config.get("ray_log_level") or DEFAULT_RAY_LOG_LEVEL)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    scratch = Path(config.get("scratch_dir") or Path(tempfile.gettempdir()) / "animeai-ray") / config["run_name"]
    cfg = with_overrides(from_dict(cfg_cls, config["cfg"]), {
        "run.run_dir": str(scratch),
        "run.out": str(scratch / BEST_MODEL),
        "run.cpu": not config["use_gpu"],
        "run.resume": False,
        "run.overwrite": True,  # the scratch run folder belongs to this worker: an earlier run there is cleared
        "run.progress": False,  # epoch lines go to `ray job logs`; progress bars do not read well there
    })
    if config.get("synthetic"):
        # Smoke tests make their data on each worker (deterministic, so every rank sees the same images).
        from animeai.data.synthetic import make_synthetic_dataset

        data_dir = scratch / f"synthetic-rank{rank}"
        if data_dir.exists():
            shutil.rmtree(data_dir)
        make_synthetic_dataset(data_dir, **config["synthetic"])
        cfg = with_overrides(cfg, {"data.root": str(data_dir), "data.val_root": None})
    resume_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restored = scratch / f"restored-rank{rank}"
        if restored.exists():
            shutil.rmtree(restored)
        checkpoint.to_directory(str(restored))
        if rank == 0 and (restored / BEST_MODEL).is_file():
            shutil.copy2(restored / BEST_MODEL, cfg.run.out)
        resume_from = restored
    accelerator = make_accelerator(cfg.run)
    task = task_cls(cfg)
    return train(cfg, task, accelerator, callbacks=[*callbacks, RayReport(Path(cfg.run.out))], resume_from=resume_from)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    run_worker(config)


# ------------------------------------------------------------------------------------------ driver side


@contextlib.contextmanager
def train_env() -> Iterator[None]:
    """``TRAIN_ENV_DEFAULTS`` in this process's environment while a trainer starts (Ray copies them from
    here to the controller and its workers); restored afterwards."""
    added = [k for k in TRAIN_ENV_DEFAULTS if k not in os.environ]
    for k in added:
        os.environ[k] = TRAIN_ENV_DEFAULTS[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def connect(address: str | None = None, **init_kwargs) -> None:
    """Join a running cluster (``address`` or ``RAY_ADDRESS``), or start a local Ray when neither is given."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target not in ("auto", "local"):
        _probe(target)  # ray.init retries an unreachable GCS for minutes; fail in seconds instead
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as exc:
        where = address or os.environ.get("RAY_ADDRESS", "auto")
        raise DistributedError(
            f"no Ray cluster reachable at {where} ({exc}). Start one with `cluster/local.sh start`, "
            "or leave --address out to run on a local Ray instance."
        ) from None


def _probe(address: str, timeout_s: float = 5.0) -> None:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"Ray address {address!r} is not host:port (or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise DistributedError(
            f"no Ray cluster reachable at {address} ({exc}). Start one with `cluster/local.sh start`, "
            "or leave --address out to run on a local Ray instance."
        ) from None


def check_resources(opts: DistributedOptions) -> None:
    """Fail fast instead of waiting forever for workers the cluster cannot place."""
    total = ray.cluster_resources()
    need_cpu = opts.num_workers * opts.cpus_per_worker
    have_cpu = total.get("CPU", 0.0)
    if need_cpu > have_cpu:
        raise DistributedError(
            f"{opts.num_workers} workers x {opts.cpus_per_worker} CPU need {need_cpu:g} CPUs but the cluster has "
            f"{have_cpu:g}; use fewer --num-workers or a smaller --cpus-per-worker (or --no-resource-check on an "
            "autoscaling cluster)"
        )
    if opts.use_gpu and opts.num_workers > total.get("GPU", 0.0):
        raise DistributedError(
            f"{opts.num_workers} GPU workers requested but the cluster has {total.get('GPU', 0.0):g} GPUs "
            "(or --no-resource-check on an autoscaling cluster)"
        )


@ray.remote(num_cpus=0)
def _path_exists(path: str) -> bool:
    return Path(path).exists()


def check_data(paths: Sequence[str]) -> None:
    """The data must be where the workers run (a shared mount, or shipped with --working-dir; object storage is
    checked by listing it in ``prepare_data``)."""
    for p in paths:
        if p and not is_url(p) and not ray.get(_path_exists.remote(p)):
            raise DistributedError(f"data path {p} does not exist on the cluster's nodes; put the data on a path "
                                   "every node sees (NFS, or inside the --working-dir you submit)")


def _absolute_data_paths(cfg: Any) -> Any:
    data = getattr(cfg, "data", None)
    if data is None:
        return cfg
    over = {}
    for key, value in (("data.root", data.root), ("data.val_root", getattr(data, "val_root", None))):
        if value and not is_url(value):  # object-storage URLs are the same from every node
            over[key] = str(Path(value).expanduser().absolute())
    return with_overrides(cfg, over)


def prepare_data(task_name: str, cfg: Any) -> None:
    """The task's once-per-run data work on the driver (the detector and distillation validate the data into its
    manifest, so the workers find every image there and decode none up front; bad data fails here, before any
    worker starts). A driver that does not see the data (it is only on the cluster's nodes) leaves it to the
    workers: the first one builds the manifest under its lock and the others wait and reuse it."""
    data = getattr(cfg, "data", None)
    if data is None:
        return
    if not is_url(data.root) and not Path(data.root).exists():
        print(f"data: {data.root} is not visible on this driver; the workers validate it (once, under the "
              "manifest's lock)", file=sys.stderr)
        return
    get_task(task_name)[1].prepare_data(cfg)


def ray_logging_config(level: str) -> dict[str, Any]:
    """``logging_config=`` for RunConfig where this Ray has it (Train V2, Ray 2.50+); nothing otherwise."""
    logging_config = getattr(ray.train, "LoggingConfig", None)
    return {"logging_config": logging_config(log_level=level)} if logging_config else {}


def _fresh_run_name(storage: str, name: str, *, overwrite: bool) -> str:
    """Ray Train restores a run whose name already exists under the storage path (a job re-submitted after a
    crash continues). With ``run.overwrite`` the user asked for a new run: the earlier run's folder is removed
    (local storage), or, on object storage, the new run gets a name of its own."""
    if not overwrite:
        return name
    if "://" in storage:
        fresh = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"--overwrite: starting a new Ray run {fresh} under {storage} (earlier runs of {name} are kept)",
              file=sys.stderr)
        return fresh
    earlier = Path(storage) / name
    if earlier.exists():
        shutil.rmtree(earlier)
    return name


def fit(
    task_name: str,
    cfg: Any,
    opts: DistributedOptions,
    *,
    train_func: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    scratch_dir: str | None = None,
    synthetic: dict[str, Any] | None = None,
) -> ray.train.Result:
    """Run ``task_name`` with ``cfg`` on ``opts.num_workers`` Ray Train workers; write the best model to
    ``cfg.run.out`` and return Ray's result (metrics, checkpoints).

    ``synthetic``: arguments of ``make_synthetic_dataset``; each worker then trains on generated data
    (smoke tests) instead of ``cfg.data.root``. Otherwise the task's ``prepare_data`` runs here first (the
    detector and distillation validate the data into its manifest once, with a progress bar, and fail fast on
    bad data before any worker starts)."""
    if not ray.is_initialized():
        connect()
    if opts.check_resources:
        check_resources(opts)
    if synthetic is None and hasattr(cfg, "data"):
        cfg = _absolute_data_paths(cfg)
        check_data([cfg.data.root, getattr(cfg.data, "val_root", None)])
        prepare_data(task_name, cfg)
    name = opts.name or f"{task_name}-{Path(cfg.run.out).stem}"
    storage = opts.storage_path or str(Path(DEFAULT_STORAGE).absolute())
    name = _fresh_run_name(storage, name, overwrite=getattr(cfg.run, "overwrite", False))
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"task": task_name, "cfg": to_dict(cfg), "use_gpu": opts.use_gpu, "run_name": name,
                           "scratch_dir": scratch_dir, "synthetic": synthetic, "ray_log_level": opts.ray_log_level},
        scaling_config=ScalingConfig(num_workers=opts.num_workers, use_gpu=opts.use_gpu,
                                     resources_per_worker={"CPU": opts.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=opts.keep_checkpoints),
            **ray_logging_config(opts.ray_log_level),
        ),
    )
    with train_env():
        result = trainer.fit()
    if result.checkpoint is None:
        raise DistributedError("training finished without a checkpoint (no epoch completed)")
    out = Path(cfg.run.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as ckpt_dir:
        best = Path(ckpt_dir) / BEST_MODEL
        if not best.is_file():
            raise DistributedError(f"the final checkpoint {result.checkpoint.path} holds no {BEST_MODEL}")
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.copy2(best, tmp)
        os.replace(tmp, out)
    return result
