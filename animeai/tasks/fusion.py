"""Fusion: a character classifier that reads a text about the picture (tags, a caption) beside the image.

The image side is the detector's (same folder data, split, augmentation, backbone factory, ``--pretrained`` and
``--freeze-stages``: :class:`~animeai.tasks.detector.DetectorTask` is reused); the text side is a BERT-family
encoder (:mod:`animeai.models.text`); :class:`~animeai.models.fusion.FusionModel` joins them. Batches are dicts
(``images``, ``input_ids``, ``attention_mask``, ``has_text``, ``labels``): texts are tokenised per batch in the
DataLoader's collate function, never per sample in the training step.

* **Modality dropout.** Each training image's text is removed with probability ``--text-dropout`` (and images
  without any text train as such), so the model also learns to recognise images alone; evaluation reports the
  top-1 with the texts (``val_top1``, which picks the best epoch) and with every text removed (``val_top1_no_text``).
* **Freezing.** ``--freeze-text`` (default) keeps the text encoder fixed (eval mode, no gradients);
  ``--no-freeze-text`` fine-tunes it at ``lr x --text-lr-scale``. ``--freeze-image`` fixes the whole image encoder,
  ``--freeze-stages N`` its first N stages.
* **Model file** (kind ``fusion``): all weights, plus what a loader needs without the training config: the image
  architecture, size and normalisation, the class names, the text encoder's name, source and transformers config,
  the tokenizer (its ``tokenizer.json`` text) and maximum length, and the fusion type. ``animeai predict /
  evaluate / info`` read it (:mod:`animeai.fusion`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from animeai.config import FusionConfig
from animeai.data.captions import CaptionCollate, CaptionedImageDataset, CaptionError, read_captions
from animeai.data.folder import EpochShuffleSampler, build_splits, report_skipped
from animeai.data.transforms import eval_transform, train_transform
from animeai.metrics import topk_correct
from animeai.models.fusion import FusionModel
from animeai.models.registry import set_frozen_eval
from animeai.models.text import PREPROCESS, LoadedText, load_text_encoder
from animeai.tasks.detector import DetectorTask


def _examples(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


class FusionTask(DetectorTask):
    name = "fusion"  # monitors the detector's val_top1 (max)

    def __init__(self, cfg: FusionConfig):
        super().__init__(cfg)
        self.text: LoadedText | None = None
        self.caption_stats: dict[str, Any] = {}

    def setup(self, accelerator) -> None:
        cfg = self.cfg
        # Both encoders' weights first: a source that cannot deliver fails before any image is decoded.
        image, spec = self.build_backbone()
        image.reset_classifier(0)  # the backbone now returns pooled features
        if cfg.fusion.freeze_image or cfg.fusion.inputs == "text":  # a text-only baseline never runs the image side
            image.requires_grad_(False)
            image.eval()
            image.animeai_frozen = [image]
        self.text = load_text_encoder(cfg.text.encoder, cfg.text.pretrained, cfg.text.max_length,
                                      frozen=cfg.text.freeze)
        if self.text.source.startswith("none") and cfg.text.freeze and accelerator.is_main_process:
            accelerator.print("note: --text-pretrained none with a frozen text encoder: its random weights stay random "
                              "(add --no-freeze-text to train them)")
        self.mean, self.std = spec.mean, spec.std
        self.build_data(accelerator, cfg.data.image_size, spec.mean, spec.std)
        if cfg.model.channels_last:
            image = image.to(memory_format=torch.channels_last)
        f = cfg.fusion
        model = FusionModel(image, self.text.encoder, len(self.class_names), fusion=f.type, hidden=f.hidden,
                            dropout=f.dropout, inputs=f.inputs)
        if accelerator.is_main_process:
            frozen = ", frozen" if f.freeze_image else ""
            accelerator.print(f"fusion: image {cfg.model.arch} ({self.pretrained_source}{frozen}) + text "
                              f"{self.text.name} ({self.text.source}, {self.text.encoder.dim}-d, "
                              f"{'frozen' if cfg.text.freeze else 'trained'}) -> {f.type}"
                              + ("" if f.inputs == "both" else f"; inputs: {f.inputs} only (a baseline)"))
        self.models = {"model": model}
        self.optimizers = {"model": self.make_optimizer(model)}

    def make_optimizer(self, model: FusionModel) -> torch.optim.AdamW:
        """AdamW: no weight decay on 1-D tensors; a trained text encoder at ``lr x text.lr_scale``."""
        o = self.cfg.optim
        text_ids = {id(p) for p in model.text.parameters()}
        groups: dict[tuple[bool, bool], list] = {}
        for p in model.parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in text_ids, p.ndim <= 1), []).append(p)
        param_groups = []
        for (is_text, no_decay), params in sorted(groups.items()):
            param_groups.append({"params": params, "weight_decay": 0.0 if no_decay else o.weight_decay,
                                 "lr": o.lr * (self.cfg.text.lr_scale if is_text else 1.0)})
        return torch.optim.AdamW(param_groups, lr=o.lr)

    def build_data(self, accelerator, size: int, mean, std) -> None:
        """The detector's scan and split, plus each image's text (sidecar / captions.jsonl), batched with the text
        tokenised in the collate function."""
        cfg = self.cfg
        d, a = cfg.data, cfg.augment
        splits = build_splits(d.root, val_root=d.val_root, val_fraction=d.val_fraction, split_seed=d.split_seed,
                              strict=d.strict, max_pixels=d.max_image_pixels)
        self.splits = splits
        self.class_names = splits.class_names
        caps = read_captions([p for p, _ in splits.train + splits.val], [d.root] + ([d.val_root] if d.val_root else []))
        train_texts = [caps.text_of(p) for p, _ in splits.train]
        val_texts = [caps.text_of(p) for p, _ in splits.val]
        if not any(train_texts):
            raise CaptionError(f"{d.root}: no training image has a text (put <image>.txt beside each image, or "
                               'captions.jsonl lines {"file": ..., "text": ...} in the data folder); without texts, '
                               "train the detector instead (animeai train detector)")
        all_texts = [t for t in train_texts + val_texts if t]
        where = [caps.source_of(p) for p, _ in splits.train + splits.val if caps.text_of(p)]
        truncated = self.text.tokenizer.count_truncated(all_texts)
        self.text.tokenizer.warned = True  # said here, once, for the whole data set
        self.caption_stats = {"train_with_text": sum(t is not None for t in train_texts), "train": len(train_texts),
                              "val_with_text": sum(t is not None for t in val_texts), "val": len(val_texts),
                              "empty": len(caps.empty), "truncated": len(truncated), "unused": len(caps.unused)}
        if accelerator.is_main_process:
            report_skipped(splits.skipped)
            s = self.caption_stats
            accelerator.print(f"data: {len(splits.class_names)} classes, {len(splits.train)} train / "
                              f"{len(splits.val)} val images ({splits.layout}); with text: {s['train_with_text']} "
                              f"train / {s['val_with_text']} val")
            if caps.empty:
                accelerator.print(f"note: {len(caps.empty)} empty text(s), their images count as having no text: "
                                  f"{_examples(caps.empty)}")
            if truncated:
                accelerator.print(f"note: {len(truncated)} text(s) are longer than --text-max-length "
                                  f"{cfg.text.max_length} tokens and are truncated: "
                                  f"{_examples([where[i] for i in truncated])}")
            if caps.unused:
                accelerator.print(f"note: {len(caps.unused)} caption(s) for files that are not training or "
                                  f"validation images (skipped as unreadable?): {_examples(caps.unused)}")
        if not splits.val:
            raise ValueError(f"{d.root}: no validation images; give a val/ folder or --val-data, or (with "
                             "--val-fraction > 0) at least 2 images per class for the split")
        train_ds = CaptionedImageDataset(
            splits.train, train_texts,
            train_transform(size, mean, std, rotation=a.rotation, hflip=a.hflip, color_jitter=a.color_jitter,
                            crop_scale=a.crop_scale),
            max_pixels=d.max_image_pixels, draft_size=size)
        val_ds = CaptionedImageDataset(splits.val, val_texts, eval_transform(size, mean, std),
                                       max_pixels=d.max_image_pixels, draft_size=size)
        bs = cfg.optim.batch_size
        self.train_sampler = EpochShuffleSampler(len(train_ds), seed=cfg.run.seed)
        collate = CaptionCollate(self.text.tokenizer)
        common = dict(num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=d.num_workers > 0, collate_fn=collate)
        self.train_loader = DataLoader(train_ds, batch_size=bs, sampler=self.train_sampler,
                                       drop_last=len(train_ds) > bs, **common)
        self.val_loader = DataLoader(val_ds, batch_size=bs, shuffle=False, **common)

    def train_mode(self, mode: bool = True) -> None:
        for m in self.models.values():
            m.train(mode)
        if mode:
            model = self.unwrap("model")
            set_frozen_eval(model.image)
            model.text.train(True)  # a frozen text encoder stays in eval mode

    def training_step(self, batch) -> dict[str, torch.Tensor]:
        keep = batch["has_text"]
        p = self.cfg.fusion.text_dropout
        if p > 0:
            keep = keep & (torch.rand(keep.shape, device=keep.device) >= p)
        logits = self.models["model"](batch["images"], batch["input_ids"], batch["attention_mask"], keep)
        loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.cfg.optim.label_smoothing)
        return {"loss": loss}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.unwrap("model")
        loss_sum, n, top1, top5, top1_no_text, with_text = 0.0, 0, 0, 0, 0, 0
        for b in self.val_loader:
            with self.accelerator.autocast():
                img = model.image_features(b["images"])
                txt = model.text_features(b["input_ids"], b["attention_mask"], b["has_text"], img.shape[0])
                logits = model.head(img, txt).float()
                no_text = model.head(img, model.text_features(None, None, None, img.shape[0])).float()
            logits, no_text, labels, has = self.accelerator.gather_for_metrics(
                (logits, no_text, b["labels"], b["has_text"]))
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            hits = topk_correct(logits, labels, (1, 5))
            top1 += int(hits[1].sum())
            top5 += int(hits[5].sum())
            top1_no_text += int((no_text.argmax(1) == labels).sum())
            with_text += int(has.sum())
            n += labels.numel()
        n = max(n, 1)
        return {"val_loss": loss_sum / n, "val_top1": top1 / n, "val_top5": top5 / n,
                "val_top1_no_text": top1_no_text / n, "val_text_coverage": with_text / n}

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state, meta = super().export()  # the detector's fields: arch, classes, image size, normalisation, weights
        c, t = self.cfg, self.text
        meta.update({
            "kind": "fusion",
            "text": {
                "encoder": t.name, "source": t.source, "config": t.config, "dim": t.encoder.dim,
                "tokenizer": t.tokenizer.tokenizer_json, "max_length": t.tokenizer.max_length, "pooling": "mean",
                "preprocess": PREPROCESS, "frozen": bool(c.text.freeze),
            },
            "fusion": {"type": c.fusion.type, "hidden": c.fusion.hidden, "dropout": c.fusion.dropout,
                       "text_dropout": c.fusion.text_dropout, "inputs": c.fusion.inputs},
            "captions": self.caption_stats,
        })
        return state, meta
