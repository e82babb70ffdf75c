"""Loop overhead of the Accelerate engine: training images/s of ``animeai.engine.train`` (DetectorTask) vs a
bare PyTorch loop on the same model, data, batch size, optimizer, scheduler, transforms and num_workers.

Both loops are built by ``DetectorTask.setup`` from one config, so everything but the loop is shared code.
The engine's own per-epoch ``images_per_s`` (training phase only; validation and state saving are outside it)
is compared with the bare loop timed the same way (loader iteration + forward + loss + backward + step +
scheduler, no validation). Epochs alternate bare, engine, bare, engine ... in one process (the bare epochs
run from the engine's per-epoch callback) so drift of the machine hits both alike; the first ``--warmup``
epoch(s) of each are excluded; the medians are compared::

    overhead % = (bare images/s / engine images/s - 1) * 100        goal: <= 3 %

Run (from the repository root; synthetic data is generated in a temporary folder)::

    python tests/benchmarks/bench_engine_overhead.py            # lite0, 128 px, batch 32, 3 timed epochs
    python tests/benchmarks/bench_engine_overhead.py --quick    # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from _common import add_common_args, apply_threads, machine_info, median, print_table, spread, write_json

NAME = "bench_engine_overhead"
GOAL_OVERHEAD_PCT = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, NAME)
    p.add_argument("--arch", default="efficientnet_lite0", help="model registry name (default: %(default)s)")
    p.add_argument("--pretrained", default="package", help="weights source (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=128, help="network input side (default: %(default)s)")
    p.add_argument("--source-size", type=int, default=224,
                   help="side of the generated JPEGs, like holo20's 224 px crops (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--images", type=int, default=200, help="training images per epoch, about (default: %(default)s)")
    p.add_argument("--classes", type=int, default=8, help="synthetic classes (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs of each loop (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up epochs of each loop (default: %(default)s)")
    p.add_argument("--freeze-stages", type=int, default=0, help="model.freeze_stages (default: %(default)s)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16"),
                   help="both loops (bare: torch.autocast) (default: %(default)s)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.source_size, args.batch_size = 64, 64, 8
        args.images, args.classes, args.epochs, args.warmup = 24, 4, 1, 1
    return args


def make_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Synthetic train/ + val/ folders: ~``args.images`` training images, 2 validation images per class."""
    from animeai.data.synthetic import make_synthetic_dataset

    train_pc = max(1, math.ceil(args.images / args.classes))
    val_pc = 2
    per_class = train_pc + val_pc
    t0 = time.perf_counter()
    make_synthetic_dataset(root, num_classes=args.classes, images_per_class=per_class, image_size=args.source_size,
                           seed=0, val_fraction=val_pc / per_class)
    return {"train_images": train_pc * args.classes, "val_images": val_pc * args.classes,
            "generate_s": time.perf_counter() - t0}


def make_cfg(args: argparse.Namespace, data_root: Path, work: Path):
    from animeai.config import DetectorConfig, load_config

    return load_config(DetectorConfig, None, {
        "data.root": str(data_root),
        "data.image_size": args.image_size,
        "data.num_workers": args.num_workers,
        "model.arch": args.arch,
        "model.pretrained": args.pretrained,
        "model.freeze_stages": args.freeze_stages,
        "optim.batch_size": args.batch_size,
        "run.epochs": args.warmup + args.epochs,
        "run.mixed_precision": args.mixed_precision,
        "run.cpu": args.cpu,
        "run.out": str(work / "model.pth"),
        "run.run_dir": str(work / "run"),
        "run.progress": False,
    })


