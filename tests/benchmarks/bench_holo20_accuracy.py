"""Real accuracy: train the detector on holo20/train with the shipped recipe and evaluate it on holo20/val.

Trains with ``animeai.engine.train`` and the recipe ``animeai/configs/holo20_lite0.yaml`` (EfficientNet-Lite0,
offline ImageNet weights, 160 px, 20 epochs), then evaluates the saved best model with
``animeai.inference.Classifier.from_file(...).evaluate_folder(<holo20>/val)``. Reports wall-clock training
minutes, training images/s, the best epoch, top-1 against the 0.90 goal, top-5, the 3 worst classes, and
writes the confusion matrix PNG next to the JSON. Without the data folder it prints a message and exits 0.

Run (from the repository root)::

    python tests/benchmarks/bench_holo20_accuracy.py                      # the CPU recipe, as shipped
    python tests/benchmarks/bench_holo20_accuracy.py --arch efficientnet_b0 --image-size 224 --pretrained hub
    python tests/benchmarks/bench_holo20_accuracy.py --quick              # 1 epoch of a few steps: checks it runs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    add_common_args,
    add_set_arg,
    apply_threads,
    machine_info,
    median,
    parse_set,
    print_table,
    write_json,
)

NAME = "bench_holo20_accuracy"
GOAL_TOP1 = 0.90
DEFAULT_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "holo20"


def shipped_config() -> Path:
    import animeai

    return Path(animeai.__file__).parent / "configs" / "holo20_lite0.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, NAME)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="holo20 folder with train/ and val/ (default: ../shared/datasets/holo20 beside the repo)")
    p.add_argument("--config", type=Path, default=None,
                   help="recipe YAML (default: the shipped animeai/configs/holo20_lite0.yaml)")
    p.add_argument("--epochs", type=int, help="override run.epochs")
    p.add_argument("--arch", help="override model.arch (e.g. efficientnet_b0 for the GPU run)")
    p.add_argument("--image-size", type=int, help="override data.image_size (e.g. 224)")
    p.add_argument("--pretrained", help="override model.pretrained (auto | hub | package | none | PATH)")
    p.add_argument("--batch-size", type=int, help="override optim.batch_size")
    p.add_argument("--num-workers", type=int, help="override data.num_workers")
    p.add_argument("--max-steps", type=int, help="override run.max_steps_per_epoch (0 = full epochs)")
    p.add_argument("--cpu", action="store_true", help="train and evaluate on the CPU even if a GPU is present")
    add_set_arg(p, "any other dotted", "optim.lr=3e-4")
    p.add_argument("--model-out", type=Path,
                   help="keep the trained model file here (default: a temporary file, deleted at the end)")
    p.add_argument("--run-dir", type=Path, help="keep the run folder here (default: temporary)")
    p.add_argument("--progress", action="store_true", help="show the engine's progress bar")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 1
        args.max_steps = args.max_steps or 3
    return args


def overrides_from(args: argparse.Namespace, work: Path) -> dict[str, Any]:

    over: dict[str, Any] = {
        "data.root": str(args.data / "train"),
        "data.val_root": str(args.data / "val"),
        "run.out": str(args.model_out or work / "holo20_model.pth"),
        "run.run_dir": str(args.run_dir or work / "run"),
        "run.progress": args.progress,
        "run.resume": False,
    }
    for key, flag in (("run.epochs", "epochs"), ("model.arch", "arch"), ("data.image_size", "image_size"),
                      ("model.pretrained", "pretrained"), ("optim.batch_size", "batch_size"),
                      ("data.num_workers", "num_workers"), ("run.max_steps_per_epoch", "max_steps")):
        if getattr(args, flag) is not None:
            over[key] = getattr(args, flag)
    if args.cpu:
        over["run.cpu"] = True
    over.update(parse_set(args.set))
    return over


def worst_classes(report: dict[str, Any], n: int = 3) -> list[dict[str, Any]]:
    """The ``n`` classes with the lowest accuracy, each with the class it is most often mistaken for."""
    names, cm = report["class_names"], report["confusion_matrix"]
    rows = []
    for i, name in enumerate(names):
        pc = report["per_class"][name]
        if pc["accuracy"] is None:
            continue
        wrong = [(c, j) for j, c in enumerate(cm[i]) if j != i and c > 0]
        confused = max(wrong)[1] if wrong else None
        rows.append({"class": name, "accuracy": pc["accuracy"], "support": pc["support"],
                     "most_confused_with": names[confused] if confused is not None else None,
                     "confused_count": max(wrong)[0] if wrong else 0})
    rows.sort(key=lambda r: (r["accuracy"], r["class"]))
    return rows[:n]


def main(argv=None) -> int:
    args = parse_args(argv)
    data = args.data.resolve()
    if not ((data / "train").is_dir() and (data / "val").is_dir()):
        print(f"{NAME}: skipped - holo20 data not found at {data} (expected train/ and val/ inside); "
              f"pass --data PATH to run it.")
        return 0
    args.data = data
    config = (args.config or shipped_config()).resolve()
    apply_threads(args.threads)

    import torch

    from animeai.config import DetectorConfig, load_config, to_dict
    from animeai.engine import make_accelerator, train
    from animeai.inference import Classifier
    from animeai.metrics import plot_confusion_matrix
    from animeai.tasks.detector import DetectorTask

    with tempfile.TemporaryDirectory(prefix="animeai-holo20-") as tmp:
        cfg = load_config(DetectorConfig, config, overrides_from(args, Path(tmp)))
        accelerator = make_accelerator(cfg.run)
        device = accelerator.device
        print(f"{NAME}: {cfg.model.arch} ({cfg.model.pretrained}) {cfg.data.image_size}px, {cfg.run.epochs} epochs, "
              f"batch {cfg.optim.batch_size}, workers {cfg.data.num_workers}, device {device}, "
              f"mixed precision {accelerator.mixed_precision}, torch threads {torch.get_num_threads()}\n"
              f"  config {config}\n  data   {data}", flush=True)
        task = DetectorTask(cfg)
        t0 = time.perf_counter()
        result = train(cfg, task, accelerator)
        train_wall = time.perf_counter() - t0

        eval_device = "cpu" if cfg.run.cpu else str(device)
        t1 = time.perf_counter()
        clf = Classifier.from_file(result.model_path, device=eval_device)
        report = clf.evaluate_folder(data / "val", batch_size=cfg.optim.batch_size,
                                     num_workers=cfg.data.num_workers)
        eval_wall = time.perf_counter() - t1
        pretrained_source = clf.meta.get("pretrained_source")

    hist = result.history
    ips = [m["images_per_s"] for m in hist]
    train_phase_s = sum(m["epoch_s"] - m["eval_s"] for m in hist)
    best_epoch = result.best_metrics.get("epoch")
    top1, top5 = report["top1"], report["top5"]
    worst = worst_classes(report)
    verdict = "PASS" if top1 >= GOAL_TOP1 else "BELOW GOAL"

    out = Path(args.out)
    png = out.with_name(out.stem + "_confusion.png")
    plot_confusion_matrix(report["confusion_matrix"], report["class_names"], png,
                          title=f"{cfg.model.arch} {cfg.data.image_size}px on holo20/val: top-1 {top1:.3f}")

    print()
    print_table(["metric", "value"], [
        ["train wall-clock (min)", f"{train_wall / 60:.2f}"],
        ["  of which training phase (min)", f"{train_phase_s / 60:.2f}"],
        ["epochs", len(hist)],
        ["train images/s (median epoch)", median(ips)],
        ["best epoch", str(best_epoch)],
        ["engine best val_top1", f"{result.best_metrics.get('val_top1', float('nan')):.4f}"],
        ["val images", report["num_images"]],
        ["top-1 (Classifier)", f"{top1:.4f}"],
        ["top-5 (Classifier)", f"{top5:.4f}"],
        ["goal top-1", f">= {GOAL_TOP1:.2f}  {verdict}"],
        ["evaluate_folder (s)", eval_wall],
    ], title=f"holo20: {cfg.model.arch} {cfg.data.image_size}px, {cfg.run.epochs} epochs on {device}")
    print()
    print_table(["worst class", "accuracy", "support", "most confused with", "count"],
                [[w["class"], f"{w['accuracy']:.3f}", w["support"], w["most_confused_with"] or "-", w["confused_count"]]
                 for w in worst], title="3 worst classes")
    print(f"\nconfusion matrix: {png}")
    if args.quick:
        print("(--quick: 1 epoch of a few steps; the accuracy is not meaningful)")

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(config_file=str(config), resolved_config=to_dict(cfg), pretrained_source=pretrained_source,
                    mixed_precision_resolved=accelerator.mixed_precision, eval_device=eval_device,
                    hf_hub_offline=os.environ.get("HF_HUB_OFFLINE"), argv=sys.argv[1:])
    results = {
        "top1": top1,
        "top5": top5,
        "goal_top1": GOAL_TOP1,
        "meets_goal": top1 >= GOAL_TOP1,
        "train_wall_min": train_wall / 60,
        "train_phase_min": train_phase_s / 60,
        "train_images_per_s_median": median(ips),
        "best_epoch": best_epoch,
        "engine_best_metrics": result.best_metrics,
        "history": hist,
        "worst_classes": worst,
        "per_class": report["per_class"],
        "class_names": report["class_names"],
        "confusion_matrix": report["confusion_matrix"],
        "confusion_png": str(png),
        "val_images": report["num_images"],
        "val_skipped": report["skipped"],
        "evaluate_folder_s": eval_wall,
        "model_file": str(args.model_out) if args.model_out else None,
    }
    write_json(out, NAME, settings, results, machine_info(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
