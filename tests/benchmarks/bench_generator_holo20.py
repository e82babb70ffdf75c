"""Generator quality on real fan art: holo20 characters at 64 px, a fixed CPU budget per character, judged by
networks the generator never trained against.

For each character and each discriminator (``plain``, ``projected``) a generator is trained with the engine
(``GeneratorTask``) for ``--minutes`` of wall-clock time, guided by a detector, then scored by
``animeai.gen_eval.evaluate_generator``: the recognition rate of an independent judge (chance 1/20 = 5 %; goal
>= 50 %), KID against the character's real training images (pooled EfficientNet-Lite0 features at 224 px), and
sample diversity against the real images'. The detector and the judge are classifiers trained on holo20/train
with the shipped recipe (``animeai/configs/holo20_lite0.yaml``): the judge with another seed (7 vs 42) and another
input size (128 vs 160 px); both are reused from ``--work`` when present. Their holo20/val top-1 is reported.
That judge shares the guiding detector's architecture and ImageNet start, so it may share its blind spots:
``--also-judge J`` scores the same samples with more judges, e.g. a MobileNetV2 trained from scratch on hard labels
(``bench_distill.py`` leaves one in ``runs/bench_distill/<name>/hard_seed0.pth``).

Sample grids and model files go under ``--work`` (default ``runs/bench_generator_holo20``, git-ignored): the
images' licence keeps real-data grids out of the repository. Without the data folder the script prints a message
and exits 0.

Run (from the repository root)::

    python tests/benchmarks/bench_generator_holo20.py                                  # 20 characters x 20 min x 2
    python tests/benchmarks/bench_generator_holo20.py --characters 2 --minutes 3 --classifier-epochs 4  # quick look
    python tests/benchmarks/bench_generator_holo20.py --characters ame,gura --discriminators projected
    python tests/benchmarks/bench_generator_holo20.py --also-judge runs/bench_distill/mnv2_112/hard_seed0.pth
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, add_set_arg, apply_threads, machine_info, parse_set, print_table, write_json

NAME = "bench_generator_holo20"
GOAL_RECOGNITION = 0.50
DEFAULT_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "holo20"


class BudgetReached(Exception):
    """Raised by the epoch callback once the time budget is spent (after an epoch that saved the model file)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, NAME)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="holo20 folder with train/ and val/ "
                   "(default: ../shared/datasets/holo20 beside the repo)")
    p.add_argument("--characters", default="20", help="how many characters (the first N by name) or a comma list of "
                   "names (default: 20, all)")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget per character and "
                   "discriminator (default: 20)")
    p.add_argument("--discriminators", default="plain,projected", help="comma list (default: plain,projected)")
    p.add_argument("--image-size", type=int, default=64, help="generator image size (default: 64)")
    p.add_argument("--n", type=int, default=256, help="samples scored per generator (default: 256)")
    p.add_argument("--feature-size", type=int, default=224, help="KID/diversity feature network input (default: 224)")
    p.add_argument("--eval-every", type=int, default=5, help="generator epochs between evaluations; the budget is "
                   "checked there (default: 5)")
    p.add_argument("--classifier-epochs", type=int, default=None,
                   help="epochs of the detector and the judge (default: the recipe's 20)")
    p.add_argument("--detector", type=Path, help="use this detector model file (default: train/reuse one in --work)")
    p.add_argument("--judge", type=Path, help="use this judge model file (default: train/reuse one in --work)")
    p.add_argument("--also-judge", type=Path, action="append", default=[],
                   help="another judge scoring the same samples, e.g. of another architecture (repeatable; a column "
                        "'also %%' per judge)")
    p.add_argument("--work", type=Path, default=Path("runs") / NAME,
                   help="classifiers, generators and sample grids (default: runs/bench_generator_holo20, git-ignored)")
    add_set_arg(p, "generator", "loss.cls=0.5")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.characters, args.n, args.classifier_epochs = 0.2, args.characters if "," in \
            args.characters else "1", 32, args.classifier_epochs or 1
        args.discriminators, args.feature_size = "plain", 64
    return args


def recipe() -> Path:
    import animeai

    return Path(animeai.__file__).parent / "configs" / "holo20_lite0.yaml"


