"""Ray Tune sweeps over any task's config, with the search space in YAML.

Sweep file::

    task: detector                 # any registered task
    metric: val_top1               # reported by the task's evaluate()
    mode: max
    base: {run: {epochs: 4}}       # optional config overrides for every trial (sections, like a config file)
    space:                         # dotted config keys -> a distribution
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      optim.label_smoothing: {choice: [0.0, 0.1]}
      augment.rotation: {uniform: [0, 30]}
      data.image_size: {grid: [64, 96]}

Each trial runs the same ``engine.train``: in-process when a trial has one worker (no TorchTrainer start-up
cost), or as a TorchTrainer with ``workers_per_trial`` workers whose reports reach Tune through Ray's
``TuneReportCallback`` (Train V2 refuses ``Tuner(TorchTrainer)``; a function trainable that fits a trainer
is the supported shape). ASHA stops weak trials early, by epoch (``time_attr="epoch"``).

A trial reports at the epochs that carry the sweep's metric (evaluation epochs, see ``run.eval_every``).
``metrics_fn(metrics, task) -> dict`` (one worker per trial) adds metrics the task itself does not compute, at
the end of each epoch: the generator sweep ranks trials by an independent judge's score this way, never by the
losses that trained the generator (``jobs/sweep_generator.py``, :mod:`animeai.distributed.fanout`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from animeai.config import ConfigError, from_dict, load_yaml, to_dict, with_overrides
from animeai.engine import make_accelerator, train
from animeai.tasks import get_task

_DRIVER_CPU = 0.01  # a multi-worker trial's own process only drives its TorchTrainer

_DISTRIBUTIONS = {
    "uniform": lambda a: tune.uniform(*a),
    "loguniform": lambda a: tune.loguniform(*a),
    "quniform": lambda a: tune.quniform(*a),
    "randint": lambda a: tune.randint(*a),
    "choice": lambda a: tune.choice(list(a)),
    "grid": lambda a: tune.grid_search(list(a)),
}


@dataclass(frozen=True)
class SweepSpec:
    task: str
    metric: str
    mode: str
    base: dict[str, Any]
    space: dict[str, dict[str, Any]]


def load_sweep(path: str | Path) -> SweepSpec:
    raw = load_yaml(path)
    unknown = set(raw) - {"task", "metric", "mode", "base", "space"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {sorted(unknown)}; known: task, metric, mode, base, space")
    task = raw.get("task", "detector")
    cfg_cls, task_cls = get_task(task)
    space = raw.get("space") or {}
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: 'space' must map dotted config keys to distributions")
    base_cfg = from_dict(cfg_cls, raw.get("base") or {})
    for key, dist in space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in _DISTRIBUTIONS:
            raise ConfigError(f"{path}: space.{key} must be one of {{{', '.join(_DISTRIBUTIONS)}: [...]}}, got {dist}")
        with_overrides(base_cfg, {key: _example(dist)})  # unknown keys / wrong types fail here, not in a trial
    mode = raw.get("mode", task_cls.monitor_mode)
    if mode not in ("min", "max"):
        raise ConfigError(f"{path}: mode must be min or max, got {mode}")
    return SweepSpec(task, raw.get("metric", task_cls.monitor), mode, raw.get("base") or {}, space)


def _example(dist: dict[str, Any]) -> Any:
    kind, args = next(iter(dist.items()))
    return args[0]


def param_space(spec: SweepSpec) -> dict[str, Any]:
    # Tune flattens nested dicts with "/"; keep dotted keys flat under one "params" entry.
    return {"params": {k: _DISTRIBUTIONS[next(iter(d))](next(iter(d.values()))) for k, d in spec.space.items()}}


def _trial_cfg(trial_config: dict[str, Any]):
    cfg_cls, task_cls = get_task(trial_config["task"])
    cfg = with_overrides(from_dict(cfg_cls, trial_config["cfg"]), trial_config["params"])
    return cfg, task_cls


def run_trial(trial_config: dict[str, Any]) -> None:
    """Function trainable: one trial = one ``engine.train`` (in-process, or a TorchTrainer inside)."""
    cfg, task_cls = _trial_cfg(trial_config)
    trial_dir = Path(tempfile.mkdtemp(prefix="animeai-trial-"))
    over = {"run.out": str(trial_dir / "model.pth"), "run.run_dir": str(trial_dir / "run"), "run.progress": False,
            "run.resume": False, "run.overwrite": True}  # the trial's own folder (a retried trial starts over)
    if hasattr(cfg, "sample"):
        over["sample.folder"] = str(trial_dir / "samples")  # a task's sample grids stay in the trial's folder too
    cfg = with_overrides(cfg, over)
    workers = trial_config["workers_per_trial"]
    metrics_fn, metric = trial_config.get("metrics_fn"), trial_config.get("metric")
    if workers <= 1:
        if trial_config.get("threads"):
            import torch

            torch.set_num_threads(int(trial_config["threads"]))

        def report(metrics, state_dir, task):
            metrics = dict(metrics)
            if metrics_fn is not None:
                metrics.update(metrics_fn(metrics, task) or {})
            if metric is not None and metric not in metrics:
                return  # not an evaluation epoch: nothing to rank the trial by
            tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})

        train(cfg, task_cls(cfg), make_accelerator(cfg.run), callbacks=[report])
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from animeai.distributed.trainer import DEFAULT_RAY_LOG_LEVEL, ray_logging_config, train_env, train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": trial_config["task"], "cfg": to_dict(cfg), "use_gpu": trial_config["use_gpu"],
                           "run_name": trial_dir.name},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=trial_config["use_gpu"],
                                     resources_per_worker={"CPU": trial_config["cpus_per_worker"]}),
        run_config=RunConfig(name=trial_dir.name, storage_path=trial_config["storage_path"],
                             callbacks=[TuneReportCallback()], **ray_logging_config(DEFAULT_RAY_LOG_LEVEL)),
    )
    with train_env():  # one line per print of a worker, as in trainer.fit
        trainer.fit()


def sweep(
    spec: SweepSpec,
    *,
    data: str | None = None,
    num_samples: int = 4,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    workers_per_trial: int = 1,
    max_concurrent: int | None = None,
    grace_period: int = 1,
    storage_path: str | None = None,
    name: str = "sweep",
    extra_overrides: dict[str, Any] | None = None,
    metrics_fn: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None,
    threads_per_trial: int | None = None,
):
    """Run the sweep; return Tune's ``ResultGrid``.

    ``metrics_fn(metrics, task) -> dict``: picklable; called in the trial after each epoch, its metrics join the
    epoch's (one worker per trial only). ``threads_per_trial``: torch intra-op threads of an in-process trial
    (default: as the worker process has them)."""
    if metrics_fn is not None and workers_per_trial > 1:
        raise ValueError("metrics_fn needs in-process trials (workers_per_trial 1)")
    cfg_cls, _ = get_task(spec.task)
    cfg = from_dict(cfg_cls, spec.base)
    over = dict(extra_overrides or {})
    if data is not None:
        over["data.root"] = str(Path(data).expanduser().absolute())
    cfg = with_overrides(cfg, over)
    from animeai.distributed.trainer import DEFAULT_STORAGE, prepare_data

    prepare_data(spec.task, cfg)  # validate once into the data manifest; the trials then decode nothing up front

    storage = storage_path or str(Path(DEFAULT_STORAGE).absolute())
    trial_config = {"task": spec.task, "cfg": to_dict(cfg), "workers_per_trial": workers_per_trial,
                    "use_gpu": gpus_per_trial > 0, "cpus_per_worker": cpus_per_trial, "storage_path": storage,
                    "metric": spec.metric, "metrics_fn": metrics_fn, "threads": threads_per_trial}
    if workers_per_trial <= 1:
        resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    else:
        _check_trial_fits(workers_per_trial, cpus_per_trial)
        # The trial itself only drives a TorchTrainer: a sliver of CPU, so it never blocks its own workers.
        resources = {"cpu": _DRIVER_CPU}
    trainable = tune.with_resources(tune.with_parameters(_trainable, trial_config=trial_config), resources)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=num_samples, max_concurrent_trials=max_concurrent,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.run.epochs, grace_period=grace_period),
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage),
    )
    return tuner.fit()


def _check_trial_fits(workers: int, cpus_per_worker: float) -> None:
    """A trial of N workers also holds its driver's sliver of CPU: refuse a sweep that could never start one
    (it would otherwise wait for the worker group until Ray's start-up timeout, then retry)."""
    import ray

    from animeai.distributed.trainer import DistributedError

    have = ray.cluster_resources().get("CPU", 0.0)
    need = workers * cpus_per_worker + _DRIVER_CPU
    if need > have:
        raise DistributedError(
            f"one trial needs {workers} workers x {cpus_per_worker:g} CPU + {_DRIVER_CPU} for its driver = {need:g} "
            f"CPUs but the cluster has {have:g}; use --cpus-per-trial {(have - _DRIVER_CPU) / workers:.2f} or less"
        )


def _trainable(config: dict[str, Any], trial_config: dict[str, Any]) -> None:
    run_trial({**trial_config, "params": config["params"]})


def summarize(results, spec: SweepSpec, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Rows per trial (params, metric, ``extra`` metrics for information, epochs) and the best trial's full config
    (the best by ``spec.metric`` only)."""
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append({"params": (r.config or {}).get("params", {}), spec.metric: m.get(spec.metric),
                     **{k: m.get(k) for k in extra if k != spec.metric},
                     "epochs": m.get("epoch"), "error": str(r.error).splitlines()[0] if r.error else None})
    ok = [r for r in rows if r[spec.metric] is not None]
    if not ok:
        raise RuntimeError("no trial reported the metric " + spec.metric + "; see the trial errors: "
                           + json.dumps([r["error"] for r in rows]))
    best = (max if spec.mode == "max" else min)(ok, key=lambda r: r[spec.metric])
    cfg_cls, _ = get_task(spec.task)
    best_cfg = with_overrides(from_dict(cfg_cls, spec.base), best["params"])
    return {"metric": spec.metric, "mode": spec.mode, "extra_metrics": [k for k in extra if k != spec.metric],
            "trials": rows, "best": best, "best_config": to_dict(best_cfg)}


def format_table(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    keys = sorted({k for r in summary["trials"] for k in r["params"]})
    extra = list(summary.get("extra_metrics", []))
    header = ["#", *keys, metric, *extra, "epochs", "error"]
    lines = []
    for i, r in enumerate(summary["trials"]):
        vals = [str(i), *(f"{r['params'].get(k):.4g}" if isinstance(r["params"].get(k), float)
                          else str(r["params"].get(k)) for k in keys),
                *("-" if r.get(k) is None else f"{r[k]:.4f}" for k in (metric, *extra)), str(r["epochs"]),
                r["error"] or ""]
        lines.append(vals)
    widths = [max(len(h), *(len(v[i]) for v in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*v) for v in lines]
    return "\n".join(out)
