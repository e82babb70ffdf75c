"""One generator per character, trained concurrently on a Ray cluster; Tune sweeps of the generator's loss weights.

Fan-out (``jobs/train_generators.py``): one Ray *task* per character, each running the same ``engine.train`` of a
:class:`~animeai.tasks.generator.GeneratorTask` in its worker process. A generator is a small single-process
job, so a TorchTrainer per character would only add its start-up cost (~15 s here) and a process group of one;
Ray tasks with fractional resources (``--cpus-per-generator 0.5``, ``--gpus-per-generator 0.25`` = 4 per GPU)
pack several generators per node or GPU and start in about a second once a worker process is warm.

Retries are the driver's: a character whose task raised, or whose worker process died, is submitted again up
to ``max_retries`` times (Ray's own task retries are off, so both kinds of failure count the same and every
attempt's error is reported). A retry continues the character's run from its last saved state when there is
one (``run.save_every``), else starts that character's run over. One character failing never stops the others:
the driver waits on all tasks, then prints a summary table and writes it as JSON.

Sweeps (``jobs/sweep_generator.py``): :func:`animeai.distributed.tune.sweep` over the loss weights, each trial
scored at its evaluation epochs by :class:`JudgeScorer`: the recognition rate of the EMA generator's samples by
an independent judge classifier (trained separately from the guiding detector). The guiding detector's and
perceptual network's scores are what the generator was trained to please, so they never pick the best trial.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from animeai.checkpoint import CheckpointError, read_metadata
from animeai.config import ConfigError, GeneratorConfig, from_dict, to_dict, with_overrides
from animeai.distributed.jobs import PATHS_HELP, JobPathError, job_paths

GUIDE_SCORES = ("recognition", "target_prob", "perc_dist")  # the guiding detector's / perceptual net's view
JUDGE_SCORES = ("judge_recognition", "judge_target_prob")  # the independent judge's view
DEFAULT_SWEEP = Path(__file__).resolve().parents[1] / "configs" / "sweep_generator.yaml"


# ------------------------------------------------------------------------------------------- characters


def parse_class_list(values: str | Sequence[str]) -> list[str]:
    """``"all"``, or names / ids separated by commas or spaces (``["akari,botan", "2"]``). An item that contains
    spaces is kept whole when it is a class name (``"Hoshimachi Suisei"``): see :func:`resolve_classes`."""
    if isinstance(values, str):
        values = [values]
    items: list[str] = []
    for v in values:
        items.extend(x.strip() for x in str(v).split(",") if x.strip())
    return items


def resolve_classes(values: str | Sequence[str], class_names: Sequence[str],
                    source: str = "the detector") -> list[tuple[int, str]]:
    """``(class id, name)`` of each requested character in request order, duplicates dropped. ``all`` = every class.
    A name matches exactly first, then a class id; unknown items are one ``ConfigError`` naming each of them."""
    items = parse_class_list(values)
    if not items:
        raise ConfigError("--classes is empty: give 'all' or class names / ids of the detector (comma or space "
                          "separated)")
    names = list(class_names)
    if [i.lower() for i in items] == ["all"]:
        return list(enumerate(names))
    picked: list[int] = []
    unknown: list[str] = []

    def one(item: str) -> int | None:
        if item in names:
            return names.index(item)
        try:
            idx = int(item)
        except ValueError:
            return None
        return idx if 0 <= idx < len(names) else None

    for item in items:
        idx = one(item)
        if idx is None and any(c.isspace() for c in item):  # "akari botan" given as one argument
            parts = [one(p) for p in item.split()]
            if all(p is not None for p in parts):
                picked.extend(p for p in parts if p is not None)
                continue
        if idx is None:
            unknown.append(item)
        else:
            picked.append(idx)
    if unknown:
        listing = ", ".join(f"{i}={n}" for i, n in enumerate(names[:30])) + (" ..." if len(names) > 30 else "")
        raise ConfigError(f"--classes: {', '.join(repr(u) for u in unknown)} "
                          f"{'is not a class' if len(unknown) == 1 else 'are not classes'} of {source} "
                          f"({len(names)} classes, ids 0 to {len(names) - 1}: {listing})")
    seen: set[int] = set()
    return [(i, names[i]) for i in picked if not (i in seen or seen.add(i))]


def detector_classes(path: str | Path) -> list[str]:
    """The class names of a detector (classifier) model file; ``CheckpointError`` for anything else."""
    meta = read_metadata(path)
    if meta.get("kind", "classifier") != "classifier" or not isinstance(meta.get("class_names"), list):
        raise CheckpointError(f"{path}: holds a '{meta.get('kind')}' model, not a classifier; --detection-model "
                              "needs the detector's model file (written by `animeai train detector`)")
    return list(meta["class_names"])


def check_judge(judge: str | Path, detector: str | Path, characters: Sequence[str]) -> None:
    """The judge must be a classifier that knows every character and must not be the guiding detector (same file
    content or same weights: :func:`animeai.gen_eval.check_judge`, as ``evaluate-generator`` checks it); the
    generator is trained to please that one, so it cannot grade its own student."""
    from animeai.gen_eval import check_judge as check_independent

    check_independent(judge, {"detection_model": str(detector)}, "trained here")
    names = detector_classes(judge)
    missing = [c for c in characters if c not in names]
    if missing:
        raise ConfigError(f"--judge {judge} does not know {', '.join(repr(m) for m in missing)} (classes are matched "
                          f"by name); its classes: {', '.join(names[:30])}{' ...' if len(names) > 30 else ''}")


# ------------------------------------------------------------------------------------------ the judge


class JudgeScorer:
    """Scores a generator task's EMA generator by an independent judge classifier (:func:`animeai.generation.
    judge_scores`): ``samples`` images from fixed noise (``seed``, not the task's own fixed noise).

    As a sweep's ``metrics_fn`` it runs at the task's evaluation epochs (those whose metrics carry ``eval_s``).
    Picklable: the judge model is loaded lazily in the process that scores."""

    def __init__(self, judge: str | Path, samples: int = 64, seed: int = 1234):
        if samples < 1:
            raise ValueError(f"--judge-samples must be >= 1, got {samples}")
        self.judge, self.samples, self.seed = str(judge), int(samples), int(seed)
        self._model = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def __call__(self, metrics: dict[str, Any], task) -> dict[str, float]:
        return self.score(task) if "eval_s" in metrics else {}

    def score(self, task) -> dict[str, float]:
        import torch

        from animeai.generation import judge_scores, load_judge

        device = task.accelerator.device
        if self._model is None:
            self._model = load_judge(self.judge, device)
        g = torch.Generator().manual_seed(self.seed)
        z = torch.randn(self.samples, task.cfg.model.z_dim, generator=g).to(device)
        return judge_scores(task.sample(z), self._model, task.character)


# ------------------------------------------------------------------------------------------ one character


def character_config(cfg: GeneratorConfig, character: str, out_dir: str | Path, runs_dir: str | Path, *,
                     use_gpu: bool = False) -> GeneratorConfig:
    """The config of one character's run: ``<out_dir>/<character>.pth``, run folder ``<runs_dir>/<character>/``;
    sample grids go to ``<sample.folder>/<character>/`` (the task adds the character)."""
    return with_overrides(cfg, {
        "guide.target_class": character, "run.out": str(Path(out_dir) / f"{character}.pth"),
        "run.run_dir": str(Path(runs_dir) / character), "run.progress": False, "run.cpu": not use_gpu,
    })


def train_character(job: dict[str, Any]) -> dict[str, Any]:
    """Train one character's generator in this process (the body of each fan-out task; runs without Ray too).

    ``job``: ``cfg`` (GeneratorConfig as a dict), ``attempt`` (1-based), ``threads`` (torch intra-op threads),
    ``judge`` / ``judge_samples`` (optional independent judge). Returns the summary row of a trained character."""
    import torch

    from animeai.engine import make_accelerator, train
    from animeai.runs import STATE_DIR, TRAINER_STATE
    from animeai.tasks.generator import GeneratorTask

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    cfg = from_dict(GeneratorConfig, job["cfg"])
    attempt = int(job.get("attempt", 1))
    has_state = (cfg.run.resolved_run_dir() / STATE_DIR / TRAINER_STATE).is_file()
    if attempt > 1 or cfg.run.resume:
        # A retry (or a re-run of the job with --resume) continues the character's run from its saved state; with
        # none saved yet, a retry starts the character over (its folder holds only the failed attempt's files).
        over = {"run.resume": True, "run.overwrite": False} if has_state else \
            {"run.resume": False, "run.overwrite": attempt > 1 or cfg.run.overwrite}
        cfg = with_overrides(cfg, over)
    print(f"generator '{job['character']}': attempt {attempt}{' (resuming)' if cfg.run.resume else ''} on "
          f"{socket.gethostname()} pid {os.getpid()}, {torch.get_num_threads()} thread(s)", flush=True)
    t0 = time.perf_counter()
    task = GeneratorTask(cfg)
    result = train(cfg, task, make_accelerator(cfg.run))
    scores = {k: result.best_metrics.get(k) for k in GUIDE_SCORES}
    if job.get("judge"):
        scores.update(JudgeScorer(job["judge"], job.get("judge_samples", 64)).score(task))
    return {"character": task.character, "class_id": task.class_id, "epochs": int(result.best_metrics.get("epoch", 0)),
            "scores": scores, "model": str(result.model_path), "run_dir": str(result.run_dir),
            "samples": str(task.last_grid) if task.last_grid else None, "seconds": time.perf_counter() - t0,
            "resumed": cfg.run.resume}


@ray.remote(max_retries=0)  # the driver retries (see the module docstring); resources are set per submission
def _run_character(train_fn: Callable[[dict[str, Any]], dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
    return train_fn(job)


# ------------------------------------------------------------------------------------------ the fan-out


@dataclass(frozen=True)
class FanoutOptions:
    cpus_per_generator: float = 1.0
    gpus_per_generator: float = 0.0
    threads_per_generator: int | None = None  # torch threads; default max(1, floor(cpus_per_generator))
    max_retries: int = 1
    check_resources: bool = True
    judge: str | None = None
    judge_samples: int = 64

    def threads(self) -> int:
        return self.threads_per_generator or max(1, math.floor(self.cpus_per_generator))


def check_fanout_resources(opts: FanoutOptions) -> None:
    """Fail fast instead of queueing generators that no node can ever place."""
    from animeai.distributed.trainer import DistributedError

    total = ray.cluster_resources()
    if opts.cpus_per_generator > total.get("CPU", 0.0):
        raise DistributedError(f"one generator needs {opts.cpus_per_generator:g} CPUs but the cluster has "
                               f"{total.get('CPU', 0.0):g}; lower --cpus-per-generator (or --no-resource-check on an "
                               "autoscaling cluster)")
    if opts.gpus_per_generator > 0 and opts.gpus_per_generator > total.get("GPU", 0.0):
        raise DistributedError(f"one generator needs {opts.gpus_per_generator:g} GPUs but the cluster has "
                               f"{total.get('GPU', 0.0):g} (or --no-resource-check on an autoscaling cluster)")


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def train_generators(
    cfg: GeneratorConfig,
    characters: Sequence[str],
    out_dir: str | Path,
    runs_dir: str | Path,
    opts: FanoutOptions = FanoutOptions(),
    *,
    train_fn: Callable[[dict[str, Any]], dict[str, Any]] = train_character,
    log: Callable[[str], None] = lambda msg: print(msg, flush=True),
) -> list[dict[str, Any]]:
    """Train one generator per character concurrently on the connected Ray cluster; return one summary row per
    character (input order): ``status`` ``ok`` or ``failed``, ``attempts``, ``errors`` (one per failed attempt),
    and for a trained one its epochs, scores, model file, run folder, last sample grid and seconds."""
    from animeai.distributed.trainer import connect

    if not ray.is_initialized():
        connect()
    if opts.check_resources:
        check_fanout_resources(opts)
    use_gpu = opts.gpus_per_generator > 0
    rows: dict[str, dict[str, Any]] = {
        c: {"character": c, "status": "pending", "attempts": 0, "errors": []} for c in characters}
    configs = {c: to_dict(character_config(cfg, c, out_dir, runs_dir, use_gpu=use_gpu)) for c in characters}
    pending: dict[Any, tuple[str, int, float]] = {}

    def submit(character: str, attempt: int) -> None:
        job = {"cfg": configs[character], "character": character, "attempt": attempt, "threads": opts.threads(),
               "judge": opts.judge, "judge_samples": opts.judge_samples}
        ref = _run_character.options(num_cpus=opts.cpus_per_generator, num_gpus=opts.gpus_per_generator,
                                     name=f"generator:{character}").remote(train_fn, job)
        pending[ref] = (character, attempt, time.perf_counter())
        rows[character]["attempts"] = attempt

    for c in characters:
        submit(c, 1)
    finished = 0
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        character, attempt, started = pending.pop(ref)
        row = rows[character]
        try:
            out = ray.get(ref)
        except Exception as exc:  # the task raised (RayTaskError), or its worker died, or the task was lost
            err = _error_text(exc)
            row["errors"].append(err)
            if attempt <= opts.max_retries:
                log(f"{character}: attempt {attempt} failed ({err}); retrying ({attempt}/{opts.max_retries} retries)")
                submit(character, attempt + 1)
                continue
            row.update(status="failed", error=err, wall_s=time.perf_counter() - started)
            finished += 1
            log(f"[{finished}/{len(rows)}] {character}: failed after {attempt} attempt(s): {err}")
            continue
        row.update(out, status="ok", error=None, wall_s=time.perf_counter() - started)
        finished += 1
        log(f"[{finished}/{len(rows)}] {character}: ok, {row['epochs']} epochs in {row['seconds']:.1f} s"
            f"{f' (attempt {attempt})' if attempt > 1 else ''}; {row['model']}")
    return [rows[c] for c in characters]


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The fan-out's summary as a text table (guiding scores, the judge's when it was asked for)."""
    scores = [*GUIDE_SCORES, *(k for k in JUDGE_SCORES if any(k in (r.get("scores") or {}) for r in rows))]
    header = ["character", "status", "tries", "epochs", *scores, "seconds", "model", "error"]

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [[r["character"], r["status"], str(r["attempts"]), num(r.get("epochs")),
              *(num((r.get("scores") or {}).get(k)) for k in scores), num(r.get("seconds")), r.get("model") or "-",
              (r.get("error") or "")[:100]] for r in rows]
    widths = [max(len(h), *(len(v[i]) for v in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths]), *(fmt.format(*v) for v in lines)])


# ------------------------------------------------------------------------------------------ jobs/train_generators.py


def _add_original_flags(p: argparse.ArgumentParser, *, epochs_dest: str = "run.epochs") -> None:
    g = p.add_argument_group("the original design's flag names")
    g.add_argument("--detection_model", dest="guide.detection_model", default=argparse.SUPPRESS, metavar="PATH",
                   help="same as --detection-model")
    g.add_argument("--num_epochs", "--num-epochs", dest=epochs_dest, type=int, default=argparse.SUPPRESS,
                   metavar="N", help="same as --epochs")


def build_fanout_parser() -> argparse.ArgumentParser:
    from animeai.config import add_config_arguments

    p = argparse.ArgumentParser(
        description="Train one generator per character concurrently on a Ray cluster (one Ray task per character, "
        "fractional CPUs/GPUs each; the same engine.train as jobs/generate_from_detection.py). Submit with: "
        "ray job submit --working-dir . -- python jobs/train_generators.py --classes all --detection-model "
        "/shared/models/character_classifier.pth --data /shared/all_characters --out-dir /shared/models/generators "
        "--runs-dir /shared/runs/generators --samples-dir /shared/generated_images",
        epilog=PATHS_HELP.replace("(--out, --storage-path)", "(--out-dir, --runs-dir, --samples-dir, --summary-out)")
        + " Each character writes <out-dir>/<character>.pth, <runs-dir>/<character>/ and "
        "<samples-dir>/<character>/samples_epoch_N.png. Exit status 1 when a character failed (after its retries).",
    )
    p.add_argument("--config", metavar="YAML", help="YAML file of generator config sections (flags given here win)")
    add_config_arguments(p, GeneratorConfig)
    _add_original_flags(p)
    f = p.add_argument_group("fan-out options")
    f.add_argument("--classes", nargs="+", default=["all"], metavar="NAME_OR_ID",
                   help="characters to train: all (default), or class names / ids of the detector, separated by "
                   "commas or spaces")
    f.add_argument("--out-dir", default=None, help="one model file per character: <out-dir>/<character>.pth "
                   "(default: models/generators)")
    f.add_argument("--runs-dir", default=None, help="one run folder per character: <runs-dir>/<character>/ "
                   "(default: runs/generators)")
    f.add_argument("--summary-out", default=None, help="the summary table as JSON (default: <runs-dir>/summary.json)")
    f.add_argument("--cpus-per-generator", type=float, default=1.0,
                   help="CPUs reserved per generator, fractions allowed (default: 1)")
    f.add_argument("--gpus-per-generator", type=float, default=0.0,
                   help="GPUs per generator, fractions allowed: 0.25 = 4 generators per GPU (default: 0 = CPU)")
    f.add_argument("--threads-per-generator", type=int, default=None,
                   help="torch intra-op threads per generator (default: --cpus-per-generator rounded down, at least 1)")
    f.add_argument("--max-retries", type=int, default=1,
                   help="run a failed character again up to N times, from its last saved state when it has one "
                   "(default: 1)")
    f.add_argument("--judge", default=None, metavar="PATH",
                   help="an independent judge classifier (trained separately from the detector): adds its "
                   "recognition rate of each generator's samples to the summary")
    f.add_argument("--judge-samples", type=int, default=64, help="samples the judge scores per generator (default: 64)")
    f.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    f.add_argument("--no-resource-check", dest="check_resources", action="store_false",
                   help="skip the check that one generator fits the cluster (autoscaling clusters)")
    f.add_argument("--smoke-test", "--smoke_test", action="store_true",
                   help="tiny generated characters, a quickly trained tiny detector, 10 short epochs at 32 px for "
                   "each of 3 characters (about a minute on 2 CPUs)")
    return p


def _refuse_per_character_flags(args: argparse.Namespace) -> None:
    for dest, flag, instead in (("run.out", "--out", "--out-dir"), ("run.run_dir", "--run-dir", "--runs-dir"),
                                ("guide.target_class", "--target-class", "--classes")):
        if hasattr(args, dest):
            raise ConfigError(f"{flag} names one character's output; with one generator per character use {instead}")


def _existing_outputs(characters: Sequence[str], out_dir: Path, runs_dir: Path) -> list[str]:
    from animeai.runs import RUN_FILES

    found = []
    for c in characters:
        if (out_dir / f"{c}.pth").exists():
            found.append(str(out_dir / f"{c}.pth"))
        found.extend(str(runs_dir / c / n) for n in RUN_FILES if (runs_dir / c / n).exists())
    return found


def train_generators_main(argv: list[str] | None = None) -> int:
    """``jobs/train_generators.py``: check everything, fan out one generator per character, report."""
    from animeai.config import config_from_args
    from animeai.distributed import trainer
    from animeai.generation import SMOKE_OVERRIDES, make_smoke_setup

    args = build_fanout_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="animeai-generators-smoke-")) if args.smoke_test else None
    out_dir = args.out_dir or (str(work / "models") if work else "models/generators")
    runs_dir = args.runs_dir or (str(work / "runs") if work else "runs/generators")
    samples = getattr(args, "sample.folder", None) or (str(work / "generated_images") if work else "generated_images")
    summary_out = args.summary_out or str(Path(runs_dir) / "summary.json")
    try:
        _refuse_per_character_flags(args)
        if args.max_retries < 0:
            raise ConfigError(f"--max-retries must be >= 0, got {args.max_retries}")
        if args.cpus_per_generator <= 0 or args.gpus_per_generator < 0:
            raise ConfigError("--cpus-per-generator must be > 0 and --gpus-per-generator >= 0")
        if args.judge_samples < 1:
            raise ConfigError(f"--judge-samples must be >= 1, got {args.judge_samples}")
        if not parse_class_list(args.classes):  # before the smoke test trains anything
            resolve_classes(args.classes, [])
        cfg = config_from_args(GeneratorConfig, args, args.config)
        inputs = {} if work else {"--data": cfg.data.root, "--detection-model": cfg.guide.detection_model}
        inputs["--judge"] = args.judge
        paths = job_paths({"--out-dir": out_dir, "--runs-dir": runs_dir, "--samples-dir": samples,
                           "--summary-out": summary_out}, inputs,
                          examples={"--out-dir": "/shared/models/generators", "--runs-dir": "/shared/runs/generators",
                                    "--samples-dir": "/shared/generated_images",
                                    "--summary-out": "/shared/runs/generators/summary.json"})
        if work:
            smoke = make_smoke_setup(work)
            over = {**SMOKE_OVERRIDES, "data.root": str(smoke["data"]), "guide.detection_model": str(smoke["detector"])}
            over.update({k: getattr(args, k) for k in ("run.epochs",) if hasattr(args, k)})
            cfg = with_overrides(cfg, over)
        else:
            cfg = with_overrides(cfg, {"data.root": paths["--data"],
                                       "guide.detection_model": paths["--detection-model"]})
        cfg = with_overrides(cfg, {"sample.folder": paths["--samples-dir"]})
        if not Path(cfg.guide.detection_model).is_file():
            raise ConfigError(f"--detection-model {cfg.guide.detection_model}: no such file (the detector's model "
                              "file, written by `animeai train detector`)")
        chosen = resolve_classes(args.classes, detector_classes(cfg.guide.detection_model),
                                 f"the detector {cfg.guide.detection_model}")
        characters = [name for _, name in chosen]
        if args.judge:
            check_judge(paths["--judge"], cfg.guide.detection_model, characters)
        if not (cfg.run.overwrite or cfg.run.resume):
            existing = _existing_outputs(characters, Path(paths["--out-dir"]), Path(paths["--runs-dir"]))
            if existing:
                more = " ..." if len(existing) > 4 else ""
                raise ConfigError(f"earlier outputs exist ({', '.join(existing[:4])}{more}): pass --overwrite to "
                                  "train those characters over, --resume to continue their "
                                  "runs, or choose another --out-dir / --runs-dir")
    except (ConfigError, CheckpointError, JobPathError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    opts = FanoutOptions(cpus_per_generator=args.cpus_per_generator, gpus_per_generator=args.gpus_per_generator,
                         threads_per_generator=args.threads_per_generator, max_retries=args.max_retries,
                         check_resources=args.check_resources, judge=paths.get("--judge"),
                         judge_samples=args.judge_samples)
    print(f"training {len(characters)} generator(s): {', '.join(characters)}; {opts.cpus_per_generator:g} CPU"
          f"{f' + {opts.gpus_per_generator:g} GPU' if opts.gpus_per_generator else ''} and {opts.threads()} thread(s) "
          f"each, up to {opts.max_retries} retries", flush=True)
    t0 = time.perf_counter()
    try:
        trainer.connect(args.address)
        rows = train_generators(cfg, characters, paths["--out-dir"], paths["--runs-dir"], opts)
    except trainer.DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "characters": rows, "ok": sum(r["status"] == "ok" for r in rows),
        "failed": sum(r["status"] != "ok" for r in rows), "seconds": time.perf_counter() - t0,
        "detection_model": cfg.guide.detection_model, "data": cfg.data.root, "judge": opts.judge,
        "out_dir": paths["--out-dir"], "runs_dir": paths["--runs-dir"], "samples_dir": paths["--samples-dir"],
        "resources": {"cpus_per_generator": opts.cpus_per_generator, "gpus_per_generator": opts.gpus_per_generator,
                      "threads_per_generator": opts.threads(), "max_retries": opts.max_retries},
    }
    print(format_summary(rows))
    out = Path(paths["--summary-out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    print(f"{summary['ok']} of {len(rows)} generators trained in {summary['seconds']:.0f} s; summary: {out}")
    return 0 if summary["failed"] == 0 else 1


# ------------------------------------------------------------------------------------------ jobs/sweep_generator.py


def build_generator_sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Ray Tune sweep over the generator's loss weights (loss.adv, loss.cls, loss.perc), ASHA early "
        "stopping, trials ranked by an independent judge's recognition rate of the samples (never by the losses "
        "or the guiding detector). Submit with: ray job submit --working-dir . -- python jobs/sweep_generator.py "
        "--data /shared/all_characters --detection-model /shared/models/character_classifier.pth --judge "
        "/shared/models/judge.pth --target-class akari --out /shared/sweep_generator.json --storage-path /shared/ray",
        epilog=PATHS_HELP,
    )
    p.add_argument("--sweep", default=str(DEFAULT_SWEEP), metavar="YAML",
                   help="sweep file (task: generator; metric: a judge_ score; base; space) (default: the shipped "
                   "animeai/configs/sweep_generator.yaml)")
    p.add_argument("--data", help="the detector's data folder (real images of the character)")
    p.add_argument("--detection-model", dest="guide.detection_model", default=argparse.SUPPRESS, metavar="PATH",
                   help="the guiding detector's model file")
    p.add_argument("--target-class", "--target_class", dest="target_class", default=None, metavar="ID_OR_NAME",
                   help="the character whose generator is swept (default: the sweep file's, else class 0)")
    p.add_argument("--judge", default=None, metavar="PATH", help="independent judge classifier (required; trained "
                   "separately from the detector: another seed, split or architecture)")
    p.add_argument("--judge-samples", type=int, default=64, help="samples the judge scores per evaluation "
                   "(default: 64)")
    p.add_argument("--epochs", type=int, default=None, help="override run.epochs (ASHA's max_t, in epochs)")
    _add_original_flags(p, epochs_dest="epochs")
    p.add_argument("--num-samples", type=int, default=4, help="trials to sample (x grid points) (default: 4)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial, fractions allowed (default: 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractions allowed (default: 0)")
    p.add_argument("--threads-per-trial", type=int, default=None,
                   help="torch threads per trial (default: --cpus-per-trial rounded down, at least 1)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as resources allow)")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA: epochs before a trial may be stopped (default: a quarter of the epochs)")
    p.add_argument("--storage-path", default=None, help="where Tune keeps results: a folder, s3://... or gs://... "
                   "(default: runs/ray; under `ray job submit`: required, absolute or a URI)")
    p.add_argument("--name", default="sweep_generator", help="experiment name (default: sweep_generator)")
    p.add_argument("--out", default="runs/sweep_generator_best.json",
                   help="results table + best weights as JSON (default: runs/sweep_generator_best.json)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--smoke-test", "--smoke_test", action="store_true",
                   help="tiny generated characters, a tiny detector and a tiny judge (another seed) trained on the "
                   "fly, 2 trials of 10 short epochs at 32 px, judged every 2nd epoch")
    return p


def check_generator_sweep(spec) -> None:
    """A generator sweep must rank trials by the independent judge, never by what trained the generator."""
    if spec.task != "generator":
        raise ConfigError(f"this sweep file is for task '{spec.task}'; jobs/sweep_generator.py sweeps the generator "
                          "(use jobs/sweep.py for other tasks)")
    if spec.metric not in JUDGE_SCORES:
        raise ConfigError(f"metric '{spec.metric}' cannot rank generators: the guiding detector's and perceptual "
                          "network's scores and the losses are what the generator was trained to please. Use "
                          f"{' or '.join(JUDGE_SCORES)} (the independent judge's view)")


def sweep_generator_main(argv: list[str] | None = None) -> int:
    """Parse, check, run the Tune sweep, print the table, write the best loss weights as JSON."""
    from animeai.distributed import trainer
    from animeai.distributed.tune import format_table, load_sweep, summarize, sweep
    from animeai.generation import SMOKE_OVERRIDES, make_smoke_setup

    args = build_generator_sweep_parser().parse_args(argv)
    try:
        if not args.smoke_test and not args.judge:
            raise ConfigError("--judge is required: the independent judge classifier whose recognition rate ranks the "
                              "trials (train one with `animeai train detector` with another --seed/--split-seed, "
                              "or another --arch)")
        inputs = {} if args.smoke_test else {"--data": args.data, "--detection-model": getattr(
            args, "guide.detection_model", None), "--judge": args.judge}
        paths = job_paths({"--out": args.out, "--storage-path": args.storage_path or trainer.DEFAULT_STORAGE}, inputs,
                          uri_ok=("--storage-path",), examples={"--out": "/shared/sweep_generator.json",
                                                                "--storage-path": "/shared/ray"})
        spec = load_sweep(args.sweep)
        check_generator_sweep(spec)
        base = from_dict(GeneratorConfig, spec.base)
        extra: dict[str, Any] = {}
        if args.smoke_test:
            smoke = make_smoke_setup(judge=True)
            extra.update({**SMOKE_OVERRIDES, "run.eval_every": 2})  # the judge scores every 2nd epoch
            paths.update({"--data": str(smoke["data"]), "--detection-model": str(smoke["detector"]),
                          "--judge": str(smoke["judge"])})
        if paths.get("--detection-model"):
            extra["guide.detection_model"] = paths["--detection-model"]
        if args.target_class is not None:
            extra["guide.target_class"] = args.target_class
        if args.epochs is not None:
            extra["run.epochs"] = args.epochs
        cfg = with_overrides(base, extra)
        data = paths.get("--data") or cfg.data.root
        from animeai.tasks.generator import resolve_character

        _, character, _ = resolve_character(cfg)
        check_judge(paths["--judge"], cfg.guide.detection_model, [character])
        scorer = JudgeScorer(paths["--judge"], args.judge_samples)
        num_samples = min(args.num_samples, 2) if args.smoke_test else args.num_samples
        grace = args.grace_period or max(1, cfg.run.epochs // 4)
        if not 1 <= grace <= cfg.run.epochs:
            raise ConfigError(f"--grace-period must be 1 to the epochs ({cfg.run.epochs}), got {grace}")
    except (ConfigError, CheckpointError, JobPathError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sweeping {', '.join(spec.space)} for '{character}': {num_samples} sample(s) of {cfg.run.epochs} epochs, "
          f"ranked by {spec.metric} of the judge {paths['--judge']}", flush=True)
    try:
        trainer.connect(args.address)
        results = sweep(spec, data=data, num_samples=num_samples, cpus_per_trial=args.cpus_per_trial,
                        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, grace_period=grace,
                        storage_path=paths["--storage-path"], name=args.name, extra_overrides=extra,
                        metrics_fn=scorer,
                        threads_per_trial=args.threads_per_trial or max(1, math.floor(args.cpus_per_trial)))
    except trainer.DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = summarize(results, spec, extra=[k for k in (*JUDGE_SCORES, *GUIDE_SCORES) if k != spec.metric])
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    loss = summary["best_config"]["loss"]
    summary.update(best_weights={f"loss.{k}": loss[k] for k in ("adv", "cls", "perc")}, character=character,
                   judge=paths["--judge"], detection_model=cfg.guide.detection_model, data=str(data),
                   note=f"trials ranked by {spec.metric} (the independent judge); the other score columns are for "
                   "information only")
    print(format_table(summary))
    out = Path(paths["--out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    best = summary["best"]
    print(f"best {spec.metric} {best[spec.metric]:.4f} with {summary['best_weights']}; wrote {out}")
    return 0
