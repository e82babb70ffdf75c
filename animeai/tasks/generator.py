"""Detection-guided generator: one conditional GAN per character, trained by the one engine loop.

The generator draws the target character; three judges train it, each with a config weight:

* ``loss.adv`` (0.1): a discriminator trained alongside (hinge loss, spectral norm, DiffAugment; plain or
  projected, see :mod:`animeai.models.gan`): does it look like real art?
* ``loss.cls`` (0.2): the frozen detector from ``--detection-model``: cross-entropy towards the target class
  of generated images converted to ``[0, 1]``, resized to the detector's ``image_size`` and normalised with
  its mean/std (all read from its model file).
* ``loss.perc`` (10.0): the frozen perceptual network (VGG16 by default): feature statistics of the generated
  batch vs a real batch of the character (:func:`animeai.models.perceptual.feature_stat_loss`).

Each batch runs one discriminator step, then one generator step (``manual_optimization``; both through
``accelerator.backward``). The generator step goes through the unwrapped discriminator with its weights
marked as not requiring gradients, so it never touches the discriminator's gradients (also with gradient
accumulation and DDP). An EMA copy of the generator makes the samples, the sample grids and the model file.

Real images: ``<data>/<character>/`` or, when the folder has ``train/`` and ``val/``, ``<data>/train/<character>/``
(validation images stay out, for independent evaluation). They are decoded once, resized (squashed, as the
detector sees them) to the generator's size and kept in memory.

Evaluation (cheap, every evaluation epoch): the guiding detector's recognition rate and mean target
probability of fixed-noise EMA samples, the perceptual feature-statistic distance of those samples to real
images, and the mean D/G losses since the last evaluation. None of these can pick the best generator: the
guiding detector and perceptual network are what the generator was trained to please (an adversarial
pattern can score 100 % recognition within a few epochs and then never be beaten). So ``monitor`` is the
epoch: the model file holds the latest EMA generator (the usual GAN practice); independent judges and KID
belong to ``evaluate-generator``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from animeai.checkpoint import CheckpointError, file_sha256, read_metadata
from animeai.config import ConfigError, GeneratorConfig
from animeai.data.folder import (
    DatasetError,
    EpochShuffleSampler,
    check_images,
    has_train_val,
    report_skipped,
    visible_files,
)
from animeai.data.images import ImageError, load_image
from animeai.data.manifest import open_manifest
from animeai.generation import save_grid
from animeai.models.gan import (
    create_discriminator,
    create_generator,
    d_hinge_loss,
    diff_augment,
    ema_state_dict,
    ema_update,
    g_hinge_loss,
    make_ema,
    parse_policy,
)
from animeai.models.perceptual import FrozenModule, create_perceptual, feature_stat_loss
from animeai.tasks.base import Task

LOSS_TERMS = ("adv", "cls", "perc")


# ------------------------------------------------------------------------------------------- the detector


class FrozenDetector(FrozenModule):
    """The trained detector, frozen: ``forward(images in [-1, 1]) -> logits``, preprocessing as its file says."""

    def __init__(self, model: nn.Module, meta: dict[str, Any], path: str | Path):
        super().__init__()
        self.model = model
        self.path = str(path)
        self.arch = meta["arch"]
        self.class_names: list[str] = list(meta["class_names"])
        self.image_size = int(meta["image_size"])
        self.register_buffer("mean", torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + 1) * 0.5  # tanh range -> [0, 1], what the detector's ToTensor gave it
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > size)
        return self.model((x - self.mean) / self.std).float()


def load_detector(path: str | Path, device: torch.device | str | None = None) -> FrozenDetector:
    """Load the detector's classifier model file, frozen and in eval mode (``CheckpointError`` otherwise)."""
    from animeai.inference import Classifier

    meta = read_metadata(path)
    kind = meta.get("kind", "classifier")
    if kind != "classifier":
        raise CheckpointError(f"{path}: holds a '{kind}' model, not a classifier; --detection-model needs the "
                              "detector's model file (written by `animeai train detector`)")
    device = str(device) if device is not None else "cpu"
    clf = Classifier.from_file(path, device=device)
    return FrozenDetector(clf.model, clf.meta, path).to(device)  # its mean/std buffers too


