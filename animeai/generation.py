"""Use trained generators: load a generator model file, sample images, write grids; the local generator job.

    animeai generate --model models/generators/akari.pth --n 16 --out grid.png --seed 0
    python jobs/generate_from_detection.py --target_class 0 --num_epochs 3000 \
        --detection_model models/character_classifier.pth
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from animeai.checkpoint import (
    MAX_IMAGE_SIZE,
    CheckpointError,
    MetadataError,
    expect_dict,
    expect_int,
    expect_str,
    expect_str_list,
    read_model_file,
    register_metadata_schema,
)


def check_generator_metadata(meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None) -> None:
    """Schema of ``kind: generator`` model files (see :func:`animeai.checkpoint.register_metadata_schema`)."""
    expect_str(meta, "arch", required=True)
    expect_dict(meta, "generator", required=True)
    expect_str(meta, "character", required=True)
    expect_str_list(meta, "class_names", required=True)
    expect_int(meta, "class_id", required=True, lo=0, hi=len(meta["class_names"]) - 1)
    expect_int(meta, "num_classes", lo=1)
    expect_int(meta, "image_size", required=True, lo=1, hi=MAX_IMAGE_SIZE)
    expect_int(meta, "z_dim", required=True, lo=1)
    if meta["class_names"][meta["class_id"]] != meta["character"]:
        raise MetadataError("character", f"is {meta['character']!r} but class {meta['class_id']} of 'class_names' is "
                            f"{meta['class_names'][meta['class_id']]!r}")
    expect_str(meta, "detection_model")
    expect_str(meta, "detection_model_sha256")  # the detector file's content hash (evaluate-generator's judge check)


register_metadata_schema("generator", check_generator_metadata)


# -------------------------------------------------------------------------------------------- sampling


def load_generator(path: str | Path, device: str | torch.device | None = None) -> tuple[torch.nn.Module, dict]:
    """The (EMA) generator of a generator model file, in eval mode, and its metadata."""
    from animeai.inference import pick_device
    from animeai.models.gan import create_generator

    tensors, meta = read_model_file(path)
    kind = meta.get("kind", "classifier")
    if kind != "generator":
        raise CheckpointError(f"{path}: holds a '{kind}' model, not a generator (written by `animeai train "
                              "generator` or jobs/generate_from_detection.py)")
    try:
        model = create_generator(meta["arch"], **meta["generator"])
        model.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: generator weights do not match the architecture in its metadata: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.to(pick_device(None if device is None else str(device))).eval(), meta


@torch.no_grad()
def sample_images(generator: torch.nn.Module, n: int, *, class_id: int = 0, seed: int | None = None,
                  batch_size: int = 64) -> torch.Tensor:
    """``n`` images in ``[-1, 1]`` on the CPU. The noise is drawn on the CPU, so a seed gives the same images on
    every device (up to floating-point differences)."""
    if n < 1:
        raise ValueError(f"the number of images must be >= 1, got {n}")
    device = next(generator.parameters()).device
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    z = torch.randn(n, generator.z_dim, generator=g)
    labels = torch.full((n,), int(class_id), dtype=torch.long)
    out = [generator(zc.to(device), yc.to(device)).float().cpu()
           for zc, yc in zip(z.split(batch_size), labels.split(batch_size))]
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images in ``[-1, 1]`` as one PNG grid (``nrow`` per row; default: a square-ish grid)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    save_image(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), str(path), nrow=nrow, padding=2)
    return path


def generate_grid(model: str | Path, n: int, out: str | Path, *, seed: int | None = None, nrow: int | None = None,
                  device: str | None = None) -> dict[str, Any]:
    """Sample ``n`` images of a generator model file into the PNG grid ``out``; return a summary."""
    generator, meta = load_generator(model, device)
    images = sample_images(generator, n, class_id=meta["class_id"], seed=seed)
    path = save_grid(images, out, nrow)
    return {"out": str(path), "n": n, "seed": seed, "character": meta["character"], "class_id": meta["class_id"],
            "image_size": meta["image_size"], "model": str(model)}


# ------------------------------------------------------------------------------------- independent judge


def load_judge(path: str | Path, device: str | torch.device | None = None):
    """An independent judge: a classifier model file trained separately from the generator's guiding detector
    (another seed, split or architecture), frozen; called on images in ``[-1, 1]``, it resizes and normalises
    them as its file says (see :class:`animeai.tasks.generator.FrozenDetector`) and returns logits."""
    from animeai.tasks.generator import load_detector

    return load_detector(path, device)


@torch.no_grad()
def judge_scores(images: torch.Tensor, judge, character: str, batch_size: int = 64) -> dict[str, float]:
    """How an independent judge (:func:`load_judge`) sees generated ``images`` (in ``[-1, 1]``) of ``character``:
    ``judge_recognition`` (the fraction it classifies as the character; chance is 1 / its classes) and
    ``judge_target_prob`` (its mean probability of the character). The character is matched by name, so the
    judge may have other classes, or the same ones in another order, than the guiding detector."""
    if character not in judge.class_names:
        raise ValueError(f"the judge {judge.path} does not know the character {character!r}; its classes: "
                         f"{', '.join(judge.class_names[:20])}{' ...' if len(judge.class_names) > 20 else ''}")
    idx = judge.class_names.index(character)
    device = judge.mean.device
    probs = torch.cat([judge(x.to(device).float()).softmax(dim=1).cpu() for x in images.split(batch_size)])
    return {"judge_recognition": (probs.argmax(dim=1) == idx).float().mean().item(),
            "judge_target_prob": probs[:, idx].mean().item()}


# ---------------------------------------------------------------------------------------- the local job

SMOKE_DATA = {"num_classes": 3, "images_per_class": 16, "image_size": 64, "seed": 0}
SMOKE_OVERRIDES = {
    "data.image_size": 32, "guide.perceptual": "efficientnet_lite0", "guide.perceptual_pretrained": "package",
    "model.z_dim": 32, "model.embed_dim": 8, "model.g_channels": 16, "model.g_max_channels": 64,
    "model.d_channels": 16, "model.d_pretrained": "package", "optim.batch_size": 8, "run.epochs": 10,
    "sample.every": 5, "sample.eval_count": 16, "run.progress": False,
}


def build_job_parser() -> argparse.ArgumentParser:
    from animeai.config import GeneratorConfig, add_config_arguments

    p = argparse.ArgumentParser(
        description="Train the generator of one character, guided by a trained detector (local by default).",
        epilog="example: python jobs/generate_from_detection.py --target_class 0 --num_epochs 3000 "
        "--detection_model models/character_classifier.pth --data data/all_characters",
    )
    p.add_argument("--config", metavar="YAML", help="YAML file of config sections (flags given here win)")
    add_config_arguments(p, GeneratorConfig)
    g = p.add_argument_group("the original design's flag names")
    g.add_argument("--target_class", dest="guide.target_class", default=argparse.SUPPRESS, metavar="ID_OR_NAME",
                   help="same as --target-class")
    g.add_argument("--detection_model", dest="guide.detection_model", default=argparse.SUPPRESS, metavar="PATH",
                   help="same as --detection-model")
    g.add_argument("--num_epochs", "--num-epochs", dest="run.epochs", type=int, default=argparse.SUPPRESS,
                   metavar="N", help="same as --epochs")
    j = p.add_argument_group("job options")
    j.add_argument("--smoke-test", "--smoke_test", action="store_true",
                   help="tiny generated characters, a quickly trained tiny detector, 10 short epochs at 32 px "
                   "(about a minute on a CPU)")
    j.add_argument("--num-workers", "--num_workers", type=int, default=None,
                   help="Ray Train workers: not available for the generator yet (trains locally)")
    return p


def train_smoke_classifier(workdir: Path, data: Path, name: str = "detector", seed: int = 42,
                           split_seed: int = 0) -> Path:
    """Train a tiny classifier on the smoke data (4 epochs, Lite0 offline weights, 64 px) into
    ``workdir/<name>.pth``. Other seeds (weights init and shuffling; the train/val split) make an independent
    judge of the same characters."""
    from animeai.config import DetectorConfig, load_config
    from animeai.engine import train
    from animeai.tasks.detector import DetectorTask

    cfg = load_config(DetectorConfig, None, {
        "data.root": str(data), "data.image_size": 64, "data.num_workers": 0, "data.split_seed": split_seed,
        "model.arch": "efficientnet_lite0", "model.pretrained": "package", "optim.batch_size": 16, "run.epochs": 4,
        "run.seed": seed, "run.progress": False, "run.out": str(workdir / f"{name}.pth"),
        "run.run_dir": str(workdir / f"{name}_run"),
    })
    return train(cfg, DetectorTask(cfg)).model_path


def make_smoke_setup(workdir: str | Path | None = None, *, judge: bool = False) -> dict[str, Path]:
    """What every generator ``--smoke-test`` trains on: tiny generated characters (``SMOKE_DATA``) in
    ``workdir/chars`` and a detector trained on them briefly; with ``judge``, also an independent judge
    classifier (another seed). Returns ``{"workdir", "data", "detector"[, "judge"]}`` (absolute paths)."""
    from animeai.data.synthetic import make_synthetic_dataset

    # Tiny models gain nothing from several intra-op threads, and on a busy machine they lose a lot to them.
    torch.set_num_threads(1)
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="animeai-generator-smoke-"))
    work = work.absolute()
    make_synthetic_dataset(work / "chars", **SMOKE_DATA)
    print(f"smoke test: data and outputs in {work}", file=sys.stderr)
    out = {"workdir": work, "data": work / "chars", "detector": train_smoke_classifier(work, work / "chars")}
    if judge:
        out["judge"] = train_smoke_classifier(work, work / "chars", "judge", seed=7, split_seed=7)
    return out


def _smoke_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Tiny generated characters and a detector trained on them briefly; the epochs/target given win."""
    smoke = make_smoke_setup()
    work = smoke["workdir"]
    over = {**SMOKE_OVERRIDES, "data.root": str(smoke["data"]), "guide.detection_model": str(smoke["detector"]),
            "run.out": str(work / "generator.pth"), "run.run_dir": str(work / "generator_run"),
            "sample.folder": str(work / "generated_images")}
    for key in ("run.epochs", "guide.target_class"):
        if hasattr(args, key):
            over[key] = getattr(args, key)
    return over