class BareLoop:
    """The same DetectorTask pieces driven by a plain PyTorch loop (no Accelerate objects anywhere)."""

    def __init__(self, cfg, device, total_epochs: int):
        import torch

        from animeai.tasks.detector import DetectorTask

        self.torch = torch
        self.cfg = cfg
        self.device = device
        task = DetectorTask(cfg)
        # setup only needs these two attributes of an accelerator (split report + one info line).
        task.setup(types.SimpleNamespace(is_main_process=True, print=lambda *a, **k: None))
        self.task = task
        self.model = task.models["model"].to(device)
        self.optimizer = task.optimizers["model"]
        self.loader = task.train_loader
        self.batches = len(self.loader)
        # same total as the engine: steps_per_epoch * run.epochs (grad_accum 1)
        self.scheduler = task.configure_schedulers(self.batches * total_epochs)["model"]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast_dtype = torch.bfloat16 if cfg.run.mixed_precision == "bf16" else None

    def epoch(self, epoch: int) -> dict[str, float]:
        import torch.nn.functional as F

        from animeai.models.registry import set_frozen_eval

        torch = self.torch
        cfg, model, opt, device = self.cfg, self.model, self.optimizer, self.device
        self.task.train_sampler.set_epoch(epoch)
        model.train()
        set_frozen_eval(model)
        clip = float(cfg.optim.grad_clip or 0.0)
        smoothing = cfg.optim.label_smoothing
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for i, (images, labels) in enumerate(self.loader):
            if i >= self.batches:
                break
            images, labels = images.to(device), labels.to(device)
            if self.autocast_dtype is not None:
                with torch.autocast(device.type, dtype=self.autocast_dtype):
                    logits = model(images)
            else:
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.scheduler.step()
            n = int(images.shape[0])
            loss_sum += loss.detach().float() * n
            seen += n
        train_time = time.perf_counter() - t0
        return {"epoch": epoch + 1, "images": seen, "train_s": train_time, "images_per_s": seen / max(train_time, 1e-9),
                "train_loss": loss_sum.item() / max(seen, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    import torch

    from animeai.engine import make_accelerator, train
    from animeai.tasks.detector import DetectorTask

    total = args.warmup + args.epochs
    with tempfile.TemporaryDirectory(prefix="animeai-bench-") as tmp:
        tmp = Path(tmp)
        data_info = make_data(tmp / "data", args)
        engine_cfg = make_cfg(args, tmp / "data", tmp / "engine")
        bare_cfg = make_cfg(args, tmp / "data", tmp / "bare")
        accelerator = make_accelerator(engine_cfg.run)
        device = accelerator.device
        print(f"{NAME}: {args.arch} ({args.pretrained}) {args.image_size}px batch {args.batch_size} "
              f"workers {args.num_workers}, {data_info['train_images']} train images/epoch, "
              f"{args.warmup} warm-up + {args.epochs} timed epochs each, device {device}, "
              f"torch threads {torch.get_num_threads()}", flush=True)

        from accelerate.utils import set_seed

        set_seed(engine_cfg.run.seed)
        bare = BareLoop(bare_cfg, device, total)
        bare_hist: list[dict[str, float]] = []
        order: list[str] = []

        def run_bare(epoch: int) -> None:
            m = bare.epoch(epoch)
            bare_hist.append(m)
            order.append(f"bare{epoch + 1}")
            print(f"bare   epoch {epoch + 1}/{total}  images/s {m['images_per_s']:.2f}", flush=True)

        def after_engine_epoch(metrics: dict[str, Any], state_dir: Path, task: Any) -> None:
            order.append(f"engine{metrics['epoch']}")
            if metrics["epoch"] < total:
                run_bare(metrics["epoch"])

        run_bare(0)  # bare, engine, bare, engine, ...
        task = DetectorTask(engine_cfg)
        t0 = time.perf_counter()
        result = train(engine_cfg, task, accelerator, callbacks=[after_engine_epoch])
        wall = time.perf_counter() - t0
        engine_hist = result.history

    w = args.warmup
    bare_ips = [m["images_per_s"] for m in bare_hist[w:]]
    eng_ips = [m["images_per_s"] for m in engine_hist[w:]]
    bare_med, eng_med = median(bare_ips), median(eng_ips)
    overhead = (bare_med / eng_med - 1.0) * 100.0
    pair_overheads = [(b / e - 1.0) * 100.0 for b, e in zip(bare_ips, eng_ips)]
    verdict = "PASS" if overhead <= GOAL_OVERHEAD_PCT else "ABOVE GOAL"

    print()
    rows = []
    for i in range(total):
        b, e = bare_hist[i]["images_per_s"], engine_hist[i]["images_per_s"]
        rows.append([f"{i + 1}" + (" (warm-up)" if i < w else ""), b, e, f"{(b / e - 1) * 100:+.1f}%"])
    print_table(["epoch", "bare img/s", "engine img/s", "bare/engine-1"], rows,
                title="per epoch (images/s, training phase only; order bare, engine, bare, engine ...)")
    print()
    print_table(
        ["loop", "timed epochs", "images/epoch", "median img/s", "min", "max", "spread"],
        [
            ["bare PyTorch", len(bare_ips), bare_hist[-1]["images"], bare_med, min(bare_ips), max(bare_ips),
             f"{spread(bare_ips) * 100:.1f}%"],
            ["animeai.engine", len(eng_ips), bare_hist[-1]["images"], eng_med, min(eng_ips), max(eng_ips),
             f"{spread(eng_ips) * 100:.1f}%"],
        ],
        title="summary (median of timed epochs)",
    )
    print(f"\nengine overhead: {overhead:+.2f} %  (median of per-pair: {median(pair_overheads):+.2f} %)   "
          f"goal <= {GOAL_OVERHEAD_PCT:.0f} %: {verdict}")
    if args.quick:
        print("(--quick: smoke run, the numbers are not meaningful)")

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(data_info, mixed_precision_resolved=accelerator.mixed_precision, order=order,
                    batches_per_epoch=bare.batches, data="synthetic (animeai.data.synthetic), temporary folder",
                    pretrained_source=bare.task.pretrained_source, hf_hub_offline=os.environ.get("HF_HUB_OFFLINE"))
    results = {
        "bare_images_per_s_median": bare_med,
        "engine_images_per_s_median": eng_med,
        "overhead_pct": overhead,
        "overhead_pct_median_of_pairs": median(pair_overheads),
        "bare_over_engine_ratio": bare_med / eng_med,
        "goal_overhead_pct": GOAL_OVERHEAD_PCT,
        "meets_goal": overhead <= GOAL_OVERHEAD_PCT,
        "bare_epochs": bare_hist,
        "engine_epochs": engine_hist,
        "warmup_epochs_excluded": w,
        "engine_train_call_wall_s": wall,
    }
    write_json(args.out, NAME, settings, results, machine_info(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