def resolve_target_class(value: str | int, class_names: list[str], source: str = "the detector") -> int:
    """The class id of ``value``: a class name of ``class_names`` (exact), else a class id."""
    text = str(value).strip()
    if text in class_names:
        return class_names.index(text)
    n = len(class_names)
    listing = ", ".join(f"{i}={name}" for i, name in enumerate(class_names[:20])) + (" ..." if n > 20 else "")
    try:
        idx = int(text)
    except ValueError:
        raise ConfigError(f"--target-class '{text}' is not a class of {source}; its classes: {listing}") from None
    if not 0 <= idx < n:
        raise ConfigError(f"--target-class {idx} is out of range: {source} has {n} classes, ids 0 to {n - 1} "
                          f"({listing})")
    return idx


def resolve_character(cfg: GeneratorConfig) -> tuple[int, str, list[str]]:
    """``(class id, character name, class names)`` for the config's target class, from the detector's metadata."""
    meta = read_metadata(cfg.guide.detection_model)
    if meta.get("kind", "classifier") != "classifier" or not isinstance(meta.get("class_names"), list):
        raise CheckpointError(f"{cfg.guide.detection_model}: holds a '{meta.get('kind')}' model, not a classifier; "
                              "--detection-model needs the detector's model file")
    names = list(meta["class_names"])
    idx = resolve_target_class(cfg.guide.target_class, names, f"the detector {cfg.guide.detection_model}")
    return idx, names[idx], names


# ------------------------------------------------------------------------------------------- real images


