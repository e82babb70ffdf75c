"""CPU inference speed of the detector backbones, and what preprocessing adds end to end.

1. Model only: images/s and ms/batch of ``efficientnet_b0`` and ``efficientnet_lite0`` in eval mode under
   ``torch.inference_mode``, channels-last weights (as ``animeai.inference.Classifier`` uses), 224 px,
   batch 1 and 32; the lite0/b0 ratio per batch size. Weights are random (``pretrained="none"``): speed does
   not depend on the weight values, and no download is needed.
2. End to end: ``Classifier.predict_paths`` (lite0) on N generated JPEG files, which includes decoding,
   resizing and normalising; plus decode + transform alone, to show the share of preprocessing.

Configurations are interleaved within every repeat (drift hits all alike); warm-up iterations are excluded;
the median over repeats is reported. Run (from the repository root)::

    python tests/benchmarks/bench_inference.py            # full run
    python tests/benchmarks/bench_inference.py --quick    # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, apply_threads, machine_info, median, print_table, spread, write_json

NAME = "bench_inference"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, NAME)
    p.add_argument("--archs", nargs="+", default=["efficientnet_b0", "efficientnet_lite0"],
                   help="models to time (default: %(default)s); the ratio is last/first")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32], help="default: %(default)s")
    p.add_argument("--image-size", type=int, default=224, help="network input side (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=20, help="classifier head size (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per configuration (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per configuration (default: %(default)s)")
    p.add_argument("--iters-bs1", type=int, default=20,
                   help="iterations per repeat at batch size 1 (default: %(default)s)")
    p.add_argument("--iters", type=int, default=3,
                   help="iterations per repeat at larger batch sizes (default: %(default)s)")
    p.add_argument("--e2e-arch", default="efficientnet_lite0",
                   help="model of the end-to-end run (default: %(default)s)")
    p.add_argument("--e2e-images", type=int, default=128,
                   help="JPEG files of the end-to-end run (default: %(default)s)")
    p.add_argument("--e2e-source-size", type=int, default=224,
                   help="side of the generated JPEGs, like holo20's crops (default: %(default)s)")
    p.add_argument("--e2e-batch-size", type=int, default=32, help="predict_paths batch size (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes = [1, 8]
        args.repeats, args.warmup, args.iters_bs1, args.iters = 2, 1, 2, 1
        args.e2e_images, args.e2e_batch_size = 16, 8
    return args


def build_model(arch: str, num_classes: int, device):
    import torch

    from animeai.models import create_model

    model = create_model(arch, num_classes, pretrained="none")
    return model.to(device, memory_format=torch.channels_last).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    import torch

    from animeai.data.images import load_image
    from animeai.data.synthetic import make_synthetic_dataset
    from animeai.inference import Classifier, expand_paths
    from animeai.models import get_model_spec

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    S = args.image_size
    print(f"{NAME}: {', '.join(args.archs)} at {S}px, batch {args.batch_sizes}, device {device}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} repeats", flush=True)

    models = {a: build_model(a, args.num_classes, device) for a in args.archs}
    configs = [(a, bs) for bs in args.batch_sizes for a in args.archs]
    inputs = {bs: torch.randn(bs, 3, S, S, device=device) for bs in args.batch_sizes}  # contiguous, as from stack
    iters = {bs: (args.iters_bs1 if bs == 1 else args.iters) for bs in args.batch_sizes}

    def run_model(arch: str, bs: int, n: int) -> float:
        model, x = models[arch], inputs[bs]
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n):
                model(x)
        sync()
        return (time.perf_counter() - t0) / n  # seconds per batch

    with tempfile.TemporaryDirectory(prefix="animeai-bench-") as tmp:
        n_cls = min(6, args.e2e_images)
        per_class = -(-args.e2e_images // n_cls)
        make_synthetic_dataset(Path(tmp), num_classes=n_cls, images_per_class=per_class,
                               image_size=args.e2e_source_size, seed=0)
        paths = expand_paths([tmp])[: args.e2e_images]
        spec = get_model_spec(args.e2e_arch)
        e2e_model = models.get(args.e2e_arch) or build_model(args.e2e_arch, args.num_classes, device)
        meta = {"arch": args.e2e_arch, "class_names": [f"class_{i}" for i in range(args.num_classes)],
                "image_size": S, "mean": list(spec.mean), "std": list(spec.std)}
        clf = Classifier(e2e_model, meta, device)

        def run_pre() -> float:
            t0 = time.perf_counter()
            torch.stack([clf.transform(load_image(p, draft_size=clf.image_size)) for p in paths])
            return time.perf_counter() - t0

        def run_e2e() -> float:
            t0 = time.perf_counter()
            out = clf.predict_paths(paths, top_k=5, batch_size=args.e2e_batch_size)
            elapsed = time.perf_counter() - t0
            errors = [r for r in out if "error" in r]
            if errors:
                raise RuntimeError(f"predict_paths failed on {errors[0]}")
            return elapsed

        # warm-up (excluded): every model configuration, the decoder and predict_paths
        for arch, bs in configs:
            run_model(arch, bs, args.warmup)
        run_pre()
        clf.predict_paths(paths[: args.e2e_batch_size], batch_size=args.e2e_batch_size)

        times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
        pre_times: list[float] = []
        e2e_times: list[float] = []
        for r in range(args.repeats):
            for c in configs if r % 2 == 0 else reversed(configs):
                times[c].append(run_model(c[0], c[1], iters[c[1]]))
            pre_times.append(run_pre())
            e2e_times.append(run_e2e())
            print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    # ------------------------------------------------------------------ report
    model_rows, model_results = [], []
    for arch, bs in configs:
        ts = times[(arch, bs)]
        sec = median(ts)
        model_results.append({"arch": arch, "batch_size": bs, "ms_per_batch": sec * 1e3, "images_per_s": bs / sec,
                              "ms_per_batch_repeats": [t * 1e3 for t in ts], "spread": spread(ts),
                              "iters_per_repeat": iters[bs]})
        model_rows.append([arch, bs, sec * 1e3, bs / sec, f"{spread(ts) * 100:.1f}%"])
    print()
    print_table(["model", "batch", "ms/batch", "img/s", "spread"], model_rows,
                title=f"model only ({S}px, eval, inference_mode, channels_last, median of {args.repeats})")

    first, last = args.archs[0], args.archs[-1]
    ratios, ratio_rows = [], []
    if first != last:
        for bs in args.batch_sizes:
            a = next(m for m in model_results if m["arch"] == first and m["batch_size"] == bs)
            b = next(m for m in model_results if m["arch"] == last and m["batch_size"] == bs)
            ratio = b["images_per_s"] / a["images_per_s"]
            ratios.append({"batch_size": bs, f"{first}_images_per_s": a["images_per_s"],
                           f"{last}_images_per_s": b["images_per_s"], "ratio": ratio})
            ratio_rows.append([bs, a["images_per_s"], b["images_per_s"], f"{ratio:.2f}x"])
        print()
        a_short, b_short = (x.removeprefix("efficientnet_") for x in (first, last))
        print_table(["batch", f"{a_short} img/s", f"{b_short} img/s", f"{b_short}/{a_short}"], ratio_rows,
                    title="speed ratio (images/s)")

    n = len(paths)
    pre_s, e2e_s = median(pre_times), median(e2e_times)
    e2e_bs = args.e2e_batch_size
    model_bs = next((m for m in model_results if m["arch"] == args.e2e_arch and m["batch_size"] == e2e_bs), None)
    model_ips = model_bs["images_per_s"] if model_bs else None
    print()
    print_table(
        ["stage", "img/s", "ms/image", "time / end-to-end time"],
        [
            ["decode + resize + normalise", n / pre_s, pre_s / n * 1e3, f"{pre_s / e2e_s * 100:.0f}%"],
            [f"model only (batch {e2e_bs})", model_ips, 1e3 / model_ips if model_ips else None,
             f"{n / model_ips / e2e_s * 100:.0f}%" if model_ips else "-"],
            ["predict_paths end to end", n / e2e_s, e2e_s / n * 1e3, "100%"],
        ],
        title=f"end to end: Classifier.predict_paths, {args.e2e_arch}, {n} JPEGs of {args.e2e_source_size}px, "
              f"batch {e2e_bs}",
    )
    if args.quick:
        print("(--quick: smoke run, the numbers are not meaningful)")

    settings: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(pretrained="none", pretrained_note="random-init weights: speed does not depend on weight values",
                    eval_mode=True, grad_mode="torch.inference_mode (model only); Classifier uses torch.no_grad",
                    memory_format="channels_last weights, contiguous NCHW input (as Classifier)",
                    e2e_data="synthetic JPEGs (animeai.data.synthetic, quality 90), temporary folder")
    results = {
        "model_only": model_results,
        "ratios": ratios,
        "end_to_end": {
            "arch": args.e2e_arch, "images": n, "batch_size": e2e_bs,
            "preprocess_images_per_s": n / pre_s, "preprocess_s_repeats": pre_times,
            "predict_paths_images_per_s": n / e2e_s, "predict_paths_s_repeats": e2e_times,
            "model_only_images_per_s": model_ips,
            "preprocess_share_of_end_to_end": pre_s / e2e_s,
        },
    }
    write_json(args.out, NAME, settings, results, machine_info(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
