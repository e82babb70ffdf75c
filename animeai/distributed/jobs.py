"""Command lines of the Ray jobs in ``jobs/``: the task's own config flags plus cluster flags."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from animeai.config import add_config_arguments, config_from_args, with_overrides
from animeai.tasks import get_task

# --smoke-test: tiny generated data, tiny model input, two short epochs; finishes in about a minute.
SMOKE_DATA = {"num_classes": 4, "images_per_class": 16, "image_size": 64, "seed": 0, "val_fraction": 0.25}
SMOKE_OVERRIDES = {
    "data.image_size": 64, "data.num_workers": 0, "model.arch": "efficientnet_lite0", "model.pretrained": "package",
    "optim.batch_size": 8, "run.epochs": 2,
}
# Fusion smoke tests: the same characters with tag captions, and the offline MiniLM text encoder.
SMOKE_TEXT_OVERRIDES = {"text.encoder": "all-minilm-l6-v2", "text.pretrained": "package"}


# ------------------------------------------------------------------------------------------ job paths
# Under `ray job submit --working-dir .`, the entrypoint runs in Ray's temporary copy of the working dir
# (<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>), deleted with the job: a relative output
# path would write the model there and lose it. Every job therefore refuses relative output paths when it
# runs as a submitted job, before any Ray work, and names absolute paths in its final JSON.

# Ray's job supervisor sets this for the entrypoint process only (JSON: runtime_env + metadata with
# job_submission_id); Ray strips RAY_JOB_ID from the entrypoint's environment, so that is no signal.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
PATHS_HELP = (
    "Inside `ray job submit` every output path (--out, --storage-path) must be absolute (storage every node "
    "sees; the driver may run on any node) or, for --storage-path, s3://... / gs://...: relative paths are "
    "refused, since they would land in Ray's temporary copy of the working dir, deleted with the job. "
    "A relative --data is allowed (it must have been shipped with --working-dir) with a warning."
)


class JobPathError(ValueError):
    """An output path that would not outlive the submitted job."""


@dataclass(frozen=True)
class SubmittedJob:
    submission_id: str | None
    working_dir: str | None  # the runtime_env working_dir as Ray stored it (gcs://_ray_pkg_<hash>.zip)
    temporary_cwd: bool  # the process runs inside Ray's unpacked copy of the working dir


def _in_ray_working_dir_copy(cwd: Path) -> bool:
    parts = cwd.parts
    return "runtime_resources" in parts and "working_dir_files" in parts


def submitted_job(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> SubmittedJob | None:
    """This process as a `ray job submit` entrypoint, or None when it was started some other way."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    raw, temporary = environ.get(JOB_CONFIG_ENV), _in_ray_working_dir_copy(cwd)
    if raw is None and not temporary:
        return None
    try:
        job_config = json.loads(raw) if raw else {}
    except ValueError:
        job_config = {}
    if not isinstance(job_config, dict):
        job_config = {}
    metadata = job_config.get("metadata") if isinstance(job_config.get("metadata"), dict) else {}
    runtime_env = job_config.get("runtime_env") if isinstance(job_config.get("runtime_env"), dict) else {}
    return SubmittedJob(metadata.get("job_submission_id"), runtime_env.get("working_dir"), temporary)


def is_uri(path: str) -> bool:
    return "://" in path


_DETECT = object()