def find_character_images(root: str | Path, character: str, *, strict: bool = False, max_pixels: int = 50_000_000,
                          manifest: str | None = None, progress: bool = False) -> tuple[list[Path], list, Path]:
    """``(usable image paths, unreadable-file errors, folder)`` of one character in the detector's data layout.

    ``manifest``: the data manifest of ``root`` (``auto``, a path, ``off``/``None``): only the character's files
    that are new or changed since it recorded them are decoded."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (expected {root}/<character>/<images> or "
                           f"{root}/train/<character>/<images>)")
    base = root / "train" if has_train_val(root) or (root / "train" / character).is_dir() else root
    folder = base / character
    if not folder.is_dir():
        raise DatasetError(f"character '{character}': no folder {folder} (real images of the character go in "
                           f"<data>/<character>/ or <data>/train/<character>/; --data is {root})")
    files = [(p, character) for p in visible_files(folder)]
    ok, errors = check_images(files, open_manifest(root, manifest), scope=[folder], max_pixels=max_pixels,
                              progress=progress)
    if strict and errors:
        raise DatasetError(f"unreadable image (strict mode): {errors[0]}")
    if not ok:
        why = f"all {len(errors)} files are unreadable, first: {errors[0]}" if errors else "the folder is empty"
        raise DatasetError(f"character '{character}': no usable image in {folder} ({why})")
    return list(ok), errors, folder


class RealImages(Dataset):
    """The character's real images, decoded once and kept as uint8 at the generator's size.

    Items are ``(image in [-1, 1], class id)``; a random horizontal flip with probability ``hflip``. A file that
    broke since it was validated (e.g. after the data manifest recorded it) is left out and listed in ``skipped``
    (with ``strict``: its ``ImageError`` is raised); none left is a ``DatasetError``."""

    def __init__(self, paths: list[Path], image_size: int, label: int, hflip: float = 0.5,
                 max_pixels: int = 50_000_000, *, strict: bool = False):
        images, kept, self.skipped = [], [], []
        for p in paths:
            try:
                img = load_image(p, max_pixels=max_pixels, draft_size=image_size)
            except ImageError as exc:
                if strict:
                    raise
                self.skipped.append(exc)
                continue
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, reducing_gap=3.0)
            images.append(pil_to_tensor(img))
            kept.append(p)
        if not images:
            raise DatasetError(f"no usable image among {len(paths)} file(s), first: {self.skipped[0]}" if paths
                               else "no image files")
        self.images = torch.stack(images)
        self.paths, self.label, self.hflip = kept, int(label), float(hflip)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i].float() / 127.5 - 1.0

    def __getitem__(self, i: int):
        x = self.image(i)
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            x = x.flip(-1)
        return x, self.label


# ---------------------------------------------------------------------------------------------- the task


class GeneratorTask(Task):
    name = "generator"
    monitor = "epoch"  # the latest EMA generator: see the module docstring for why no guiding metric picks it
    monitor_mode = "max"
    manual_optimization = True
    resume_safe_keys = frozenset({"sample.every", "sample.count", "sample.eval_count", "sample.folder"})

    def __init__(self, cfg: GeneratorConfig):
        super().__init__(cfg)
        self.detector: FrozenDetector | None = None
        self.perceptual: FrozenModule | None = None
        self.class_names: list[str] = []
        self.class_id = 0
        self.character = ""
        self.last_grid: Path | None = None

    # --- construction -------------------------------------------------------------------------
    def generator_params(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"image_size": self.cfg.data.image_size, "z_dim": m.z_dim, "num_classes": len(self.class_names),
                "embed_dim": m.embed_dim, "channels": m.g_channels, "max_channels": m.g_max_channels}

    def discriminator_params(self) -> dict[str, Any]:
        m, size = self.cfg.model, self.cfg.data.image_size
        if m.discriminator == "plain":
            return {"image_size": size, "channels": m.d_channels, "max_channels": m.d_max_channels}
        return {"image_size": size, "backbone": m.d_backbone, "pretrained": m.d_pretrained, "channels": m.d_channels,
                "seed": self.cfg.run.seed}

    def setup(self, accelerator) -> None:
        cfg, device = self.cfg, accelerator.device
        if not any(getattr(cfg.loss, k) > 0 for k in LOSS_TERMS):
            raise ConfigError("all generator loss weights are 0 (--adv-weight, --cls-weight, --perc-weight): "
                              "nothing would train the generator")
        self.detector = load_detector(cfg.guide.detection_model, device)
        # recorded in the model file: `evaluate-generator` refuses this very detector as an independent judge
        self.detector_sha256 = file_sha256(cfg.guide.detection_model)
        self.class_names = self.detector.class_names
        self.class_id = resolve_target_class(cfg.guide.target_class, self.class_names,
                                             f"the detector {cfg.guide.detection_model}")
        self.character = self.class_names[self.class_id]
        d = cfg.data
        paths, errors, folder = find_character_images(d.root, self.character, strict=d.strict,
                                                      max_pixels=d.max_image_pixels, manifest=d.manifest,
                                                      progress=cfg.run.progress and accelerator.is_main_process)
        self.real_folder, self.skipped = folder, errors
        self.dataset = dataset = RealImages(paths, d.image_size, self.class_id, d.hflip, d.max_image_pixels,
                                            strict=d.strict)
        errors = errors + dataset.skipped  # files broken since the manifest recorded them
        if accelerator.is_main_process:
            report_skipped(errors)
            accelerator.print(f"data: {len(dataset)} real images of '{self.character}' (class {self.class_id}) "
                              f"from {folder}")
        self.perceptual = create_perceptual(cfg.guide.perceptual, cfg.guide.perceptual_pretrained).to(device)
        self.policy = parse_policy(cfg.model.diffaugment)

        generator = create_generator(cfg.model.generator, **self.generator_params())
        discriminator = create_discriminator(cfg.model.discriminator, **self.discriminator_params())
        self.models = {"generator": generator, "discriminator": discriminator, "generator_ema": make_ema(generator)}
        o = cfg.optim
        betas = (o.beta1, o.beta2)
        self.optimizers = {
            "generator": torch.optim.Adam(generator.parameters(), lr=o.g_lr, betas=betas),
            "discriminator": torch.optim.Adam([p for p in discriminator.parameters() if p.requires_grad],
                                              lr=o.d_lr, betas=betas),
        }
        bs = min(o.batch_size, len(dataset))
        self.train_sampler = EpochShuffleSampler(len(dataset), seed=cfg.run.seed)
        self.train_loader = DataLoader(dataset, batch_size=bs, sampler=self.train_sampler,
                                       drop_last=len(dataset) > bs, num_workers=d.num_workers,
                                       persistent_workers=d.num_workers > 0)
        self.val_loader = None
        g = torch.Generator().manual_seed(cfg.run.seed + 1)
        n_eval = max(cfg.sample.eval_count, cfg.sample.count)
        self.fixed_z = torch.randn(n_eval, cfg.model.z_dim, generator=g).to(device)
        self.fixed_real = torch.stack([dataset.image(i) for i in range(min(len(dataset), n_eval))]).to(device)
        self._sums: dict[str, torch.Tensor] = {}
        self._last_grid_epoch: int | None = None  # set at the first step (after a resume: the epochs done)

    def run_files(self) -> dict[str, str]:
        return {"real_images.json": json.dumps({
            "character": self.character, "class_id": self.class_id, "folder": str(self.real_folder),
            "images": [str(p) for p in self.dataset.paths], "skipped": [str(e) for e in self.skipped],
        }, ensure_ascii=False, indent=0)}

    def train_mode(self, mode: bool = True) -> None:
        self.models["generator"].train(mode)
        self.models["discriminator"].train(mode)  # its frozen backbone stays in eval mode (FrozenModule)
        self.models["generator_ema"].eval()

    # --- losses ---------------------------------------------------------------------------------
    def loss_weights(self) -> dict[str, float]:
        return {k: float(getattr(self.cfg.loss, k)) for k in LOSS_TERMS}

    def generator_loss(self, fake: torch.Tensor, real: torch.Tensor, labels: torch.Tensor,
                       discriminator: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(weighted total, unweighted terms)``; a term whose weight is 0 is not computed at all."""
        w = self.loss_weights()
        terms: dict[str, torch.Tensor] = {}
        if w["adv"] > 0:
            terms["adv"] = g_hinge_loss(discriminator(diff_augment(fake, self.policy)))
        if w["cls"] > 0:
            seen = diff_augment(fake, self.policy) if self.cfg.guide.cls_augment else fake
            terms["cls"] = F.cross_entropy(self.detector(seen), labels)
        if w["perc"] > 0:
            with torch.no_grad():
                real_feats = self.perceptual(real)
            terms["perc"] = feature_stat_loss(self.perceptual(fake), real_feats)
        total = sum(w[k] * v for k, v in terms.items())
        return total, terms

    def training_step(self, batch) -> dict[str, torch.Tensor]:
        real, labels = batch
        acc = self.accelerator
        if self._last_grid_epoch is None:
            self._last_grid_epoch = self.train_sampler.epoch
        G, D = self.models["generator"], self.models["discriminator"]
        opt_g, opt_d = self.optimizers["generator"], self.optimizers["discriminator"]
        b = real.shape[0]
        z = torch.randn(b, self.cfg.model.z_dim, device=real.device)

        # Discriminator step: real vs (detached) generated, both augmented, in one forward pass.
        with acc.autocast():
            fake = G(z, labels)
            logits = D(diff_augment(torch.cat([real, fake.detach()]), self.policy))
            d_loss = d_hinge_loss(logits[:b], logits[b:])
        acc.backward(d_loss)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

        # Generator step through the bare discriminator with its weights frozen for this pass.
        d_plain = acc.unwrap_model(D)
        trainable = [p for p in d_plain.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            with acc.autocast():
                g_loss, terms = self.generator_loss(fake, real, labels, d_plain)
        finally:
            for p in trainable:
                p.requires_grad_(True)
        acc.backward(g_loss)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            ema_update(self.unwrap("generator_ema"), acc.unwrap_model(G), self.cfg.model.ema_decay)

        logs = {"g_loss": g_loss.detach(), "d_loss": d_loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        for k, v in logs.items():
            self._sums[k] = self._sums.get(k, torch.zeros((), device=v.device)) + v.float()
        self._sums["steps"] = self._sums.get("steps", torch.zeros((), device=real.device)) + 1
        return {"loss": logs["g_loss"] + logs["d_loss"], **logs}

    # --- evaluation and export ------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch being trained / just trained (1-based; the engine sets the sampler's epoch)."""
        return self.train_sampler.epoch + 1

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        ema = self.models["generator_ema"]
        labels = torch.full((z.shape[0],), self.class_id, dtype=torch.long, device=z.device)
        out = []
        for zc, yc in zip(z.split(self.cfg.optim.batch_size), labels.split(self.cfg.optim.batch_size)):
            with self.accelerator.autocast():
                out.append(ema(zc, yc).float())
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        images = self.sample(self.fixed_z)
        bs = cfg.optim.batch_size
        with acc.autocast():
            logits = torch.cat([self.detector(x) for x in images.split(bs)])
            fake_feats = [torch.cat(f) for f in zip(*[self.perceptual(x) for x in images.split(bs)])]
            real_feats = [torch.cat(f) for f in zip(*[self.perceptual(x) for x in self.fixed_real.split(bs)])]
        probs = logits.float().softmax(dim=1)
        metrics = {
            "recognition": (probs.argmax(dim=1) == self.class_id).float().mean().item(),
            "target_prob": probs[:, self.class_id].mean().item(),
            "perc_dist": feature_stat_loss(fake_feats, real_feats).item(),
        }
        if self._sums:
            keys = sorted(self._sums)
            totals = acc.reduce(torch.stack([self._sums[k] for k in keys]).clone(), "sum")
            steps = totals[keys.index("steps")].clamp(min=1)
            metrics.update({k: (totals[i] / steps).item() for i, k in enumerate(keys) if k != "steps"})
            self._sums = {}
        epoch, every = self.epoch, cfg.sample.every
        # A grid when a multiple of sample.every was reached since the last grid (evaluation may run only every
        # run.eval_every epochs), and at the last epoch.
        last = self._last_grid_epoch if self._last_grid_epoch is not None else epoch - 1
        if epoch >= cfg.run.epochs or epoch // every > last // every:
            if acc.is_main_process:
                self.last_grid = save_grid(images[: cfg.sample.count], self.grid_path(epoch))
            self._last_grid_epoch = epoch
        metrics["epoch"] = float(epoch)
        return metrics

    def grid_path(self, epoch: int) -> Path:
        return Path(self.cfg.sample.folder) / self.character / f"samples_epoch_{epoch}.png"

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        cfg = self.cfg
        meta = {
            "kind": "generator",
            "arch": cfg.model.generator,
            "generator": self.generator_params(),
            "image_size": cfg.data.image_size,
            "z_dim": cfg.model.z_dim,
            "num_classes": len(self.class_names),
            "class_id": self.class_id,
            "character": self.character,
            "class_names": self.class_names,
            "detection_model": str(cfg.guide.detection_model),
            "detection_model_sha256": self.detector_sha256,
            "detector_arch": self.detector.arch,
            "discriminator": cfg.model.discriminator,
            "perceptual": f"{cfg.guide.perceptual} ({self.perceptual.pretrained_source})",
            "output_range": [-1.0, 1.0],
            "ema_updates": int(self.unwrap("generator_ema").ema_updates),
        }
        return ema_state_dict(self.unwrap("generator_ema")), meta
