"""Fusion model files (kind ``fusion``): the metadata schema, loading, prediction with texts, evaluation.

A fusion file carries everything needed to rebuild the model without its training config or the text encoder's
original source: the image architecture, size and normalisation, the class names, the text encoder's
``transformers`` config (JSON), its tokenizer (the ``tokenizer.json`` text) and maximum length, and the fusion
type; all weights are in the safetensors body. Loading parses JSON and raw tensors only: the tokenizer is built
by the ``tokenizers`` library from its JSON, the encoder from a built-in ``transformers`` model type (a config
asking for custom code is refused), so a file cannot run code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from animeai.checkpoint import (
    CheckpointError,
    MetadataError,
    expect_dict,
    expect_int,
    expect_str,
    read_model_file,
    register_metadata_schema,
)
from animeai.data.captions import CaptionCollate, CaptionedImageDataset, read_captions
from animeai.data.folder import has_train_val, scan_folder
from animeai.data.images import ImageError, load_image
from animeai.data.transforms import eval_transform
from animeai.metrics import classification_report

KIND = "fusion"


def _check_fusion(meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None) -> None:
    from animeai.checkpoint import _check_classifier  # the image side is a classifier's
    from animeai.models.fusion import FUSION_TYPES, INPUTS

    _check_classifier(meta, tensors)
    expect_dict(meta, "text", required=True)
    text = meta["text"]
    for key in ("encoder", "source", "tokenizer"):
        try:
            expect_str(text, key, required=True)
        except MetadataError as exc:
            raise MetadataError(f"text.{exc.field}", exc.reason) from None
    for key, lo, hi in (("max_length", 1, 1 << 16), ("dim", 1, 1 << 16)):
        try:
            expect_int(text, key, required=True, lo=lo, hi=hi)
        except MetadataError as exc:
            raise MetadataError(f"text.{exc.field}", exc.reason) from None
    try:
        expect_dict(text, "config", required=True)
    except MetadataError as exc:
        raise MetadataError(f"text.{exc.field}", exc.reason) from None
    expect_dict(meta, "fusion", required=True)
    f = meta["fusion"]
    if f.get("type") not in FUSION_TYPES:
        raise MetadataError("fusion.type", f"must be one of {', '.join(FUSION_TYPES)}, got {f.get('type')!r}")
    if f.get("inputs", "both") not in INPUTS:
        raise MetadataError("fusion.inputs", f"must be one of {', '.join(INPUTS)}, got {f.get('inputs')!r}")
    try:
        expect_int(f, "hidden", required=True, lo=1, hi=1 << 16)
    except MetadataError as exc:
        raise MetadataError(f"fusion.{exc.field}", exc.reason) from None


register_metadata_schema(KIND, _check_fusion)


def build_fusion_model(meta: dict[str, Any], origin: str, tensors: dict[str, torch.Tensor] | None = None):
    """The (randomly initialised) fusion model and its tokenizer, as a file's metadata describes them (with
    ``tensors``, the text encoder's config must fit its weights before the encoder is built)."""
    from animeai.models import create_model, get_model_spec
    from animeai.models.fusion import FusionModel
    from animeai.models.text import TextEncoder, TextTokenizer, TextWeightsError, model_from_config

    try:
        get_model_spec(meta["arch"])
    except ValueError as exc:
        raise CheckpointError(f"{origin}: invalid model file metadata: field 'arch': {exc}") from None
    image = create_model(meta["arch"], num_classes=2, pretrained="none")
    image.reset_classifier(0)
    t = meta["text"]
    try:
        prefix = "text.model."
        shapes = None if tensors is None else {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items()
                                               if k.startswith(prefix)}
        encoder = TextEncoder(model_from_config(t["config"], "text.config", shapes), frozen=True)
    except TextWeightsError as exc:
        raise CheckpointError(f"{origin}: invalid model file metadata: {exc}") from None
    try:
        tokenizer = TextTokenizer(t["tokenizer"], t["max_length"])
    except (TextWeightsError, ValueError) as exc:
        raise CheckpointError(f"{origin}: invalid model file metadata: field 'text.tokenizer': {exc}") from None
    if encoder.dim != t["dim"]:
        raise CheckpointError(f"{origin}: invalid model file metadata: field 'text.dim' is {t['dim']} but the "
                              f"encoder's config gives {encoder.dim}")
    f = meta["fusion"]
    model = FusionModel(image, encoder, len(meta["class_names"]), fusion=f["type"], hidden=f["hidden"],
                        dropout=float(f.get("dropout", 0.0)), inputs=f.get("inputs", "both"))
    return model, tokenizer