def job_paths(outputs: Mapping[str, str], inputs: Mapping[str, str | None] | None = None, *,
              uri_ok: tuple[str, ...] = (), examples: Mapping[str, str] | None = None,
              job: SubmittedJob | None | object = _DETECT, warn: Callable[[str], None] | None = None) -> dict[str, str]:
    """The absolute form of a job's paths, keyed by flag (URIs as given; None inputs left out).

    ``outputs``: flag -> path the job writes. Inside a submitted job (detected unless ``job`` is given) a
    relative one raises :class:`JobPathError` naming each such flag, why, and what to pass (``examples``:
    flag -> an example value). ``uri_ok``: output flags that may be a URI (s3://, gs://). ``inputs``:
    flag -> path the job reads; a relative one inside a submitted job gets a warning on stderr (it resolves
    against the temporary working dir: fine for data shipped with --working-dir)."""
    if job is _DETECT:
        job = submitted_job()
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    resolved: dict[str, str] = {}
    relative: list[str] = []
    for flag, path in outputs.items():
        path = str(path)
        if is_uri(path):
            if flag not in uri_ok:
                raise JobPathError(f"{flag} {path}: a URI is not supported here; give a file path")
            resolved[flag] = path
            continue
        p = Path(path).expanduser()
        if job is not None and not p.is_absolute():
            relative.append(flag)
        resolved[flag] = str(p.absolute())
    if relative:
        assert isinstance(job, SubmittedJob)
        examples = examples or {}
        given = ", ".join(f"{f} {outputs[f]}" for f in relative)
        example = " ".join(f"{f} {examples.get(f, '/shared/...')}" for f in relative)
        uris = [f for f in relative if f in uri_ok]
        raise JobPathError(
            f"relative output path in a submitted Ray job ({given}). This job runs under `ray job submit`"
            + (f" (submission {job.submission_id})" if job.submission_id else "")
            + (f", in Ray's temporary copy of --working-dir ({Path.cwd()}), which Ray deletes when the job ends: "
               "files written there vanish with it" if job.working_dir or job.temporary_cwd else
               f", in the working directory Ray gave it ({Path.cwd()}) on whichever node runs the job's driver")
            + f". Pass absolute paths on storage every node sees, e.g. {example}"
            + (f"; {' / '.join(uris)} may also be s3://bucket/path or gs://bucket/path" if uris else "") + "."
        )
    for flag, path in (inputs or {}).items():
        if path is None or is_uri(str(path)):
            continue
        p = Path(str(path)).expanduser()
        resolved[flag] = str(p.absolute())
        if job is not None and not p.is_absolute():
            where = "Ray's temporary copy of --working-dir" if job.working_dir or job.temporary_cwd else \
                "the working directory Ray gave the job"
            warn(f"warning: {flag} {path} is relative: in this submitted job it means {p.absolute()}, inside {where}. "
                 "Fine if the data was shipped with it; otherwise pass an absolute path every node sees.")
    return resolved


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
                   "gs://bucket/path (default: runs/ray; under `ray job submit`: required, absolute or a URI)")
    g.add_argument("--name", default=None, help="run name under the storage path (default: <task>-<out name>)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS as set by `ray job submit`, else a local Ray)")
    g.add_argument("--no-resource-check", dest="check_resources", action="store_false",
                   help="skip the up-front check that the cluster has the CPUs/GPUs asked for (autoscaling clusters)")
    g.add_argument("--smoke-test", action="store_true",
                   help="train on a tiny generated dataset for 2 short epochs (checks a cluster end to end)")
    g.add_argument("--ray-log-level", default="WARNING", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="Ray Train's own lines in the job output; INFO adds worker-group start-up and each "
                   "worker's per-epoch report (default: WARNING; all levels stay in the session's logs/train/)")


# task -> its script in jobs/ (default train_<task>.py)
JOB_SCRIPTS = {"distill": "train_model_distillation.py", "fusion": "multimodal_fusion.py"}


