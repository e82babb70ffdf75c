"""Fusion benchmark (issue 16): image-only vs text-only vs fusion top-1, same split and budget; the fusion model with
the text removed at test time; the text encoder's cost per image on the CPU.

Every model is the same ``animeai train fusion`` run (engine, data, split, epochs, learning rate, seed); only what it
reads differs: ``--fusion-inputs image`` (every text removed), ``text`` (the image encoder skipped) or ``both`` (for
each ``--fusions`` type). Reported: val top-1 of each model file (best epoch by val top-1, the same rule for all) and
of the last epoch; the fusion models' top-1 with every text removed; on synthetic data, top-1 per character group
(image twins: only text tells them apart; text twins: only the image; distinct); and the median CPU time per image
of the text side (tokenising + encoder) and of the image encoder, at batch 1 and 32.

    python tests/benchmarks/bench_fusion.py                      # synthetic captioned characters (animeai synth)
    python tests/benchmarks/bench_fusion.py --data DIR           # your captioned data (train/ and val/ inside)
    python tests/benchmarks/bench_fusion.py --quick              # seconds-long check that the script works
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, apply_threads, machine_info, median, print_table, spread, write_json

NAME = "bench_fusion"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, NAME)
    p.add_argument("--data", default=None, help="captioned data with train/ and val/ (default: synthetic characters "
                   "with tag captions, made in the work folder)")
    p.add_argument("--classes", type=int, default=6, help="synthetic characters (default: %(default)s)")
    p.add_argument("--images-per-class", type=int, default=40, help="synthetic images per character, a quarter for "
                   "val (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--model", default="efficientnet_lite0", help="image encoder (default: %(default)s)")
    p.add_argument("--pretrained", default="package", help="image encoder weights (default: %(default)s)")
    p.add_argument("--freeze-stages", type=int, default=2, help="default: %(default)s")
    p.add_argument("--text-encoder", default="all-minilm-l6-v2", help="default: %(default)s")
    p.add_argument("--text-pretrained", default="package", help="default: %(default)s")
    p.add_argument("--fusions", default="concat,gated", help="fusion types to train (default: %(default)s)")
    p.add_argument("--text-dropout", type=float, default=0.3, help="modality dropout (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=1e-3, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="run seed (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per cost measurement (default: %(default)s)")
    p.add_argument("--cost-only", action="store_true", help="measure only the per-image CPU cost (no training)")
    p.add_argument("--work-dir", type=Path, default=None, help="where data, models and runs go (default: a temp "
                   "folder)")
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.images_per_class, args.image_size, args.epochs, args.repeats = 4, 8, 32, 1, 2
        args.fusions = "concat"
    return args


def make_data(args, work: Path) -> tuple[Path, dict[str, Any] | None]:
    from animeai.data.synthetic import MANIFEST_NAME, make_synthetic_dataset

    if args.data:
        return Path(args.data), None
    root = work / "captioned"
    make_synthetic_dataset(root, num_classes=args.classes, images_per_class=args.images_per_class,
                           image_size=max(args.image_size, 64), seed=0, val_fraction=0.25, captions=True)
    return root, json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))["captions"]


def train_one(args, data: Path, work: Path, inputs: str, fusion: str) -> dict[str, Any]:
    from animeai.config import FusionConfig, load_config
    from animeai.engine import train
    from animeai.tasks.fusion import FusionTask

    name = f"{inputs}_{fusion}" if inputs == "both" else inputs
    cfg = load_config(FusionConfig, None, {
        "data.root": str(data), "data.image_size": args.image_size, "data.num_workers": 0,
        "model.arch": args.model, "model.pretrained": args.pretrained, "model.freeze_stages": args.freeze_stages,
        "text.encoder": args.text_encoder, "text.pretrained": args.text_pretrained, "fusion.type": fusion,
        "fusion.inputs": inputs, "fusion.text_dropout": args.text_dropout, "optim.batch_size": args.batch_size,
        "optim.lr": args.lr, "run.epochs": args.epochs, "run.seed": args.seed, "run.progress": False,
        "run.out": str(work / f"{name}.pth"), "run.run_dir": str(work / f"run_{name}"), "run.overwrite": True,
    })
    t0 = time.perf_counter()
    result = train(cfg, FusionTask(cfg))
    train_s = time.perf_counter() - t0
    last = result.history[-1]
    return {"name": name, "inputs": inputs, "fusion": fusion, "model": str(result.model_path), "train_s": train_s,
            "best_epoch": result.best_metrics["epoch"], "top1": result.best_metrics["val_top1"],
            "top1_no_text": result.best_metrics["val_top1_no_text"], "last_top1": last["val_top1"],
            "last_top1_no_text": last["val_top1_no_text"]}


def group_accuracy(model: str, data: Path, plan: dict[str, Any] | None) -> dict[str, Any]:
    """Top-1 per character group (image twins / text twins / distinct), with and without the texts."""
    from animeai.fusion import FusionClassifier

    clf = FusionClassifier.from_file(model, device="cpu")
    report = clf.evaluate_folder(data)
    if plan is None:
        return {}
    groups = {"image_twins": {n for pair in plan["image_twins"] for n in pair},
              "text_twins": {n for pair in plan["text_twins"] for n in pair}}
    groups["distinct"] = set(report["class_names"]) - groups["image_twins"] - groups["text_twins"]
    out = {}
    for g, names in groups.items():
        hits = sum(report["confusion_matrix"][i][i] for i, n in enumerate(report["class_names"]) if n in names)
        total = sum(sum(report["confusion_matrix"][i]) for i, n in enumerate(report["class_names"]) if n in names)
        out[g] = hits / total if total else None
    return out


def text_cost(args, data: Path, repeats: int) -> dict[str, Any]:
    """CPU ms per image: tokenising, the text encoder, and the image encoder (model-size input), batch 1 and 32."""
    import torch

    from animeai.data.captions import read_captions
    from animeai.models import create_model
    from animeai.models.text import load_text_encoder

    images = sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    texts = [t for t in (read_captions(images, check_orphans=False).text_of(p) for p in images) if t][:32]
    text = load_text_encoder(args.text_encoder, args.text_pretrained, max_length=64, frozen=True)
    image = create_model(args.model, 2, pretrained="none").eval()
    out: dict[str, Any] = {"encoder": args.text_encoder, "dim": text.encoder.dim,
                           "mean_tokens": float(text.tokenizer(texts)["attention_mask"].sum(1).float().mean())}

    def timed(fn, iters: int) -> tuple[float, float]:
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters)
        return median(times), spread(times)

    with torch.inference_mode():
        for bs, iters in ((1, 20), (32, 3)):
            batch = (texts * 32)[:bs]
            tok_s, _ = timed(lambda b=batch: text.tokenizer(b), iters)
            ids = text.tokenizer(batch)
            enc_s, enc_spread = timed(lambda i=ids: text.encoder(**i), iters)
            out[f"bs{bs}"] = {"tokenize_ms_per_image": tok_s * 1000 / bs, "encoder_ms_per_image": enc_s * 1000 / bs,
                              "encoder_spread": enc_spread}
            for size in sorted({args.image_size, 224}):
                x = torch.randn(bs, 3, size, size)
                img_s, _ = timed(lambda x=x: image(x), iters if size < 224 else max(1, iters // 2))
                out[f"bs{bs}"][f"image_encoder_{size}px_ms_per_image"] = img_s * 1000 / bs
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    work.mkdir(parents=True, exist_ok=True)
    data, plan = make_data(args, work)
    if args.cost_only:
        cost = text_cost(args, data, args.repeats)
        print(json.dumps(cost, indent=1))
        write_json(args.out, NAME, {k: str(v) for k, v in vars(args).items()}, {"text_cost": cost}, machine_info())
        return 0
    runs = [train_one(args, data, work, "image", "concat"), train_one(args, data, work, "text", "concat")]
    runs += [train_one(args, data, work, "both", f) for f in args.fusions.split(",")]
    for r in runs:
        r["groups"] = group_accuracy(r["model"], data, plan)
    cost = text_cost(args, data, args.repeats)
    by = {r["name"]: r for r in runs}
    fusions = [r for r in runs if r["inputs"] == "both"]
    best_fusion = max(fusions, key=lambda r: r["top1"])
    summary = {
        "fusion": best_fusion["name"],
        "fusion_top1": best_fusion["top1"], "image_top1": by["image"]["top1"], "text_top1": by["text"]["top1"],
        "fusion_beats_both": best_fusion["top1"] > max(by["image"]["top1"], by["text"]["top1"]),
        "fusion_no_text_minus_image": best_fusion["top1_no_text"] - by["image"]["top1"],
        "no_text_within_1_point_of_image": best_fusion["top1_no_text"] >= by["image"]["top1"] - 0.01,
        "text_side_ms_per_image_bs32": cost["bs32"]["tokenize_ms_per_image"] + cost["bs32"]["encoder_ms_per_image"],
    }
    rows = []
    for r in runs:
        g = r["groups"] or {}
        rows.append([r["name"], f"{r['top1']:.4f}", f"{r['top1_no_text']:.4f}", f"{r['last_top1']:.4f}",
                     r["best_epoch"], *(f"{g[k]:.3f}" if g.get(k) is not None else "-"
                                        for k in ("image_twins", "text_twins", "distinct")), f"{r['train_s']:.0f}"])
    title = f"\nsame split and budget ({data}; {args.epochs} epochs, {args.image_size} px)"
    print_table(["model", "val top-1", "no text", "last epoch", "best ep", "img twins", "txt twins", "distinct",
                 "train s"], rows, title=title)
    crow = []
    sizes = sorted({args.image_size, 224})
    for bs in (1, 32):
        c = cost[f"bs{bs}"]
        crow.append([bs, f"{c['tokenize_ms_per_image']:.3f}", f"{c['encoder_ms_per_image']:.2f}",
                     *(f"{c[f'image_encoder_{s}px_ms_per_image']:.2f}" for s in sizes)])
    print_table(["batch", "tokenize ms/img", f"{args.text_encoder} ms/img",
                 *(f"{args.model} {s}px ms/img" for s in sizes)], crow,
                title=f"\nCPU cost per image (mean {cost['mean_tokens']:.1f} tokens per text)")
    for k, v in summary.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    write_json(args.out, NAME, {k: str(v) for k, v in vars(args).items()},
               {"runs": runs, "text_cost": cost, "summary": summary, "plan": plan}, machine_info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
