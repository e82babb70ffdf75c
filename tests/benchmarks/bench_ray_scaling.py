"""Ray Train on CPU vs the bare engine: fixed start-up cost, per-epoch cost and 2-worker scaling, in one run.

Four runs of the same ``DetectorTask`` config on the same synthetic data (generated once in a temporary folder),
one after the other in this order:

    bare          ``animeai.engine.train`` in this process, torch's default threads (2 on a 2-core machine)
    bare 1 thread the same with ``torch.set_num_threads(1)``: like-for-like with one Ray worker
    ray 1 worker  ``animeai.distributed.trainer.fit`` with ``DistributedOptions(num_workers=1)``
    ray 2 workers the same with ``num_workers=2`` (DDP over gloo, data sharded, batch size per process)

``ray.init`` (a local Ray, as in tests/test_distributed.py) runs once between the bare and the Ray runs and is
its own row. For each run the wall-clock total is split with timestamps taken in the training process (rank 0)
when each epoch starts (``task.train_mode(True)``, just before the engine starts its epoch timer) plus the
engine's own ``epoch_s`` (training + evaluation) from ``metrics.jsonl``::

    wall = before first epoch + sum(epoch_s) + between epochs + after last epoch
    start-up (as asked) = wall - sum(epoch_s)        (so it also holds the per-epoch state saving / Ray reporting)

Per-epoch figures are medians over the epochs after the first (a warm-up). ``images_per_s`` is the engine's
training-phase rate; under Ray it is already global: engine.py all-reduces the per-rank image counts
(``accelerator.reduce(..., "sum")``) and divides by rank 0's training time. Ray gives each 1-CPU worker
``OMP_NUM_THREADS=1`` (recorded per worker), so the bare run uses 2 torch threads and each worker 1: the
"bare 1 thread" row is the like-for-like reference for one worker. Goal: one Ray worker costs at most 5 % more
per epoch than the bare engine.

Run (from the repository root)::

    python tests/benchmarks/bench_ray_scaling.py           # 8 classes x 60 images, 96 px, batch 16, 4 epochs
    python tests/benchmarks/bench_ray_scaling.py --quick   # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, machine_info, median, print_table, write_json

NAME = "bench_ray_scaling"
GOAL_PCT = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, NAME)  # --threads applies to the "bare" run only
    p.add_argument("--arch", default="efficientnet_lite0", help="model registry name (default: %(default)s)")
    p.add_argument("--pretrained", default="package", help="weights source (default: %(default)s)")
    p.add_argument("--classes", type=int, default=8, help="synthetic classes (default: %(default)s)")
    p.add_argument("--images-per-class", type=int, default=60,
                   help="generated images per class, train + val (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held out per class (default: %(default)s)")
    p.add_argument("--source-size", type=int, default=128, help="side of the generated JPEGs (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=96, help="network input side (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="per process (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run, first = warm-up (default: %(default)s)")
    p.add_argument("--ray-workers", default="1,2", help="Ray Train worker counts to run (default: %(default)s)")
    p.add_argument("--ray-cpus", type=int, default=2, help="ray.init(num_cpus=...) (default: %(default)s)")
    p.add_argument("--object-store-mb", type=int, default=80, help="ray.init object store (default: %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.images_per_class, args.source_size, args.image_size = 4, 20, 64, 64
        args.batch_size, args.epochs = 8, 2
    args.ray_workers = [int(x) for x in str(args.ray_workers).split(",") if x.strip()]
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    return args


def make_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from animeai.data.synthetic import make_synthetic_dataset

    t0 = time.perf_counter()
    make_synthetic_dataset(root, num_classes=args.classes, images_per_class=args.images_per_class,
                           image_size=args.source_size, seed=0, val_fraction=args.val_fraction)
    count = {s: sum(1 for _ in (root / s).rglob("*.jpg")) for s in ("train", "val")}
    return {"train_images": count["train"], "val_images": count["val"], "generate_s": time.perf_counter() - t0}


def make_cfg(args: argparse.Namespace, data_root: Path, work: Path):
    from animeai.config import DetectorConfig, load_config

    return load_config(DetectorConfig, None, {
        "data.root": str(data_root),
        "data.image_size": args.image_size,
        "data.num_workers": args.num_workers,
        "model.arch": args.arch,
        "model.pretrained": args.pretrained,
        "optim.batch_size": args.batch_size,
        "run.epochs": args.epochs,
        "run.cpu": True,
        "run.out": str(work / "model.pth"),
        "run.run_dir": str(work / "run"),
        "run.progress": False,
    })


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ Ray worker


def timed_train_func(config: dict[str, Any]) -> None:
    """Ray Train worker: the library's ``run_worker`` plus epoch-start timestamps and the thread settings.

    Self-contained (Ray ships it to the workers by value); writes ``<scratch>/<run name>.timing.rank<r>.json``."""
    import json as _json
    import os as _os
    import time as _time
    from pathlib import Path as _Path

    import ray.train
    import torch

    from animeai.distributed.trainer import run_worker
    from animeai.tasks.detector import DetectorTask

    rank = ray.train.get_context().get_world_rank()
    out = _Path(config["scratch_dir"]) / f"{config['run_name']}.timing.rank{rank}.json"
    info: dict[str, Any] = {"rank": rank, "pid": _os.getpid(), "entered": _time.time(),
                            "torch_threads": torch.get_num_threads(),
                            "OMP_NUM_THREADS": _os.environ.get("OMP_NUM_THREADS"), "epoch_starts": []}
    original = DetectorTask.train_mode

    def train_mode(self, mode: bool = True) -> None:
        if mode:  # the engine calls train_mode(True) right before it starts the epoch timer
            info["epoch_starts"].append(_time.time())
        original(self, mode)

    DetectorTask.train_mode = train_mode  # this worker process only

    def record(metrics, state_dir, task) -> None:
        info["world"] = task.accelerator.num_processes
        info.setdefault("epochs", []).append({k: metrics.get(k) for k in ("epoch", "epoch_s", "images_per_s")})
        out.write_text(_json.dumps(info))

    run_worker(config, callbacks=[record])
    out.write_text(_json.dumps(info))


# ------------------------------------------------------------------------------------------ runs


def run_bare(args: argparse.Namespace, data_root: Path, work: Path, threads: int | None) -> dict[str, Any]:
    """``engine.train`` in this process (``threads``: torch.set_num_threads for the run, None = unchanged)."""
    import torch

    from animeai.engine import make_accelerator, train
    from animeai.tasks.detector import DetectorTask

    starts: list[float] = []

    class TimedTask(DetectorTask):
        def train_mode(self, mode: bool = True) -> None:
            if mode:
                starts.append(time.time())
            super().train_mode(mode)

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = make_cfg(args, data_root, work)
        used = torch.get_num_threads()
        t0 = time.time()
        accelerator = make_accelerator(cfg.run)
        result = train(cfg, TimedTask(cfg), accelerator)
        t1 = time.time()
    finally:
        torch.set_num_threads(before)
    history = read_jsonl(Path(cfg.run.run_dir) / "metrics.jsonl")
    assert len(history) == len(result.history) == args.epochs
    return {"processes": 1, "torch_threads": [used], "t_start": t0, "t_end": t1, "epoch_starts": starts,
            "history": history}


def run_ray(args: argparse.Namespace, data_root: Path, work: Path, workers: int) -> dict[str, Any]:
    from animeai.distributed.trainer import DistributedOptions, fit

    name = f"ray-w{workers}"
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    cfg = make_cfg(args, data_root, work)
    opts = DistributedOptions(num_workers=workers, storage_path=str(work / "ray"), name=name)
    t0 = time.time()
    result = fit("detector", cfg, opts, train_func=timed_train_func, scratch_dir=str(scratch))
    t1 = time.time()
    history = read_jsonl(scratch / name / "metrics.jsonl")  # written by rank 0
    assert len(history) == args.epochs, history
    ranks = [json.loads((scratch / f"{name}.timing.rank{r}.json").read_text()) for r in range(workers)]
    assert all(r.get("world") == workers for r in ranks), ranks
    return {"processes": workers, "torch_threads": [r["torch_threads"] for r in ranks],
            "omp_num_threads": [r["OMP_NUM_THREADS"] for r in ranks], "t_start": t0, "t_end": t1,
            "epoch_starts": ranks[0]["epoch_starts"], "workers_entered_after_s": [r["entered"] - t0 for r in ranks],
            "history": history, "rank_timing": ranks,
            "ray_result_metrics": {k: v for k, v in (result.metrics or {}).items()
                                   if isinstance(v, (int, float, str, bool))}}


def analyse(run: dict[str, Any]) -> dict[str, Any]:
    """Split the wall-clock total; per-epoch medians over the epochs after the first."""
    hist, starts = run["history"], run["epoch_starts"]
    n = len(hist)
    assert len(starts) == n, (len(starts), n)
    epoch_s = [float(m["epoch_s"]) for m in hist]
    eval_s = [float(m["eval_s"]) for m in hist]
    ips = [float(m["images_per_s"]) for m in hist]
    ends = [s + e for s, e in zip(starts, epoch_s)]
    gaps = [starts[k] - ends[k - 1] for k in range(1, n)]  # state save, model file, Ray report/checkpoint
    wall = run["t_end"] - run["t_start"]
    sum_epoch = sum(epoch_s)
    med_epoch, med_gap = median(epoch_s[1:]), median(gaps)
    return {
        "wall_s": wall,
        "sum_epoch_s": sum_epoch,
        "startup_s": wall - sum_epoch,  # the asked definition: everything outside the engine's epoch timers
        "before_first_epoch_s": starts[0] - run["t_start"],
        "between_epochs_s": sum(gaps),
        "after_last_epoch_s": run["t_end"] - ends[-1],
        "between_epoch_gaps_s": gaps,
        "epoch_s": epoch_s,
        "eval_s": eval_s,
        "images_per_s": ips,
        "median_epoch_s": med_epoch,
        "median_train_s": median([e - v for e, v in zip(epoch_s[1:], eval_s[1:])]),
        "median_eval_s": median(eval_s[1:]),
        "median_images_per_s": median(ips[1:]),
        "median_gap_s": med_gap,
        "median_epoch_incl_checkpoint_s": med_epoch + med_gap,
    }


def pct(a: float, b: float) -> str:
    return f"{(a / b - 1.0) * 100.0:+.1f}%"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    runs: dict[str, dict[str, Any]] = {}
    ray_init_s = None
    with tempfile.TemporaryDirectory(prefix="animeai-bench-ray-") as tmp:
        tmp = Path(tmp)
        data_info = make_data(tmp / "data", args)
        default_threads = torch.get_num_threads()
        print(f"{NAME}: {args.arch} ({args.pretrained}) {args.image_size}px batch {args.batch_size}/process, "
              f"loader workers {args.num_workers}, {data_info['train_images']} train / {data_info['val_images']} "
              f"val images, {args.epochs} epochs per run (first = warm-up), torch threads {default_threads}, "
              f"cpus {os.cpu_count()}", flush=True)

        bare_threads = args.threads or None
        print(f"\n== bare engine ({bare_threads or default_threads} threads)", flush=True)
        runs["bare"] = run_bare(args, tmp / "data", tmp / "bare", bare_threads)
        print("\n== bare engine, torch.set_num_threads(1)", flush=True)
        runs["bare 1 thread"] = run_bare(args, tmp / "data", tmp / "bare1", 1)

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False,
                 object_store_memory=args.object_store_mb * 1024**2,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        ray_init_s = time.perf_counter() - t0
        print(f"\nray.init: {ray_init_s:.2f} s", flush=True)
        try:
            for w in args.ray_workers:
                print(f"\n== Ray Train, {w} worker(s)", flush=True)
                runs[f"ray {w} worker" + ("s" if w > 1 else "")] = run_ray(args, tmp / "data", tmp / f"ray{w}", w)
        finally:
            ray.shutdown()

    stats = {name: analyse(run) for name, run in runs.items()}
    base, base1 = stats["bare"], stats["bare 1 thread"]
    names = list(runs)

    print()
    rows = [["ray.init (once)", "-", ray_init_s, "-", "-", "-", "-", ray_init_s]]
    for name in names:
        s, r = stats[name], runs[name]
        rows.append([name, f"{r['processes']}x{'/'.join(str(t) for t in r['torch_threads'])}", s["wall_s"],
                     s["sum_epoch_s"], s["before_first_epoch_s"], s["between_epochs_s"], s["after_last_epoch_s"],
                     s["startup_s"]])
    print_table(["run", "procs x threads", "wall s", "sum epoch_s", "before 1st", "between", "after last",
                 "start-up s"], rows,
                title="wall-clock split (s); start-up = wall - sum(epoch_s) = before 1st + between + after last; "
                      "Ray start-up excludes ray.init")

    print()
    rows = []
    for name in names:
        s = stats[name]
        rows.append([name, s["median_images_per_s"], s["median_epoch_s"], s["median_train_s"], s["median_eval_s"],
                     s["median_gap_s"], f"{s['median_epoch_s'] / base['median_epoch_s']:.3f}x",
                     f"{s['median_epoch_s'] / base1['median_epoch_s']:.3f}x"])
    print_table(["run", "train img/s", "epoch_s", "train s", "eval s", "ckpt gap s", "epoch_s/bare",
                 "epoch_s/bare1t"], rows,
                title=f"per epoch (median of epochs 2..{args.epochs}; img/s global, training phase only; "
                      "ckpt gap = state save + Ray report between epochs)")

    print()
    rows = []
    for i in range(args.epochs):
        rows.append([f"{i + 1}" + (" (warm-up)" if i == 0 else "")]
                    + [f"{stats[n]['images_per_s'][i]:.1f} / {stats[n]['epoch_s'][i]:.2f}" for n in names])
    print_table(["epoch"] + names, rows, title="per epoch: train img/s / epoch_s")

    summary: dict[str, Any] = {}
    print()
    one = stats.get("ray 1 worker")
    if one is not None:
        for ref_name, ref in (("bare", base), ("bare 1 thread", base1)):
            cost = (one["median_epoch_s"] / ref["median_epoch_s"] - 1.0) * 100.0
            cost_ck = (one["median_epoch_incl_checkpoint_s"] / ref["median_epoch_incl_checkpoint_s"] - 1.0) * 100.0
            ips = (one["median_images_per_s"] / ref["median_images_per_s"] - 1.0) * 100.0
            key = ref_name.replace(" ", "_")
            summary[f"ray1_vs_{key}_epoch_cost_pct"] = cost
            summary[f"ray1_vs_{key}_epoch_cost_incl_checkpoint_pct"] = cost_ck
            summary[f"ray1_vs_{key}_images_per_s_pct"] = ips
            summary[f"ray1_vs_{key}_meets_goal"] = cost <= GOAL_PCT
            print(f"1 worker vs {ref_name} ({'/'.join(map(str, runs[ref_name]['torch_threads']))} thread(s)): "
                  f"per-epoch cost {cost:+.1f} % (incl. checkpoint gap {cost_ck:+.1f} %), training img/s {ips:+.1f} %"
                  f"   goal within {GOAL_PCT:.0f} %: {'PASS' if cost <= GOAL_PCT else 'ABOVE GOAL'}")
        print(f"1 worker fixed start-up: {one['startup_s']:.1f} s in fit() + {ray_init_s:.1f} s ray.init vs "
              f"{base['startup_s']:.1f} s bare")
    two = stats.get("ray 2 workers")
    if one is not None and two is not None:
        sp_ips = two["median_images_per_s"] / one["median_images_per_s"]
        sp_epoch = one["median_epoch_s"] / two["median_epoch_s"]
        vs_bare = base["median_epoch_s"] / two["median_epoch_s"]
        summary.update(ray2_vs_ray1_images_per_s_speedup=sp_ips, ray2_vs_ray1_epoch_speedup=sp_epoch,
                       ray2_scaling_efficiency=sp_ips / 2.0, ray2_vs_bare_epoch_speedup=vs_bare)
        print(f"2 workers vs 1 worker: training img/s x{sp_ips:.2f} (efficiency {sp_ips / 2 * 100:.0f} %), "
              f"epoch_s x{sp_epoch:.2f};  vs bare on the same 2 cores: epoch_s x{vs_bare:.2f}")
    print(f"threads: bare {runs['bare']['torch_threads'][0]}, Ray workers "
          + ", ".join(f"{n}: torch {runs[n]['torch_threads']} OMP_NUM_THREADS {runs[n]['omp_num_threads']}"
                      for n in names if n.startswith("ray")))
    if args.quick:
        print("(--quick: smoke run, the numbers are not meaningful)")

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(data_info, order=["bare", "bare 1 thread", "ray.init"] + names[2:], goal_pct=GOAL_PCT,
                    default_torch_threads=default_threads, hf_hub_offline=os.environ.get("HF_HUB_OFFLINE"),
                    data="synthetic (animeai.data.synthetic), temporary folder, train/ + val/",
                    timestamps="time.time(); epoch start: task.train_mode(True) on rank 0; epoch end: start + epoch_s")
    results = {"ray_init_s": ray_init_s, "summary": summary,
               "runs": {n: {"raw": runs[n], "derived": stats[n]} for n in names}}
    write_json(args.out, NAME, settings, results, machine_info("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
