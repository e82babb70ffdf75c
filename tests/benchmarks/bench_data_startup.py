"""Start-up cost before epoch 1: validating N small images without a manifest, building it, reusing it.

What the detector's (and distillation's) ``setup`` does with the data before its first batch:
``animeai.data.folder.build_splits`` (list the class folders, validate every image, split). Timed:

1. ``today``: ``manifest=None``: every image is fully decoded on every run (the behaviour before manifests).
2. ``first run``: no manifest yet: every image is decoded and the manifest written.
3. ``second run``: the manifest is reused: files are listed and stat'ed, the JSON is read, nothing is decoded.
   Repeated ``--repeats`` times; median reported.
4. ``listing only``: walking the tree (no decode, no manifest): the floor of any start-up.

Each measurement runs in a fresh Python process, as a new training run would (the time of ``build_splits``
after the imports; the interpreter and import start-up is the same for every row and left out).

The images (N noise-textured JPEGs in ``--classes`` class folders) are made once, outside the repository
(``--data-dir``, default ``/tmp/animeai-bench-startup/n<N>-s<side>``) and reused by later runs; the page
cache is warm for every row (the files were just written or read), so the numbers are CPU costs, not disk
reads. Goal (issue 17): the second run starts in under 5 % of the first run's validation time.

    python tests/benchmarks/bench_data_startup.py                 # N = 100,000
    python tests/benchmarks/bench_data_startup.py --images 20000
    python tests/benchmarks/bench_data_startup.py --quick         # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, add_common_args, machine_info, median, print_table, spread, write_json

sys.path.insert(0, str(REPO_ROOT))

NAME = "bench_data_startup"
MARKER = ".bench-complete.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, NAME)
    p.add_argument("--images", type=int, default=100_000, help="number of images (default: %(default)s)")
    p.add_argument("--classes", type=int, default=100, help="class folders (default: %(default)s)")
    p.add_argument("--side", type=int, default=96, help="side of the generated JPEGs in px (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the images are made once (default: /tmp/animeai-bench-startup/n<N>-s<side>)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the second run (default: %(default)s)")
    p.add_argument("--full-repeats", type=int, default=1, help="repeats of the today / first-run pair, interleaved "
                   "(they decode every image; default: %(default)s)")
    p.add_argument("--skip-today", action="store_true", help="leave out the no-manifest row (it costs as much as "
                   "the first run)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.classes, args.side, args.repeats = 400, 8, 48, 2
    if args.data_dir is None:
        args.data_dir = Path("/tmp/animeai-bench-startup") / f"n{args.images}-s{args.side}"
    return args


def make_images(root: Path, n: int, classes: int, side: int) -> float:
    """N noise-textured JPEGs in ``classes`` folders (made once; a marker file records a complete set)."""
    marker = root / MARKER
    want = {"images": n, "classes": classes, "side": side}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return 0.0
    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        (root / f"char_{c:04d}").mkdir(exist_ok=True)

    def make(i: int) -> None:
        rng = np.random.default_rng(i)
        base = rng.integers(0, 256, size=3)
        noise = rng.integers(-40, 40, size=(side, side, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"char_{i % classes:04d}" / f"{i:07d}.jpg", quality=85)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for k, _ in enumerate(pool.map(make, range(n)), 1):
            if k % 10_000 == 0:
                print(f"  made {k:,}/{n:,} images", file=sys.stderr, flush=True)
    marker.write_text(json.dumps(want))
    return time.perf_counter() - t0


def timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def child(mode: str, root: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process: ``today``, ``manifest`` (first or second run) or ``listing``."""
    from animeai.data.folder import build_splits, find_classes, walk_files

    t0 = time.perf_counter()
    if mode == "listing":
        n = sum(len(walk_files(root / c)[0]) for c in find_classes(root))
        return {"seconds": time.perf_counter() - t0, "files": n}
    s = build_splits(root, val_fraction=0.1, split_seed=0, manifest=None if mode == "today" else "auto")
    return {"seconds": time.perf_counter() - t0, "usable": len(s.train) + len(s.val)}


def run_child(mode: str, root: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--data-dir", str(root)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], Path(sys.argv[4]))))
        return 0
    args = parse_args(argv)
    from animeai.data.manifest import MANIFEST_NAME, Manifest

    root = args.data_dir
    print(f"data: {args.images:,} JPEGs {args.side} px in {args.classes} folders under {root}", file=sys.stderr)
    made_s = make_images(root, args.images, args.classes, args.side)
    if made_s:
        print(f"  made in {made_s:.1f} s", file=sys.stderr)
    manifest_file = root / MANIFEST_NAME
    results: dict[str, Any] = {"made_images_s": made_s}

    results["listing_s"] = run_child("listing", root)["seconds"]
    today, firsts = [], []
    for k in range(args.full_repeats):  # interleaved: drift on a shared machine hits both alike
        if not args.skip_today:
            print(f"today (no manifest): decoding every image ... ({k + 1}/{args.full_repeats})", file=sys.stderr,
                  flush=True)
            today.append(run_child("today", root)["seconds"])
        manifest_file.unlink(missing_ok=True)
        print(f"first run: decoding every image into the manifest ... ({k + 1}/{args.full_repeats})",
              file=sys.stderr, flush=True)
        first = run_child("manifest", root)
        firsts.append(first["seconds"])
    if today:
        results.update(today_s=median(today), today_all_s=today)
    first_s, n_ok = median(firsts), first["usable"]
    results.update(first_run_s=first_s, first_run_all_s=firsts)
    results["manifest_bytes"] = manifest_file.stat().st_size
    second = []
    for _ in range(args.repeats):
        run = run_child("manifest", root)
        assert run["usable"] == n_ok
        second.append(run["seconds"])
    load_s, _ = timed(lambda: Manifest(root).entries())  # in this process: the JSON read alone
    results.update(second_run_s=median(second), second_run_all_s=second, second_run_spread=spread(second),
                   manifest_load_s=load_s, usable_images=n_ok, load_average=os.getloadavg())
    ratio = results["second_run_s"] / first_s
    results["second_over_first"] = ratio
    results["goal_met"] = ratio < 0.05

    per_k = 1e6 / args.images  # seconds -> ms per 1,000 images
    rows: list[list[Any]] = []
    if "today_s" in results:
        rows.append([f"today: no manifest, decode all (median of {len(today)})", results["today_s"],
                     results["today_s"] * per_k, "-"])
    rows.append([f"first run: decode all, write manifest (median of {len(firsts)})", first_s, first_s * per_k,
                 "100 %"])
    rows.append([f"second run: reuse manifest (median of {args.repeats})", results["second_run_s"],
                 results["second_run_s"] * per_k, f"{100 * ratio:.2f} %"])
    rows.append(["  of which: read the manifest JSON", load_s, load_s * per_k, "-"])
    rows.append(["listing only (walk the tree)", results["listing_s"], results["listing_s"] * per_k, "-"])
    print()
    print_table(["start-up before epoch 1", "seconds", "ms per 1k images", "of first run"],
                [[r[0], f"{r[1]:.3f}", f"{r[2]:.2f}", r[3]] for r in rows],
                title=f"{args.images:,} images ({args.side} px JPEG), {args.classes} classes, "
                      f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; manifest "
                      f"{results['manifest_bytes'] / 1e6:.1f} MB")
    print(f"\nsecond run / first run = {100 * ratio:.2f} % (goal < 5 %: {'met' if ratio < 0.05 else 'NOT met'})")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, NAME, settings, results, machine_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