def classifier(args: argparse.Namespace, name: str, seed: int, image_size: int) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) a holo20 classifier with the shipped recipe, another seed/size per role; its val top-1."""
    from animeai.config import DetectorConfig, load_config
    from animeai.engine import train
    from animeai.inference import Classifier
    from animeai.tasks.detector import DetectorTask

    out = args.work / f"{name}.pth"
    t0 = time.perf_counter()
    trained = False
    if not out.is_file():
        over = {"data.root": str(args.data / "train"), "data.val_root": str(args.data / "val"),
                "data.image_size": image_size, "run.seed": seed, "run.out": str(out),
                "run.run_dir": str(args.work / f"{name}_run"), "run.progress": False, "run.overwrite": True}
        if args.classifier_epochs:
            over["run.epochs"] = args.classifier_epochs
        cfg = load_config(DetectorConfig, recipe(), over)
        print(f"{NAME}: training the {name} ({cfg.model.arch}, seed {seed}, {image_size} px, {cfg.run.epochs} "
              "epochs)", flush=True)
        train(cfg, DetectorTask(cfg))
        trained = True
    clf = Classifier.from_file(out, device="cpu")
    report = clf.evaluate_folder(args.data / "val", batch_size=64)
    cfg = clf.meta.get("config", {})
    return out, {"model": str(out), "trained_now": trained, "minutes": (time.perf_counter() - t0) / 60,
                 "arch": clf.meta["arch"], "seed": cfg.get("run", {}).get("seed"), "image_size": clf.image_size,
                 "epochs": clf.meta.get("epoch"), "val_top1": report["top1"]}


def train_generator(args, character: str, disc: str, detector: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    from animeai.config import GeneratorConfig, load_config
    from animeai.engine import train
    from animeai.tasks.generator import GeneratorTask

    tag = f"{character}_{disc}"
    cfg = load_config(GeneratorConfig, None, {
        "data.root": str(args.data), "data.image_size": args.image_size, "guide.detection_model": str(detector),
        "guide.target_class": character, "guide.perceptual": "efficientnet_lite0",
        "guide.perceptual_pretrained": "package", "model.discriminator": disc, "model.d_pretrained": "package",
        "run.epochs": 1_000_000, "run.eval_every": args.eval_every, "run.save_every": 1_000_000,
        "run.progress": False, "run.overwrite": True, "sample.every": args.eval_every * 20,
        "sample.folder": str(args.work / "generated_images" / disc), "run.out": str(args.work / "generators" /
                                                                                   f"{tag}.pth"),
        "run.run_dir": str(args.work / "generator_runs" / tag), **overrides,
    })
    deadline = time.perf_counter() + args.minutes * 60
    seen: list[dict[str, Any]] = []

    def budget(metrics, state_dir, task) -> None:
        seen.append(metrics)
        if "eval_s" in metrics and time.perf_counter() >= deadline:
            task.last_grid = task.grid_path(int(metrics["epoch"]))
            from animeai.generation import save_grid

            save_grid(task.sample(task.fixed_z[: cfg.sample.count]), task.last_grid)
            raise BudgetReached

    t0 = time.perf_counter()
    try:
        train(cfg, GeneratorTask(cfg), callbacks=[budget])
    except BudgetReached:
        pass
    last = seen[-1] if seen else {}
    return {"model": cfg.run.out, "train_min": (time.perf_counter() - t0) / 60, "epochs": last.get("epoch"),
            "images_per_s": last.get("images_per_s"), "guide_recognition": last.get("recognition"),
            "grid": str(Path(cfg.sample.folder) / character)}


def main(argv=None) -> int:
    args = parse_args(argv)
    data = args.data.resolve()
    if not ((data / "train").is_dir() and (data / "val").is_dir()):
        print(f"{NAME}: skipped - holo20 data not found at {data} (expected train/ and val/ inside); "
              "pass --data PATH to run it.")
        return 0
    args.data = data
    apply_threads(args.threads)


    from animeai.gen_eval import evaluate_generator

    names = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    if args.characters.strip().isdigit():
        chosen = names[: int(args.characters)]
    else:
        chosen = [c.strip() for c in args.characters.split(",") if c.strip()]
        unknown = [c for c in chosen if c not in names]
        if unknown:
            raise SystemExit(f"--characters: unknown {', '.join(unknown)}; holo20 has {', '.join(names)}")
    discs = [d.strip() for d in args.discriminators.split(",") if d.strip()]
    overrides = parse_set(args.set)
    args.work.mkdir(parents=True, exist_ok=True)

    detector, det_info = (args.detector, {"model": str(args.detector)}) if args.detector else \
        classifier(args, "detector", seed=42, image_size=160)
    judge, judge_info = (args.judge, {"model": str(args.judge)}) if args.judge else \
        classifier(args, "judge", seed=7, image_size=128)
    print(f"{NAME}: detector {det_info}\n{NAME}: judge {judge_info}", flush=True)

    rows, results = [], []
    headers = ["character", "D", "epochs", "min", "judge %", "judge real %", "guide %", "KID", "KID std", "div",
               "div real", "ratio"] + [f"also {i + 1} % (real)" for i in range(len(args.also_judge))]
    for i, j in enumerate(args.also_judge):
        print(f"{NAME}: also judge {i + 1}: {j}", flush=True)
    for character in chosen:
        for disc in discs:
            print(f"\n{NAME}: {character} / {disc}: training for {args.minutes:g} min", flush=True)
            run = train_generator(args, character, disc, detector, overrides)
            t0 = time.perf_counter()
            rep = evaluate_generator(run["model"], data, judge, n=args.n, seed=0, feature_size=args.feature_size,
                                     device="cpu", also_judges=args.also_judge)
            run["eval_s"] = time.perf_counter() - t0
            j, k, d = rep["judge"], rep["kid"], rep["diversity"]
            results.append({"character": character, "discriminator": disc, **run, "report": rep})
            rows.append([character, disc, int(run["epochs"] or 0), f"{run['train_min']:.1f}",
                         f"{100 * j['recognition']:.1f}", f"{100 * j['real_recognition']:.1f}",
                         f"{100 * (run['guide_recognition'] or 0):.0f}", f"{k['mean']:.4f}", f"{k['std']:.4f}",
                         f"{d['samples']:.3f}", f"{d['real']:.3f}", f"{d['ratio']:.2f}"]
                        + [f"{100 * o['recognition']:.1f} ({100 * o['real_recognition']:.0f})"
                           for o in rep["also_judges"]])
            print_table(headers, rows[-1:])

    summary = {}
    for disc in discs:
        mine = [r for r in results if r["discriminator"] == disc]
        if mine:
            rec = [r["report"]["judge"]["recognition"] for r in mine]
            summary[disc] = {
                "characters": len(mine), "mean_judge_recognition": sum(rec) / len(rec),
                "characters_meeting_goal": sum(x >= GOAL_RECOGNITION for x in rec),
                "mean_kid": sum(r["report"]["kid"]["mean"] for r in mine) / len(mine),
                "mean_diversity_ratio": sum(r["report"]["diversity"]["ratio"] for r in mine) / len(mine),
                "also_judges": [{"model": str(j), "mean_recognition": sum(r["report"]["also_judges"][i]["recognition"]
                                                                          for r in mine) / len(mine),
                                 "characters_meeting_goal": sum(r["report"]["also_judges"][i]["recognition"]
                                                                >= GOAL_RECOGNITION for r in mine)}
                                for i, j in enumerate(args.also_judge)],
            }
    print()
    print_table(headers, rows,
                title=f"holo20 generators, {args.image_size} px, {args.minutes:g} min each on CPU (chance "
                f"{100 / max(1, len(names)):.0f} %, goal >= {100 * GOAL_RECOGNITION:.0f} % by the independent judge)")
    print()
    print_table(["D", "characters", "mean judge %", f">= {100 * GOAL_RECOGNITION:.0f} %", "mean KID", "mean ratio"],
                [[d, s["characters"], f"{100 * s['mean_judge_recognition']:.1f}", s["characters_meeting_goal"],
                  f"{s['mean_kid']:.4f}", f"{s['mean_diversity_ratio']:.2f}"] for d, s in summary.items()],
                title="per discriminator")
    for d, sm in summary.items():
        for i, a in enumerate(sm["also_judges"]):
            print(f"{d}: also judge {i + 1} ({a['model']}): mean {100 * a['mean_recognition']:.1f} %, "
                  f"{a['characters_meeting_goal']} characters >= {100 * GOAL_RECOGNITION:.0f} %")
    print("\n'guide %' is the guiding detector's own score of the samples (what the generator trained against); "
          "'judge %' is the independent judge's. Grids: " + str(args.work / "generated_images"))
    if args.quick:
        print("(--quick: seconds of training; the numbers mean nothing)")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(characters_run=chosen, discriminators=discs, overrides=overrides, argv=sys.argv[1:])
    write_json(Path(args.out), NAME, settings, {"detector": det_info, "judge": judge_info, "summary": summary,
                                                "runs": results}, machine_info("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
