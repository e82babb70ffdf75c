"""Per-character generators on a local Ray, concurrently, vs the same generators one after another.

The same 4 generator runs (one per synthetic character, the same config and epochs) are timed four ways, in this
order, on the same machine and the same total CPUs (``--cpus``, 2 here):

    sequential, 1 thread     ``fanout.train_character`` in this process, one generator after another, 1 torch thread
    sequential, N threads    the same with ``--cpus`` torch threads (the whole machine for each generator in turn);
                             only ``--threaded-sample`` generators are run, their mean time x the generators is
                             the row's total (on a busy machine threads that fight can be 10x slower)
    ray, cold                ``fanout.train_generators`` on a fresh local Ray of ``--cpus`` CPUs: one Ray task per
                             generator with ``--cpus-per-generator`` (0.5: all 4 at once) and 1 thread each; the
                             worker processes start (and import torch) inside this timing
    ray, warm                the same again (outputs overwritten): worker processes already up

``ray.init`` is timed on its own. Ideal concurrency: the 1-thread generators packed on the ``--cpus`` cores with no
loss, ``T_ideal = sum(sequential 1-thread times) / cpus``; efficiency = ``T_ideal / T_ray`` (goal >= 90 %).
Per-generator overhead = the core-seconds lost per generator, ``(cpus * T_ray - sum(t1)) / generators``, and
Ray's own part of it, the median of (submit-to-result wall time - the task's own training time).

Run (from the repository root)::

    python tests/benchmarks/bench_generator_concurrency.py            # 4 generators x 20 epochs, 32 px
    python tests/benchmarks/bench_generator_concurrency.py --quick    # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, machine_info, median, print_table, write_json

NAME = "bench_generator_concurrency"
GOAL = 0.90


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, NAME)  # --threads is unused: every run sets its own threads
    p.add_argument("--generators", type=int, default=4, help="characters = generators (default: %(default)s)")
    p.add_argument("--images", type=int, default=16, help="real images per character (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per generator (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="generated image side (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=10, help="run.eval_every (default: %(default)s)")
    p.add_argument("--cpus", type=int, default=2, help="total CPUs: Ray's num_cpus and the N-thread run (default: 2)")
    p.add_argument("--threaded-sample", type=int, default=1,
                   help="generators timed in the N-thread sequential run (default: %(default)s; 0 = skip it)")
    p.add_argument("--cpus-per-generator", type=float, default=0.5,
                   help="Ray CPUs per generator task (default: %(default)s: 4 at once on 2 CPUs)")
    return p.parse_args(argv)


def setup(work: Path, args) -> tuple[Any, list[str]]:
    """Synthetic characters, a detector file (Lite0 offline weights, an untrained head: timing only), the config."""
    import torch

    from animeai.checkpoint import save_model_file
    from animeai.config import GeneratorConfig, load_config
    from animeai.data.synthetic import make_synthetic_dataset
    from animeai.generation import SMOKE_OVERRIDES
    from animeai.models import create_model, get_model_spec

    make_synthetic_dataset(work / "chars", num_classes=args.generators, images_per_class=args.images,
                           image_size=64, seed=0)
    names = sorted(p.name for p in (work / "chars").iterdir() if p.is_dir())
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", len(names), pretrained="package")
    spec = get_model_spec("efficientnet_lite0")
    save_model_file(work / "detector.pth", model.state_dict(), {
        "kind": "classifier", "arch": "efficientnet_lite0", "num_classes": len(names), "class_names": names,
        "image_size": 64, "mean": list(spec.mean), "std": list(spec.std)})
    cfg = load_config(GeneratorConfig, None, {
        **SMOKE_OVERRIDES, "data.root": str(work / "chars"), "guide.detection_model": str(work / "detector.pth"),
        "data.image_size": args.image_size, "optim.batch_size": args.batch_size, "run.epochs": args.epochs,
        "run.eval_every": args.eval_every, "sample.every": args.epochs, "run.overwrite": True,
        "sample.folder": str(work / "generated_images")})
    return cfg, names


def sequential(cfg, names: list[str], work: Path, threads: int) -> dict[str, Any]:
    """Train the generators of ``names`` one after another in this process; the total is scaled to ``total``."""
    from animeai.config import to_dict
    from animeai.distributed.fanout import character_config, train_character

    times = []
    t0 = time.perf_counter()
    for name in names:
        c = character_config(cfg, name, work / f"seq{threads}" / "models", work / f"seq{threads}" / "runs")
        t = time.perf_counter()
        train_character({"cfg": to_dict(c), "character": name, "attempt": 1, "threads": threads})
        times.append(time.perf_counter() - t)
    return {"wall_s": time.perf_counter() - t0, "per_generator_s": times, "load": os.getloadavg()[0],
            "generators_timed": len(names)}


def on_ray(cfg, names: list[str], work: Path, args, tag: str) -> dict[str, Any]:
    from animeai.distributed.fanout import FanoutOptions, train_generators

    opts = FanoutOptions(cpus_per_generator=args.cpus_per_generator, threads_per_generator=1, max_retries=0)
    t0 = time.perf_counter()
    rows = train_generators(cfg, names, work / tag / "models", work / tag / "runs", opts, log=lambda m: None)
    wall = time.perf_counter() - t0
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"generator failed: {bad[0]['error']}")
    return {"wall_s": wall, "train_s": [r["seconds"] for r in rows], "task_wall_s": [r["wall_s"] for r in rows],
            "ray_overhead_s": [r["wall_s"] - r["seconds"] for r in rows], "load": os.getloadavg()[0]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.generators, args.images, args.epochs, args.eval_every = 2, 8, 2, 1
    import ray
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-gen-conc-"))
    cfg, names = setup(work, args)
    print(f"{len(names)} generators x {args.epochs} epochs at {args.image_size} px, {args.images} images each; "
          f"data in {work}", flush=True)
    res: dict[str, Any] = {"load_start": os.getloadavg()[0]}
    print("sequential, 1 thread ...", flush=True)
    res["seq1"] = sequential(cfg, names, work, 1)
    print(f"sequential, {args.cpus} threads ({args.threaded_sample} generator(s) timed) ...", flush=True)
    if args.threaded_sample > 0:
        res["seqN"] = sequential(cfg, names[: args.threaded_sample], work, args.cpus)
        res["seqN"]["wall_s"] = sum(res["seqN"]["per_generator_s"]) / res["seqN"]["generators_timed"] * len(names)
    t = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, object_store_memory=80 * 1024**2,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, log_to_driver=False)
    res["ray_init_s"] = time.perf_counter() - t
    try:
        print("ray, cold ...", flush=True)
        res["ray_cold"] = on_ray(cfg, names, work, args, "ray_cold")
        print("ray, warm ...", flush=True)
        res["ray_warm"] = on_ray(cfg, names, work, args, "ray_warm")
    finally:
        ray.shutdown()
    n, cpus = len(names), args.cpus
    sum_t1 = sum(res["seq1"]["per_generator_s"])
    ideal = sum_t1 / min(cpus, n)
    rows = [["sequential, 1 thread", res["seq1"]["wall_s"], median(res["seq1"]["per_generator_s"]), "-", "-", "-",
             res["seq1"]["load"]]]
    if "seqN" in res:
        timed = res["seqN"]["generators_timed"]
        rows.append([f"sequential, {cpus} threads" + (f" ({timed} timed, x{n / timed:g})" if timed < n else ""),
                     res["seqN"]["wall_s"], median(res["seqN"]["per_generator_s"]), "-", "-", "-", res["seqN"]["load"]])
    for key, label in (("ray_cold", "ray, cold workers"), ("ray_warm", "ray, warm workers")):
        r = res[key]
        r["efficiency"] = ideal / r["wall_s"]
        r["speedup_vs_seqN"] = res["seqN"]["wall_s"] / r["wall_s"] if "seqN" in res else None
        r["overhead_core_s_per_generator"] = (cpus * r["wall_s"] - sum_t1) / n
        speedup = "-" if r["speedup_vs_seqN"] is None else f"{r['speedup_vs_seqN']:.2f}x"
        rows.append([label, r["wall_s"], median(r["train_s"]), f"{100 * r['efficiency']:.0f}%", speedup,
                     f"{r['overhead_core_s_per_generator']:.1f} / {median(r['ray_overhead_s']):.1f}", r["load"]])
    res["ideal_s"] = ideal
    print()
    table = print_table(["run", "wall s", "per gen s", "vs ideal", "vs seq N thr", "overhead/gen s (all / ray)",
                         "load"], rows, title=f"{n} generators, {cpus} CPUs, ideal concurrent wall {ideal:.1f} s "
                         f"(= sum of 1-thread times / {min(cpus, n)}); ray.init {res['ray_init_s']:.1f} s")
    res["table"] = table
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(args.out, NAME, settings, res, machine_info())
    ok = res["ray_warm"]["efficiency"] >= GOAL
    print(f"goal >= {GOAL:.0%} of ideal concurrency (warm): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