class FusionClassifier:
    """A trained fusion model: predictions for images with (or without) texts, metrics on a captioned folder."""

    kind = KIND

    def __init__(self, model, tokenizer, meta: dict[str, Any], device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device
        self.class_names: list[str] = list(meta["class_names"])
        self.image_size = int(meta["image_size"])
        self.transform = eval_transform(self.image_size, meta["mean"], meta["std"])

    @classmethod
    def from_file(cls, path: str | Path, device: str | None = None) -> FusionClassifier:
        from animeai.inference import pick_device

        dev = pick_device(device)
        tensors, meta = read_model_file(path, kind=KIND)
        model, tokenizer = build_fusion_model(meta, str(path), tensors)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not match the fusion model the metadata describes: "
                                  f"{str(exc).splitlines()[0]}") from None
        return cls(model, tokenizer, meta, dev)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, texts: Sequence[str | None] | None = None,
               where: Sequence[str] | None = None) -> torch.Tensor:
        """Logits of a preprocessed batch; ``texts`` one per image (``None`` or empty = no text)."""
        images = images.to(self.device)
        texts = [t if t and t.strip() else None for t in (texts or [None] * len(images))]
        if not any(texts):
            return self.model(images).float().cpu()
        tok = self.tokenizer([t or "" for t in texts], where=list(where) if where else None)
        has = torch.tensor([t is not None for t in texts], dtype=torch.bool, device=self.device)
        return self.model(images, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device),
                          has).float().cpu()

    def predict_paths(self, paths: Sequence[Path], top_k: int = 5, batch_size: int = 32,
                      texts: Sequence[str | None] | None = None, sidecar: bool = True) -> list[dict[str, Any]]:
        """One dict per path: ``{"path", "text", "text_source", "top_k": [...]}`` or ``{"path", "error"}``.

        ``texts``: one per path (``None`` = none given); where none is given and ``sidecar`` is on, the image's
        sidecar ``.txt`` or a ``captions.jsonl`` line in its folder is used. An empty text counts as no text."""
        if texts is not None and len(texts) != len(paths):
            raise ValueError(f"{len(texts)} texts for {len(paths)} images")
        found = read_captions([Path(p) for p in paths if Path(p).is_file()], check_orphans=False) if sidecar else None
        k = max(1, min(top_k, len(self.class_names)))
        results: list[dict[str, Any]] = []
        batch: list[tuple[int, torch.Tensor, str | None, str]] = []
        empty: list[str] = []

        def flush():
            if not batch:
                return
            probs = self.logits(torch.stack([b[1] for b in batch]), [b[2] for b in batch],
                                [b[3] for b in batch]).softmax(dim=1)
            values, idx = probs.topk(k, dim=1)
            for (slot, *_), v, ix in zip(batch, values, idx):
                results[slot]["top_k"] = [{"class": self.class_names[i], "prob": round(float(p), 6)}
                                          for p, i in zip(v.tolist(), ix.tolist())]
            batch.clear()

        for i, path in enumerate(paths):
            path = Path(path)
            text, source = (texts[i], "--text") if texts is not None and texts[i] is not None else (None, None)
            if text is None and found is not None:
                text, source = found.text_of(path), found.source_of(path)
            if text is not None and not text.strip():
                empty.append(f"{path} ({source})")
                text = None
            results.append({"path": str(path), "text": text, "text_source": source if text else None})
            try:
                img = load_image(path, draft_size=self.image_size)
            except ImageError as exc:
                results[-1] = {"path": str(path), "error": exc.reason}
                continue
            batch.append((len(results) - 1, self.transform(img), text, f"{path}: {source}"))
            if len(batch) >= batch_size:
                flush()
        flush()
        if found is not None:
            empty += [f"{s}" for s in found.empty]
        if empty:
            print(f"note: empty text for {', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}: predicted from "
                  "the image alone", file=sys.stderr)
        return results

    def evaluate_folder(self, root: str | Path, batch_size: int = 32, num_workers: int = 0) -> dict[str, Any]:
        """Metrics on a labelled folder with its texts (sidecars / captions.jsonl), and again with every text removed
        (``no_text``: what the model does on images alone)."""
        root = Path(root)
        folders = [root]
        if has_train_val(root):
            root = root / "val"
            folders.append(root)
        scan = scan_folder(root, self.class_names, require_all_classes=False)
        caps = read_captions([p for p, _ in scan.samples], folders)
        texts = [caps.text_of(p) for p, _ in scan.samples]
        ds = CaptionedImageDataset(scan.samples, texts, self.transform, draft_size=self.image_size)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=CaptionCollate(self.tokenizer))
        with_text, without, targets = [], [], []
        with torch.no_grad():
            for b in loader:
                images = b["images"].to(self.device)
                img = self.model.image_features(images)
                txt = self.model.text_features(b["input_ids"].to(self.device), b["attention_mask"].to(self.device),
                                               b["has_text"].to(self.device), img.shape[0])
                with_text.append(self.model.head(img, txt).float().cpu())
                without.append(self.model.head(img, self.model.text_features(None, None, None, img.shape[0]))
                               .float().cpu())
                targets.append(b["labels"])
        targets_t = torch.cat(targets)
        report = classification_report(torch.cat(with_text), targets_t, self.class_names)
        plain = classification_report(torch.cat(without), targets_t, self.class_names)
        report["no_text"] = {"top1": plain["top1"], "top5": plain["top5"]}
        report["with_text"] = sum(t is not None for t in texts)
        report["empty_texts"] = list(caps.empty)
        report["data"] = str(root)
        report["skipped"] = [str(e) for e in scan.errors]
        return report
