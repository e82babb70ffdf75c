"""Decode throughput of the two data engines on the same cores (issue 17): images/s of the detector's training
transform (decode + augment + resize to --size) through the PyTorch DataLoader (--cores worker processes) and
through Ray Data (a local Ray with --cores CPUs, one CPU per decode task), per core; and how many such cores one
GPU's training speed needs (--gpu-images-per-s, default the B0 step measured on an H100: 4,579 images/s).

    python tests/benchmarks/bench_data_engines.py [--images 2000] [--cores 1 2] [--size 224]
    python tests/benchmarks/bench_data_engines.py --quick      # tiny: checks the script

The JPEGs (--source-size px, generated characters) are made once under --work (default a temp folder). Each
engine reads every image once per timed pass (an epoch); the first pass of each engine is a warm-up (worker or
Ray start, page cache) and not counted; the median of --repeats passes is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import add_common_args, machine_info, print_table, write_json

NAME = "bench_data_engines"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, NAME)
    p.add_argument("--images", type=int, default=2000, help="images per pass (default: %(default)s)")
    p.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="decode cores to compare (default: 1 2)")
    p.add_argument("--size", type=int, default=224, help="training input side (default: %(default)s)")
    p.add_argument("--source-size", type=int, default=320, help="side of the generated JPEGs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting (default: %(default)s)")
    p.add_argument("--gpu-images-per-s", type=float, default=4579.0,
                   help="training speed to feed (default: the H100 B0 step, %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="where the JPEGs go (default: a temp folder)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.cores, args.size, args.source_size, args.repeats, args.batch_size = 64, [1], 64, 96, 1, 16
    return args


def dataset(args, work: Path):
    from animeai.data.folder import ImageFolderDataset, build_splits
    from animeai.data.synthetic import make_synthetic_dataset
    from animeai.data.transforms import train_transform

    root = work / f"jpegs_{args.images}_{args.source_size}"
    if not root.exists():
        per_class = max(2, args.images // 8)
        make_synthetic_dataset(root, num_classes=8, images_per_class=per_class, image_size=args.source_size, seed=0)
    splits = build_splits(root, val_fraction=0.0, require_val=False, manifest="off")
    mean = std = (0.5, 0.5, 0.5)
    return ImageFolderDataset(splits.train[: args.images], train_transform(args.size, mean, std),
                              draft_size=args.size)


def dataloader_pass(ds, cores: int, batch_size: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=cores,
                        generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    n = sum(len(labels) for _, labels in loader)
    return n / (time.perf_counter() - t0)


def ray_pass(ds, batch_size: int, epoch: int) -> float:
    from animeai.distributed.ray_data import RayDataLoader

    loader = RayDataLoader(ds, batch_size, seed=0, rank=0, world=1, device="cpu", drop_last=False, cpus=1)
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    n = sum(len(labels) for _, labels in loader)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the decode processes are the subject; the consumer only counts
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-data-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    ds = dataset(args, work)
    rows, results = [], []
    for cores in args.cores:
        dataloader_pass(ds, cores, args.batch_size)  # warm-up: worker start, page cache
        dl = statistics.median(dataloader_pass(ds, cores, args.batch_size) for _ in range(args.repeats))
        import ray

        ray.init(address="local", num_cpus=cores, include_dashboard=False, object_store_memory=200 * 1024**2,
                 log_to_driver=False)
        try:
            ray_pass(ds, args.batch_size, 0)  # warm-up: Ray Data's executor and its worker processes
            rd = statistics.median(ray_pass(ds, args.batch_size, e + 1) for e in range(args.repeats))
        finally:
            ray.shutdown()
        for engine, ips in (("DataLoader", dl), ("Ray Data", rd)):
            per_core = ips / cores
            need = args.gpu_images_per_s / per_core
            rows.append([engine, cores, round(ips, 1), round(per_core, 1), round(need, 1)])
            results.append({"engine": engine, "cores": cores, "images_per_s": ips, "per_core": per_core,
                            "cores_for_gpu": need})
        print(f"{cores} core(s): Ray Data / DataLoader = {rd / dl:.2f}", flush=True)
    print_table(["engine", "cores", "images/s", "per core", f"cores to feed {args.gpu_images_per_s:g}/s"], rows,
                title=f"{NAME}: decode + training transform at {args.size} px of {args.source_size} px JPEGs, "
                      f"{len(ds)} images per pass, median of {args.repeats}")
    write_json(args.out, NAME, {k: str(v) for k, v in vars(args).items()}, {"rows": results}, machine_info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
