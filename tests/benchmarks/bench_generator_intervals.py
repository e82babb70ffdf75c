"""Overhead of evaluation, sample grids and resumable-state saving in a generator run, by interval.

The original design trains a generator for thousands of short epochs (about 150 images of one character each).
This runs the same generator training (synthetic character, 150 real images, 64 px, default model sizes) with
``run.eval_every`` = ``run.save_every`` = ``sample.every`` = N for several N, and compares each with the same run
that evaluates and saves only at its last epoch: overhead = (time per epoch - that baseline) / baseline. The
default intervals of ``GeneratorRunConfig`` are chosen from this table (goal: under 5 %).

    python tests/benchmarks/bench_generator_intervals.py --threads 1             # 2 rounds x 5 settings x 40 epochs
    python tests/benchmarks/bench_generator_intervals.py --threads 1 --epochs 12 --images 64 --intervals 1,5,10
    python tests/benchmarks/bench_generator_intervals.py --quick                 # smoke run

Per-epoch time is the time between the ends of consecutive epochs (evaluation, sample grid and state saving
included; set-up and the first epoch left out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def run_once(work: Path, data: Path, detector: Path, epochs: int, every: int, tag: str, size: int) -> float:
    from animeai.config import GeneratorConfig, load_config
    from animeai.engine import train
    from animeai.tasks.generator import GeneratorTask

    cfg = load_config(GeneratorConfig, None, {
        "data.root": str(data), "data.image_size": size, "guide.detection_model": str(detector),
        "guide.target_class": "0", "guide.perceptual": "efficientnet_lite0", "guide.perceptual_pretrained": "package",
        "model.d_pretrained": "package", "run.epochs": epochs, "run.eval_every": every, "run.save_every": every,
        "sample.every": every, "sample.folder": str(work / f"samples_{tag}"), "run.progress": False,
        "run.out": str(work / f"{tag}.pth"), "run.run_dir": str(work / f"run_{tag}"), "run.overwrite": True,
    })
    stamps: list[float] = []  # after each epoch, once its evaluation, grid and state saving are done
    train(cfg, GeneratorTask(cfg), callbacks=[lambda metrics, state_dir, task: stamps.append(time.perf_counter())])
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # epochs 2..N: set-up and the first epoch's warm-up left out
    return sum(gaps) / len(gaps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(p, "bench_generator_intervals")
    p.add_argument("--epochs", type=int, default=40, help="epochs per setting (default: 40)")
    p.add_argument("--intervals", default="1,5,10,25", help="comma list of N (default: 1,5,10,25)")
    p.add_argument("--images", type=int, default=150, help="real images of the character (default: 150)")
    p.add_argument("--rounds", type=int, default=2, help="runs of every setting, interleaved (default: 2)")
    args = p.parse_args()
    _common.apply_threads(args.threads)
    from animeai.data.synthetic import make_synthetic_dataset
    from animeai.generation import train_smoke_classifier

    epochs, images, size = (args.epochs, args.images, 64)
    intervals = [int(x) for x in args.intervals.split(",")]
    if args.quick:
        epochs, images, size, intervals, args.rounds = 4, 16, 32, [1, 2], 1
    work = Path(tempfile.mkdtemp(prefix="animeai-gen-intervals-"))
    data = work / "chars"
    make_synthetic_dataset(data, num_classes=3, images_per_class=images, image_size=96, seed=0)
    detector = train_smoke_classifier(work, data)
    # Every setting once per round, the order reversed on odd rounds (drift on a shared machine hits all alike);
    # the median over rounds per setting.
    settings = [epochs, *intervals]
    times: dict[int, list[float]] = {n: [] for n in settings}
    for r in range(args.rounds):
        for n in (settings if r % 2 == 0 else settings[::-1]):
            times[n].append(run_once(work, data, detector, epochs, n, f"every{n}", size))
    base = _common.median(times[epochs])
    rows = [[f"only at the last epoch ({epochs})", base, 0.0]]
    results = {"epochs": epochs, "baseline_s": base, "baseline_runs": times[epochs]}
    for n in intervals:
        t = _common.median(times[n])
        over = (t - base) / base * 100
        results[f"every_{n}"] = {"s_per_epoch": t, "overhead_pct": over, "runs": times[n]}
        rows.append([f"every {n} epoch(s)", t, over])
    _common.print_table(["eval + samples + state saved", "s/epoch", "overhead %"], rows,
                        title=f"generator, {images} real images at {size} px, {epochs} epochs per row")
    _common.write_json(args.out, "bench_generator_intervals", vars(args) | {"images": images, "size": size},
                       results, _common.machine_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
