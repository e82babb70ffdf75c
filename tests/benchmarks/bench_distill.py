"""Distillation benchmark (issue 15): KD student vs the same student on hard labels only vs the teacher.

For each seed, the same student architecture, epochs and seed are trained twice on ``--data`` (train -> val):
once with knowledge distillation from ``--teacher`` (``animeai train distill``) and once on hard labels only
(``animeai train detector``, label smoothing 0 like the distillation's hard term). Reported: top-1 on the val
split for the teacher and every student (mean and spread over seeds), the KD - hard-label margin against the
seed-to-seed spread, student/teacher top-1 ratio; CPU latency at batch 1 and throughput at batch 32 for the
teacher and the student in PyTorch and onnxruntime (medians over repeats, warm-up excluded); parameters and
model-file size.

    python tests/benchmarks/bench_distill.py --data ../shared/datasets/holo20 \
        --teacher models/holo20_teacher.pth --student mobilenetv2_100 --student-pretrained hub
    python tests/benchmarks/bench_distill.py --student efficientnet_lite0 --student-pretrained package ...  # offline
    python tests/benchmarks/bench_distill.py --quick     # tiny synthetic data + tiny teacher: checks the script
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, apply_threads, machine_info, median, print_table, spread, write_json

NAME = "bench_distill"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, NAME)
    p.add_argument("--data", default="../shared/datasets/holo20", help="dataset with train/ and val/ (default: "
                   "%(default)s)")
    p.add_argument("--teacher", help="the teacher's classifier model file (required unless --quick)")
    p.add_argument("--student", default="mobilenetv2_100", help="student architecture (default: %(default)s)")
    p.add_argument("--student-pretrained", default="auto", help="student weights (default: %(default)s)")
    p.add_argument("--student-size", type=int, default=0, help="the student's input side in pixels; 0 = the teacher's "
                   "(default: %(default)s). The hard-label student trains at the same size.")
    p.add_argument("--freeze-stages", type=int, default=0, help="student stages kept frozen (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of every student run (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="run seeds (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.9, help="KD weight (default: %(default)s)")
    p.add_argument("--kd-loss", default="kd", choices=("kd", "dkd"), help="default: %(default)s")
    p.add_argument("--loader-workers", type=int, default=2, help="default: %(default)s")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per speed measurement (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=None, help="where models and runs go (default: a temp folder)")
    p.add_argument("--speed-only", nargs="+", metavar="STUDENT", help="no training: speed, size and top-1 of "
                   "--teacher and these student files (e.g. again on a quiet machine)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.batch_size, args.repeats, args.loader_workers = 2, [0, 1], 12, 2, 0
        args.student, args.student_pretrained, args.temperature, args.alpha = "efficientnet_lite0", "package", 2.0, 0.5
    elif not args.teacher:
        p.error("--teacher is required (or use --quick)")
    return args


def quick_setup(work: Path) -> tuple[str, str]:
    """Tiny synthetic characters and a tiny teacher trained on them (32 px, Lite0 offline weights)."""
    from animeai.config import DetectorConfig, load_config
    from animeai.data.synthetic import make_synthetic_dataset
    from animeai.engine import train
    from animeai.tasks.detector import DetectorTask

    data = work / "chars"
    make_synthetic_dataset(data, num_classes=4, images_per_class=12, image_size=32, seed=3, val_fraction=0.25)
    cfg = load_config(DetectorConfig, None, {
        "data.root": str(data), "data.image_size": 32, "data.num_workers": 0, "model.arch": "efficientnet_lite0",
        "model.pretrained": "package", "optim.batch_size": 12, "optim.lr": 3e-3, "run.epochs": 3,
        "run.progress": False, "run.out": str(work / "teacher.pth"), "run.run_dir": str(work / "teacher_run"),
    })
    return str(data), str(train(cfg, DetectorTask(cfg)).model_path)


def train_student(args, data: str, teacher: str, seed: int, kd: bool, work: Path) -> Path:
    from animeai.checkpoint import read_metadata
    from animeai.config import DetectorConfig, DistillConfig, load_config
    from animeai.engine import train
    from animeai.tasks.detector import DetectorTask
    from animeai.tasks.distill import DistillTask

    size = args.student_size or int(read_metadata(teacher)["image_size"])
    name = f"{'kd' if kd else 'hard'}_seed{seed}"
    common = {
        "data.root": data, "data.image_size": size, "data.num_workers": args.loader_workers, "model.arch": args.student,
        "model.pretrained": args.student_pretrained,
        "model.freeze_stages": args.freeze_stages, "optim.batch_size": args.batch_size, "optim.lr": args.lr,
        "optim.label_smoothing": 0.0, "run.epochs": args.epochs, "run.seed": seed, "run.progress": False,
        "run.out": str(work / f"{name}.pth"), "run.run_dir": str(work / f"{name}_run"), "run.overwrite": True,
    }
    if kd:
        cfg = load_config(DistillConfig, None, {**common, "distill.teacher": teacher, "distill.loss": args.kd_loss,
                                                "distill.temperature": args.temperature, "distill.alpha": args.alpha})
        return train(cfg, DistillTask(cfg)).model_path
    cfg = load_config(DetectorConfig, None, common)
    return train(cfg, DetectorTask(cfg)).model_path


def top1(model: str, data: str) -> float:
    from animeai.inference import Classifier

    return float(Classifier.from_file(model, device="cpu").evaluate_folder(data)["top1"])


def speeds(models: list[str], work: Path, repeats: int) -> list[dict[str, Any]]:
    """ms per image at batch 1 and images/s at batch 32, PyTorch and onnxruntime (CPU), for every model, measured
    interleaved: each repeat times every model in turn, so a change in machine load hits all of them alike. Each
    entry also has ``x_first``: per setting, the median over repeats of (first model's time / this model's time)
    within the same repeat: the side-by-side speed-up over ``models[0]`` (the teacher)."""
    import torch

    from animeai.export import export_classifier
    from animeai.inference import Classifier

    runners = []  # (model index, setting, callable)
    for m, model in enumerate(models):
        onnx_path = work / f"{m}_{Path(model).stem}.onnx"
        export_classifier(model, onnx_path, overwrite=True)
        for backend, path in (("torch", model), ("onnx", str(onnx_path))):
            clf = Classifier.from_file(path, device="cpu")
            for bs, iters in ((1, 20), (32, 2)):
                x = torch.randn(bs, 3, clf.image_size, clf.image_size)
                if backend == "torch":
                    x = x.contiguous(memory_format=torch.channels_last)
                runners.append((m, f"{backend}_bs{bs}", bs, iters, clf, x))
    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for _, _, _, _, clf, x in runners:  # warm-up
            for _ in range(3):
                clf.logits(x)
        for _ in range(repeats):
            for m, key, _, iters, clf, x in runners:
                t0 = time.perf_counter()
                for _ in range(iters):
                    clf.logits(x)
                times.setdefault((m, key), []).append((time.perf_counter() - t0) / iters)
    out: list[dict[str, Any]] = [{} for _ in models]
    for (m, key), ts in times.items():
        bs = 1 if key.endswith("_bs1") else 32
        ratio = median([a / b for a, b in zip(times[(0, key)], ts)])
        out[m][key] = {"ms_per_batch": median(ts) * 1000, "images_per_s": bs / median(ts), "spread": spread(ts),
                       "x_first": ratio}
    return out


def describe(model: str) -> dict[str, Any]:
    from animeai.checkpoint import read_model_file

    tensors, meta = read_model_file(model)
    params = sum(t.numel() for k, t in tensors.items() if "running_" not in k and "num_batches" not in k)
    return {"arch": meta["arch"], "params": params, "file_mb": Path(model).stat().st_size / 2**20}


def speed_only(args, teacher: str, val: str, work: Path) -> int:
    measured = speeds([teacher, *args.speed_only], work, args.repeats)
    t = measured[0]
    rows, results = [], {"teacher": {"model": teacher, **describe(teacher), "speed": t}, "students": []}
    for model, sp in zip([teacher, *args.speed_only], measured):
        d = describe(model)
        acc = top1(model, val)
        row = {"model": model, **d, "top1": acc, "speed": sp,
               "speedup_bs1_torch": sp["torch_bs1"]["x_first"], "speedup_bs1_onnx": sp["onnx_bs1"]["x_first"]}
        if model != teacher:
            results["students"].append(row)
        rows.append([Path(model).name, d["arch"], f"{acc:.4f}", f"{d['params'] / 1e6:.2f}M", f"{d['file_mb']:.1f}",
                     f"{sp['torch_bs1']['ms_per_batch']:.2f}", f"{sp['onnx_bs1']['ms_per_batch']:.2f}",
                     f"{sp['torch_bs32']['images_per_s']:.0f}", f"{sp['onnx_bs32']['images_per_s']:.0f}",
                     f"{row['speedup_bs1_torch']:.2f}", f"{row['speedup_bs1_onnx']:.2f}"])
    print_table(["model", "arch", "val top-1", "params", "MB", "torch bs1 ms", "onnx bs1 ms", "torch bs32 img/s",
                 "onnx bs32 img/s", "x teacher torch", "x teacher onnx"], rows)
    write_json(args.out, NAME, {k: str(v) for k, v in vars(args).items()}, results, machine_info())
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    data, teacher = quick_setup(work) if args.quick else (args.data, args.teacher)
    val = str(Path(data) / "val") if (Path(data) / "val").is_dir() else data
    if args.speed_only:
        return speed_only(args, teacher, val, work)
    results: dict[str, Any] = {"teacher": {"model": teacher, "top1": top1(teacher, val), **describe(teacher)},
                               "kd": [], "hard": []}
    for seed in args.seeds:
        for kd in (True, False):
            t0 = time.perf_counter()
            model = train_student(args, data, teacher, seed, kd, work)
            results["kd" if kd else "hard"].append({"seed": seed, "model": str(model), "top1": top1(str(model), val),
                                                    "train_s": time.perf_counter() - t0})
    results["student"] = describe(results["kd"][0]["model"])
    t_speed, s_speed = speeds([teacher, results["kd"][0]["model"]], work, args.repeats)
    results["speed"] = {"teacher": t_speed, "student": s_speed}
    kd_acc = [r["top1"] for r in results["kd"]]
    hard_acc = [r["top1"] for r in results["hard"]]
    margin = sum(kd_acc) / len(kd_acc) - sum(hard_acc) / len(hard_acc)
    noise = max(max(kd_acc) - min(kd_acc), max(hard_acc) - min(hard_acc))
    s = results["speed"]["student"]
    results["summary"] = {
        "kd_top1_mean": sum(kd_acc) / len(kd_acc), "hard_top1_mean": sum(hard_acc) / len(hard_acc),
        "kd_minus_hard": margin, "seed_spread": noise, "kd_beats_hard_beyond_seed_noise": margin > noise,
        "student_over_teacher_top1": (sum(kd_acc) / len(kd_acc)) / max(results["teacher"]["top1"], 1e-9),
        "speedup_bs1_torch": s["torch_bs1"]["x_first"], "speedup_bs1_onnx": s["onnx_bs1"]["x_first"],
    }
    rows = [["teacher", results["teacher"]["arch"], f"{results['teacher']['top1']:.4f}", "", ""]]
    for kind in ("kd", "hard"):
        for r in results[kind]:
            rows.append([f"{kind} seed {r['seed']}", args.student, f"{r['top1']:.4f}", f"{r['train_s']:.0f}", ""])
    print_table(["model", "arch", "val top-1", "train s", ""], rows)
    speed_rows = [[who, k, f"{v['ms_per_batch']:.2f}", f"{v['images_per_s']:.1f}"]
                  for who in ("teacher", "student") for k, v in results["speed"][who].items()]
    print_table(["model", "backend/batch", "ms/batch", "images/s"], speed_rows)
    for k, v in results["summary"].items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    write_json(args.out, NAME, {k: str(v) for k, v in vars(args).items()}, results, machine_info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