def build_train_parser(task: str) -> argparse.ArgumentParser:
    cfg_cls, _ = get_task(task)
    parser = argparse.ArgumentParser(
        description=f"Train the {task} with Ray Train (TorchTrainer; the Accelerate loop runs in every worker). "
        f"Submit with: ray job submit --working-dir . -- python jobs/{JOB_SCRIPTS.get(task, f'train_{task}.py')} "
        "--data DIR --num-workers 2 "
        f"--out /shared/models/{task}.pth --storage-path /shared/ray",
        epilog=PATHS_HELP + " The final JSON names the model file's absolute path and the last Ray checkpoint.",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of config sections (flags given here win)")
    add_config_arguments(parser, cfg_cls)
    add_cluster_arguments(parser)
    return parser


def train_job_main(task: str, argv: list[str] | None = None) -> int:
    """Parse the job's flags, run Ray Train, print where the model went (absolute path) as JSON."""
    from animeai.distributed.trainer import DEFAULT_STORAGE, DistributedError, DistributedOptions, connect, fit

    args = build_train_parser(task).parse_args(argv)
    cfg_cls, _ = get_task(task)
    cfg = config_from_args(cfg_cls, args, args.config)
    synthetic = None
    if args.smoke_test:
        cfg = with_overrides(cfg, SMOKE_OVERRIDES)
        synthetic = SMOKE_DATA
        if hasattr(cfg, "text"):  # fusion: captioned characters, the offline text encoder
            cfg = with_overrides(cfg, SMOKE_TEXT_OVERRIDES)
            synthetic = {**SMOKE_DATA, "captions": True}
        if hasattr(cfg, "distill"):  # distillation needs a teacher: a tiny one, trained here on the same characters
            from animeai.tasks.distill import make_smoke_teacher

            cfg = with_overrides(cfg, {"distill.teacher": str(make_smoke_teacher(SMOKE_DATA))})
    inputs = {}
    if synthetic is None and hasattr(cfg, "data"):
        inputs = {"--data": cfg.data.root, "--val-data": getattr(cfg.data, "val_root", None)}
    if hasattr(cfg, "distill"):
        inputs["--teacher"] = cfg.distill.teacher
    try:
        paths = job_paths({"--out": cfg.run.out, "--storage-path": args.storage_path or DEFAULT_STORAGE}, inputs,
                          uri_ok=("--storage-path",), examples={"--out": f"/shared/models/{Path(cfg.run.out).name}",
                                                                "--storage-path": "/shared/ray"})
    except JobPathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.run.resume:
        print("error: --resume is for local runs; a Ray job resumes from its Ray checkpoints by itself "
              "(--max-failures N restarts a failed worker group from the latest one)", file=sys.stderr)
        return 2
    if Path(paths["--out"]).exists() and not cfg.run.overwrite:
        print(f"error: --out {paths['--out']} exists; pass --overwrite to replace it, or choose another --out",
              file=sys.stderr)
        return 2
    over = {"run.out": paths["--out"]}
    if "--data" in paths:
        over["data.root"] = paths["--data"]
    if "--val-data" in paths:
        over["data.val_root"] = paths["--val-data"]
    if "--teacher" in paths:
        over["distill.teacher"] = paths["--teacher"]
    cfg = with_overrides(cfg, over)
    opts = DistributedOptions(
        num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints, storage_path=paths["--storage-path"],
        name=args.name, check_resources=args.check_resources, ray_log_level=args.ray_log_level,
    )
    try:
        connect(args.address)
        result = fit(task, cfg, opts, synthetic=synthetic)
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "model": paths["--out"],
        "checkpoint": checkpoint_uri(result.checkpoint, paths["--storage-path"]),
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))},
    }
    print(json.dumps(summary, indent=2))
    return 0


def checkpoint_uri(checkpoint, storage: str) -> str | None:
    """A Ray checkpoint's location as the user would name it: its path, with the storage URI's scheme."""
    if checkpoint is None:
        return None
    path = str(checkpoint.path)
    if is_uri(storage) and not is_uri(path):
        return f"{storage.split('://', 1)[0]}://{path.lstrip('/')}"
    return path


def build_sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Ray Tune sweep over any task's config (search space in YAML, ASHA early stopping). "
        "Submit with: ray job submit --working-dir . -- python jobs/sweep.py --sweep SWEEP.yaml --data DIR "
        "--out /shared/sweep_best.json --storage-path /shared/ray",
        epilog=PATHS_HELP,
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
    p.add_argument("--storage-path", default=None, help="where Tune keeps results: a folder, s3://... or gs://... "
                   "(default: runs/ray; under `ray job submit`: required, absolute or a URI)")
    p.add_argument("--name", default="sweep", help="experiment name (default: sweep)")
    p.add_argument("--out", default="runs/sweep_best.json", help="results table + best config as JSON "
                   "(default: runs/sweep_best.json; under `ray job submit`: required, absolute)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--smoke-test", action="store_true", help="tiny generated data, 2 trials of 2 short epochs")
    return p


def sweep_job_main(argv: list[str] | None = None) -> int:
    """Parse the sweep job's flags, run Ray Tune, print the table, write the best config JSON."""
    from animeai.distributed.trainer import DEFAULT_STORAGE, DistributedError, connect
    from animeai.distributed.tune import format_table, load_sweep, summarize, sweep

    args = build_sweep_parser().parse_args(argv)
    try:
        paths = job_paths({"--out": args.out, "--storage-path": args.storage_path or DEFAULT_STORAGE},
                          {} if args.smoke_test else {"--data": args.data}, uri_ok=("--storage-path",),
                          examples={"--out": "/shared/sweep_best.json", "--storage-path": "/shared/ray"})
    except JobPathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = load_sweep(args.sweep)
    data, extra, num_samples = paths.get("--data"), {}, args.num_samples
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
                        storage_path=paths["--storage-path"], name=args.name, extra_overrides=extra)
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(results, spec)
    print(format_table(summary))
    out = Path(paths["--out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"best {summary['metric']} {summary['best'][summary['metric']]:.4f} with {summary['best']['params']}; "
          f"wrote {out}")
    return 0
