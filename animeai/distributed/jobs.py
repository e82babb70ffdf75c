"""Command lines of the Ray jobs in ``jobs/``: the task's own config flags plus cluster flags."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from animeai.config import add_config_arguments, config_from_args, with_overrides
from animeai.tasks import get_task

# --smoke-test: tiny generated data, tiny model input, two short epochs; finishes in about a minute.
SMOKE_DATA = {"num_classes": 4, "images_per_class": 16, "image_size": 64, "seed": 0, "val_fraction": 0.25}
SMOKE_OVERRIDES = {
    "data.image_size": 64, "data.num_workers": 0, "model.arch": "efficientnet_lite0", "model.pretrained": "package",
    "optim.batch_size": 8, "run.epochs": 2,
}


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster options (Ray Train)")
    g.add_argument("--num-workers", type=int, default=2, help="training workers (processes), one DDP rank each "
                   "(default: 2)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL (default: CPU workers, gloo)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default: 1)")
    g.add_argument("--max-failures", type=int, default=0,
                   help="restart the worker group from the latest checkpoint up to N times (default: 0)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="Ray checkpoints to keep (default: 2)")
    g.add_argument("--storage-path", default=None,
                   help="where Ray keeps checkpoints and results: a local folder, an NFS mount, s3://bucket/path or "
                   "gs://bucket/path (default: runs/ray)")
    g.add_argument("--name", default=None, help="run name under the storage path (default: <task>-<out name>)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS as set by `ray job submit`, else a local Ray)")
    g.add_argument("--no-resource-check", dest="check_resources", action="store_false",
                   help="skip the up-front check that the cluster has the CPUs/GPUs asked for (autoscaling clusters)")
    g.add_argument("--smoke-test", action="store_true",
                   help="train on a tiny generated dataset for 2 short epochs (checks a cluster end to end)")


def build_train_parser(task: str) -> argparse.ArgumentParser:
    cfg_cls, _ = get_task(task)
    parser = argparse.ArgumentParser(
        description=f"Train the {task} with Ray Train (TorchTrainer; the Accelerate loop runs in every worker). "
        "Submit with: ray job submit --working-dir . -- python jobs/train_{task}.py --data DIR --num-workers 2",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of config sections (flags given here win)")
    add_config_arguments(parser, cfg_cls)
    add_cluster_arguments(parser)
    return parser


def train_job_main(task: str, argv: list[str] | None = None) -> int:
    """Parse the job's flags, run Ray Train, print where the model went."""
    from animeai.distributed.trainer import DistributedError, DistributedOptions, connect, fit

    args = build_train_parser(task).parse_args(argv)
    cfg_cls, _ = get_task(task)
    cfg = config_from_args(cfg_cls, args, args.config)
    synthetic = None
    if args.smoke_test:
        cfg = with_overrides(cfg, SMOKE_OVERRIDES)
        synthetic = SMOKE_DATA
    opts = DistributedOptions(
        num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints, storage_path=args.storage_path,
        name=args.name, check_resources=args.check_resources,
    )
    try:
        connect(args.address)
        result = fit(task, cfg, opts, synthetic=synthetic)
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "model": str(Path(cfg.run.out)),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))},
    }
    print(json.dumps(summary, indent=2))
    return 0


def build_sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Ray Tune sweep over any task's config (search space in YAML, ASHA early stopping). "
        "Submit with: ray job submit --working-dir . -- python jobs/sweep.py --sweep SWEEP.yaml --data DIR",
    )
    p.add_argument("--sweep", required=True, metavar="YAML",
                   help="sweep file: task, metric, mode, base (config sections), space (dotted key -> distribution: "
                   "uniform | loguniform | quniform | randint | choice | grid)")
    p.add_argument("--data", help="dataset folder for every trial (overrides data.root)")
    p.add_argument("--num-samples", type=int, default=4, help="trials to sample (x grid points) (default: 4)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPUs per trial, fractions allowed (default: 1); per worker with --workers-per-trial > 1")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractions allowed (default: 0)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="1 = train in the trial process; N > 1 = a TorchTrainer of N workers per trial (default: 1)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials running at once (default: as resources allow)")
    p.add_argument("--grace-period", type=int, default=1,
                   help="ASHA: epochs before a trial may be stopped (default: 1)")
    p.add_argument("--epochs", type=int, default=None, help="override run.epochs (ASHA's max_t)")
    p.add_argument("--storage-path", default=None, help="where Tune keeps results (default: runs/ray)")
    p.add_argument("--name", default="sweep", help="experiment name (default: sweep)")
    p.add_argument("--out", default="runs/sweep_best.json", help="results table + best config as JSON "
                   "(default: runs/sweep_best.json)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--smoke-test", action="store_true", help="tiny generated data, 2 trials of 2 short epochs")
    return p


def sweep_job_main(argv: list[str] | None = None) -> int:
    """Parse the sweep job's flags, run Ray Tune, print the table, write the best config JSON."""
    from animeai.distributed.trainer import DistributedError, connect
    from animeai.distributed.tune import format_table, load_sweep, summarize, sweep

    args = build_sweep_parser().parse_args(argv)
    spec = load_sweep(args.sweep)
    data, extra, num_samples = args.data, {}, args.num_samples
    if args.epochs is not None:
        extra["run.epochs"] = args.epochs
    if args.smoke_test:
        import tempfile

        from animeai.data.synthetic import make_synthetic_dataset

        data = str(Path(tempfile.mkdtemp(prefix="animeai-sweep-smoke-")) / "chars")
        make_synthetic_dataset(data, **SMOKE_DATA)
        extra.update(SMOKE_OVERRIDES)
        num_samples = min(num_samples, 2)
    try:
        connect(args.address)
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        results = sweep(spec, data=data, num_samples=num_samples, cpus_per_trial=args.cpus_per_trial,
                        gpus_per_trial=args.gpus_per_trial, workers_per_trial=args.workers_per_trial,
                        max_concurrent=args.max_concurrent, grace_period=args.grace_period,
                        storage_path=args.storage_path, name=args.name, extra_overrides=extra)
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(results, spec)
    print(format_table(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"best {summary['metric']} {summary['best'][summary['metric']]:.4f} with {summary['best']['params']}; "
          f"wrote {out}")
    return 0