def job_main(argv: list[str] | None = None) -> int:
    """``jobs/generate_from_detection.py``: build the config from the flags, train with the engine, report."""
    from animeai.config import ConfigError, GeneratorConfig, config_from_args, load_config, with_overrides
    from animeai.engine import train
    from animeai.tasks.generator import GeneratorTask, resolve_character

    args = build_job_parser().parse_args(argv)
    if args.num_workers is not None:
        print("error: --num-workers (Ray Train) is not available for the generator yet; run without it to train "
              "locally", file=sys.stderr)
        return 2
    try:
        if args.smoke_test:
            cfg = with_overrides(config_from_args(GeneratorConfig, args, args.config), _smoke_overrides(args))
        else:
            from animeai.config import explicit_overrides

            overrides = explicit_overrides(GeneratorConfig, args, args.config)
            if "run.out" not in overrides and "run.run_dir" not in overrides:
                # One generator per character: default model file and run folder named after the character.
                _, character, _ = resolve_character(load_config(GeneratorConfig, None, overrides))
                overrides.update({"run.out": f"models/generators/{character}.pth",
                                  "run.run_dir": f"runs/generators/{character}"})
            if overrides.get("run.resume"):
                from animeai.runs import resume_config

                # the run's saved config + what may change
                cfg = resume_config(GeneratorConfig, overrides, GeneratorTask.resume_safe_keys)
            else:
                cfg = load_config(GeneratorConfig, None, overrides)
        # Under `ray job submit` relative outputs would land in Ray's temporary working dir and vanish with it:
        # the same rule as every job (animeai.distributed.jobs.job_paths, which imports no Ray).
        from animeai.distributed.jobs import job_paths

        paths = job_paths({"--out": cfg.run.out, "--run-dir": str(cfg.run.resolved_run_dir()),
                           "--samples-dir": cfg.sample.folder},
                          {"--data": cfg.data.root, "--detection-model": cfg.guide.detection_model},
                          examples={"--out": "/shared/models/generators/NAME.pth",
                                    "--run-dir": "/shared/runs/generators/NAME",
                                    "--samples-dir": "/shared/generated_images"})
        cfg = with_overrides(cfg, {"run.out": paths["--out"], "run.run_dir": paths["--run-dir"],
                                   "sample.folder": paths["--samples-dir"], "data.root": paths["--data"],
                                   "guide.detection_model": paths["--detection-model"]})
        task = GeneratorTask(cfg)
        result = train(cfg, task)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:  # incl. data, weights, run errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {"character": task.character, "class_id": task.class_id, "model": str(result.model_path),
               "run_dir": str(result.run_dir), "samples": str(task.last_grid) if task.last_grid else None,
               "metrics": {k: v for k, v in result.best_metrics.items() if isinstance(v, (int, float))}}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
