"""Detector: the character classifier (pretrained backbone + new ``num_classes`` head)."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from animeai.config import ConfigError, DetectorConfig
from animeai.data.device_augment import DeviceAugment, loader_transform
from animeai.data.folder import EpochShuffleSampler, ImageFolderDataset, build_splits, report_skipped
from animeai.data.transforms import eval_transform, train_transform
from animeai.metrics import topk_correct
from animeai.models import create_model, get_model_spec
from animeai.models.metric import CosineProxyLoss, PooledFeatures
from animeai.models.registry import freeze_stages, init_head, set_frozen_eval
from animeai.tasks.base import Task


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and norm parameters (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def make_cosine_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr: float):
    """CosineAnnealingLR over the steps after an optional linear warm-up."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps),
                                                        eta_min=min_lr)
    if warmup_steps <= 0:
        return cosine
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup_steps])


def augment_on_device(on: str, device: torch.device) -> bool:
    """``--augment-on``: ``device``, ``workers``, or ``auto`` = on the device when it is a GPU."""
    return on == "device" or (on == "auto" and torch.device(device).type == "cuda")


class DetectorTask(Task):
    name = "detector"
    monitor = "val_top1"
    monitor_mode = "max"

    def __init__(self, cfg: DetectorConfig):
        super().__init__(cfg)
        self.class_names: list[str] = []
        self.pretrained_source = "none"
        self.device_augment: DeviceAugment | None = None  # --augment-on device: jitter/rotation on the device
        self._epoch_source = None  # what knows the training epoch (the sampler, or the Ray Data loader)

    def setup(self, accelerator) -> None:
        # The model (and its pretrained weights) first: a weights source that cannot deliver, or a bad
        # --freeze-stages, fails before any image is decoded. The head gets its class count after the data scan.
        model, spec = self.build_backbone()
        self.build_data(accelerator, self.cfg.data.image_size, spec.mean, spec.std)
        model = self.finish_model(model)
        self.mean, self.std = spec.mean, spec.std
        self.models = {"model": model}
        optimizer = make_optimizer(model, self.cfg.optim.lr, self.cfg.optim.weight_decay)
        mc = self.cfg.metric
        if mc.weight > 0:  # cosine proxies, in the same optimizer without weight decay (they are normalised)
            metric = CosineProxyLoss(len(self.class_names), int(model.num_features), mc.scale, mc.margin)
            self.pooled = PooledFeatures(model)
            self.models["metric"] = metric
            optimizer.add_param_group({"params": list(metric.parameters()), "weight_decay": 0.0})
        self.optimizers = {"model": optimizer}

    # --- pieces shared with tasks that train a classifier on the same data (distillation) ---------------
    def build_backbone(self):
        """``(model, spec)``: ``cfg.model``'s backbone with its pretrained weights and frozen stages, a 2-class
        head for now (:meth:`finish_model` sizes it once the classes are known)."""
        m = self.cfg.model
        spec = get_model_spec(m.arch)
        model = create_model(m.arch, 2, pretrained=m.pretrained, drop_rate=m.drop_rate)
        self.pretrained_source = model.animeai_pretrained_source
        try:
            freeze_stages(model, m.freeze_stages)
        except ValueError as exc:
            raise ConfigError(f"config key 'model.freeze_stages' (--freeze-stages): {exc}") from None
        return model, spec

    def finish_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A new ``len(class_names)`` head, initialised; channels-last if asked."""
        model.reset_classifier(len(self.class_names))
        init_head(model)
        if self.cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def build_data(self, accelerator, size: int, mean, std) -> None:
        """Scan and split ``cfg.data`` (``self.splits``, ``self.class_names``), then the datasets (augmented train
        with ``cfg.augment``, plain val) at ``size`` px normalised with ``mean``/``std``, and the loaders."""
        cfg = self.cfg
        d, a = cfg.data, cfg.augment
        splits = build_splits(d.root, val_root=d.val_root, val_fraction=d.val_fraction, split_seed=d.split_seed,
                              strict=d.strict, max_pixels=d.max_image_pixels, manifest=d.manifest,
                              progress=cfg.run.progress and accelerator.is_main_process)
        self.splits = splits
        if accelerator.is_main_process:
            report_skipped(splits.skipped)
            accelerator.print(f"data: {len(splits.class_names)} classes, {len(splits.train)} train / "
                              f"{len(splits.val)} val images ({splits.layout})")
        if not splits.val:
            raise ValueError(f"{d.root}: no validation images; give a val/ folder or --val-data, or (with "
                             "--val-fraction > 0) at least 2 images per class for the split")
        self.class_names = splits.class_names
        on_error = "raise" if d.strict else "skip"  # a file broken since validation: as an unreadable file up front
        if augment_on_device(a.on, accelerator.device):
            # The loader only decodes, crops and flips (uint8); the rest runs batched in training_step.
            transform = loader_transform(size, hflip=a.hflip, crop_scale=a.crop_scale)
            self.device_augment = DeviceAugment(mean, std, rotation=a.rotation, color_jitter=a.color_jitter,
                                                seed=cfg.run.seed, rank=accelerator.process_index
                                                ).to(accelerator.device)
        else:
            transform = train_transform(size, mean, std, rotation=a.rotation, hflip=a.hflip,
                                        color_jitter=a.color_jitter, crop_scale=a.crop_scale)
        train_ds = ImageFolderDataset(splits.train, transform, max_pixels=d.max_image_pixels, draft_size=size,
                                      on_error=on_error)
        val_ds = ImageFolderDataset(splits.val, eval_transform(size, mean, std),
                                    max_pixels=d.max_image_pixels, draft_size=size, on_error=on_error)
        bs = cfg.optim.batch_size
        self.train_sampler = EpochShuffleSampler(len(train_ds), seed=cfg.run.seed)
        common = dict(num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=d.num_workers > 0)
        if d.engine == "ray":  # decoded by Ray Data tasks on the cluster, streamed in the sampler's order
            from animeai.distributed.ray_data import make_train_loader

            self.train_loader = make_train_loader(train_ds, bs, seed=cfg.run.seed, accelerator=accelerator,
                                                  cpus=d.ray_decode_cpus, drop_last=len(train_ds) > bs)
            self._epoch_source = self.train_loader
        else:
            self.train_loader = DataLoader(train_ds, batch_size=bs, sampler=self.train_sampler,
                                           drop_last=len(train_ds) > bs, **common)
            self._epoch_source = self.train_sampler
        self.val_loader = DataLoader(val_ds, batch_size=bs, shuffle=False, **common)

    @classmethod
    def prepare_data(cls, cfg) -> None:
        """Validate the data into its manifest once, on the Ray driver, before any worker starts (see
        :meth:`animeai.tasks.base.Task.prepare_data`)."""
        d = cfg.data
        if str(d.manifest).strip() == "off":
            return
        build_splits(d.root, val_root=d.val_root, val_fraction=d.val_fraction, split_seed=d.split_seed,
                     strict=d.strict, max_pixels=d.max_image_pixels, manifest=d.manifest, progress=cfg.run.progress)

    def run_files(self) -> dict[str, str]:
        s = self.splits
        return {"split.json": json.dumps({
            "layout": s.layout, "class_names": s.class_names,
            "train": [[str(p), y] for p, y in s.train], "val": [[str(p), y] for p, y in s.val],
            "skipped": [str(e) for e in s.skipped],
        }, ensure_ascii=False, indent=0)}

    @property
    def image_size(self) -> int:
        """The input side the model trains at (and its file records)."""
        return self.cfg.data.image_size

    def train_mode(self, mode: bool = True) -> None:
        super().train_mode(mode)
        if mode:
            set_frozen_eval(self.unwrap("model"))

    def configure_schedulers(self, total_steps: int) -> dict[str, Any]:
        o = self.cfg.optim
        steps_per_epoch = total_steps / max(1, self.cfg.run.epochs)
        warmup = int(round(o.warmup_epochs * steps_per_epoch))
        return {"model": make_cosine_scheduler(self.optimizers["model"], total_steps, warmup, o.min_lr)}

    def train_images(self, images: torch.Tensor) -> torch.Tensor:
        """The training batch as the model takes it: with ``--augment-on device``, the loader's uint8 images
        jittered, normalised and rotated here (the draws seeded by run seed, epoch and rank)."""
        if self.device_augment is None:
            return images
        self.device_augment.set_epoch(self._epoch_source.epoch)
        return self.device_augment(images, augment=True)

    def training_step(self, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self.models["model"](self.train_images(images))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.optim.label_smoothing)
        if "metric" not in self.models:
            return {"loss": loss}
        metric = self.models["metric"](self.pooled.take(), labels)
        total = loss + self.cfg.metric.weight * metric
        return {"loss": total, "ce_loss": loss.detach(), "metric_loss": metric.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.models["model"]
        loss_sum, n, top1, top5 = 0.0, 0, 0, 0
        for images, labels in self.val_loader:
            logits = model(images)
            logits, labels = self.accelerator.gather_for_metrics((logits.float(), labels))
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            hits = topk_correct(logits, labels, (1, 5))
            top1 += int(hits[1].sum())
            top5 += int(hits[5].sum())
            n += labels.numel()
        n = max(n, 1)
        return {"val_loss": loss_sum / n, "val_top1": top1 / n, "val_top5": top5 / n}

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        model = self.unwrap("model")
        meta = {
            "kind": "classifier",
            "arch": self.cfg.model.arch,
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "pretrained_source": self.pretrained_source,
        }
        if "metric" in self.models:  # how the embedding was trained (the proxies stay out of the file)
            mc = self.cfg.metric
            meta["metric_loss"] = {"kind": "cosine_proxy", "weight": mc.weight, "scale": mc.scale, "margin": mc.margin}
        return model.state_dict(), meta
