"""Where a training image's CPU time goes, and what ``--augment-on device`` leaves to the loader processes.

On one core (one torch thread), for a generated 320 px JPEG at 224 px: the milliseconds of each step of the
detector's training transform (decode with draft, resize, rotation, horizontal flip, colour jitter, float conversion +
normalisation), then the whole per-image loader work for both places the augmentation can run:

* ``workers``: :func:`animeai.data.transforms.train_transform` (everything in the loader, float32 out);
* ``device``: :func:`animeai.data.device_augment.loader_transform` (decode, resize, flip, uint8 out), plus the batched
  device half (:class:`~animeai.data.device_augment.DeviceAugment`) timed here on the CPU per image of a batch of
  64: on a GPU it runs on the GPU instead (see ``tests/benchmarks/gpu/bench_gpu.py``).

Steps are timed interleaved (each repeat times every step in turn; medians), so machine noise hits all alike.

    python tests/benchmarks/bench_augment_cost.py             # about a minute
    python tests/benchmarks/bench_augment_cost.py --quick
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: animeai without installing it

from _common import add_common_args, apply_threads, machine_info, print_table, write_json  # noqa: E402

NAME = "bench_augment_cost"


def _jpeg(size: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).resize((size, size), Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, NAME)
    p.add_argument("--size", type=int, default=224, help="training image size (default: 224)")
    p.add_argument("--source", type=int, default=320, help="side of the generated JPEG (default: 320)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved repeats (default: 15)")
    p.add_argument("--per-repeat", type=int, default=20, help="calls of each step per repeat (default: 20)")
    args = p.parse_args(argv)
    apply_threads(args.threads or 1)
    if args.quick:
        args.repeats, args.per_repeat = 2, 2

    import torch
    from PIL import Image
    from torchvision import transforms as T

    from animeai.data.device_augment import DeviceAugment, loader_transform
    from animeai.data.transforms import train_transform
    from animeai.models.registry import IMAGENET_MEAN, IMAGENET_STD

    data, size = _jpeg(args.source), args.size
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def decode():
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))
        return img.convert("RGB")

    img = decode()
    small = T.Resize((size, size), antialias=True)(img)
    fill = tuple(int(round(255 * m)) for m in mean)
    to_float = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    workers_tf = train_transform(size, mean, std)
    loader_tf = loader_transform(size)
    aug = DeviceAugment(mean, std, seed=0)
    batch = torch.stack([loader_tf(img) for _ in range(64)])
    steps = {  # name -> (callable, images per call)
        "decode (draft)": (decode, 1),
        "resize": (lambda: T.Resize((size, size), antialias=True)(img), 1),
        "rotation": (lambda: T.RandomRotation(15, fill=fill)(small), 1),
        "horizontal flip": (lambda: T.RandomHorizontalFlip(1.0)(small), 1),
        "colour jitter": (lambda: T.ColorJitter(0.2, 0.2, 0.2, 0.05)(small), 1),
        "to float + normalise": (lambda: to_float(small), 1),
        "loader, augment on workers (all above)": (lambda: workers_tf(decode()), 1),
        "loader, augment on device (decode, resize, flip, uint8)": (lambda: loader_tf(decode()), 1),
        "device half on this CPU (batch of 64)": (lambda: aug(batch, augment=True), 64),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn, _ in steps.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, (fn, per_call) in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.per_repeat):
                fn()
            times[name].append((time.perf_counter() - t0) / (args.per_repeat * per_call))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    rows = [[k, round(v, 3), round(1e3 / v, 1)] for k, v in ms.items()]
    print_table(["step (one core)", "ms per image", "images/s"], rows,
                title=f"{args.source} px JPEG -> {size} px, medians of {args.repeats} interleaved repeats")
    ratio = ms["loader, augment on workers (all above)"] / ms["loader, augment on device (decode, resize, flip, uint8)"]
    print(f"\nloader work per image, workers / device: {ratio:.2f}x (the device half runs on the GPU in training)")
    write_json(args.out, NAME, vars(args), {"ms_per_image": ms, "loader_ratio_workers_over_device": ratio},
               machine_info("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
