"""Load a classifier model file and run it: predictions for files/folders, metrics for a labelled folder."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from animeai.checkpoint import CheckpointError, read_model_file
from animeai.data.folder import ImageFolderDataset, has_train_val, scan_folder, visible_files
from animeai.data.images import IMAGE_EXTENSIONS, ImageError, load_image
from animeai.data.transforms import eval_transform
from animeai.metrics import classification_report
from animeai.models import create_model, get_model_spec


def pick_device(device: str | None = None) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``; a device this machine does not have is
    a ``ValueError`` naming ``--device`` and what is available."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"--device {device}: only auto, cpu, cuda and cuda:N are supported")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ValueError(f"--device {device}: this machine has no CUDA GPU; use --device cpu (or auto)")
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"--device {device}: this machine has {n} GPU(s) (cuda:0 .. cuda:{n - 1})")
    return dev


class Classifier:
    """A trained character classifier with everything needed to preprocess its inputs."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device):
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        self.meta = meta
        self.device = device
        self.class_names: list[str] = list(meta["class_names"])
        self.image_size = int(meta["image_size"])
        self.transform = eval_transform(self.image_size, meta["mean"], meta["std"])

    @classmethod
    def from_file(cls, path: str | Path, device: str | None = None) -> Classifier:
        if Path(path).suffix.lower() == ".onnx":  # an `animeai export` file: run by onnxruntime, same interface
            from animeai.export import OnnxClassifier

            return OnnxClassifier.from_file(path, device)  # type: ignore[return-value]
        # The reader checks the metadata against the classifier schema and the tensors for NaN/Infinity;
        # what is left to check here is that the weights fit the architecture.
        dev = pick_device(device)  # a device this machine lacks fails before the file is read
        tensors, meta = read_model_file(path, kind="classifier")
        try:
            get_model_spec(meta["arch"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: invalid model file metadata: field 'arch': {exc}") from None
        model = create_model(meta["arch"], num_classes=len(meta["class_names"]), pretrained="none")
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not match architecture {meta['arch']}: "
                                  f"{str(exc).splitlines()[0]}") from None
        return cls(model, meta, dev)

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.to(self.device)).float().cpu()

    @torch.no_grad()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled, pre-classifier) features of a preprocessed batch, ``(n, feature_dim)``, not
        normalised: timm's ``forward_features`` then ``forward_head(pre_logits=True)``."""
        features = self.model.forward_features(batch.to(self.device, memory_format=torch.channels_last))
        return self.model.forward_head(features, pre_logits=True).float().cpu()

    def embed_paths(self, paths: Sequence[Path], batch_size: int = 32) -> torch.Tensor:
        """Features of image files (decoded like ``predict_paths``); an unreadable file raises ``ImageError``."""
        out: list[torch.Tensor] = []
        for start in range(0, len(paths), batch_size):
            chunk = [self.transform(load_image(p, draft_size=self.image_size)) for p in paths[start:start + batch_size]]
            out.append(self.embed(torch.stack(chunk)))
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)

    def _loader(self, dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def predict_paths(self, paths: Sequence[Path], top_k: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
        """One dict per path: ``{"path", "top_k": [{"class", "prob"}...]}`` or ``{"path", "error"}``."""
        k = max(1, min(top_k, len(self.class_names)))
        results: list[dict[str, Any]] = []
        batch: list[tuple[int, torch.Tensor]] = []

        def flush():
            if not batch:
                return
            probs = self.logits(torch.stack([t for _, t in batch])).softmax(dim=1)
            values, idx = probs.topk(k, dim=1)
            for (slot, _), v, ix in zip(batch, values, idx):
                results[slot]["top_k"] = [{"class": self.class_names[i], "prob": round(float(p), 6)}
                                          for p, i in zip(v.tolist(), ix.tolist())]
            batch.clear()

        for path in paths:
            results.append({"path": str(path)})
            try:
                img = load_image(path, draft_size=self.image_size)
            except ImageError as exc:
                results[-1]["error"] = exc.reason
                continue
            batch.append((len(results) - 1, self.transform(img)))
            if len(batch) >= batch_size:
                flush()
        flush()
        return results

    def evaluate_folder(self, root: str | Path, batch_size: int = 32, num_workers: int = 0) -> dict[str, Any]:
        """Metrics on a labelled folder (class folders named like the model's classes)."""
        root = Path(root)
        if has_train_val(root):
            root = root / "val"
        scan = scan_folder(root, self.class_names, require_all_classes=False)
        ds = ImageFolderDataset(scan.samples, self.transform, draft_size=self.image_size)
        logits, targets = [], []
        for images, labels in self._loader(ds, batch_size, num_workers):
            logits.append(self.logits(images))
            targets.append(labels)
        report = classification_report(torch.cat(logits), torch.cat(targets), self.class_names)
        report["data"] = str(root)
        report["skipped"] = [str(e) for e in scan.errors]
        return report


def load_predictor(path: str | Path, device: str | None = None):
    """The model of a file, by its kind: a :class:`Classifier` (or an ONNX export), or a fusion model
    (:class:`animeai.fusion.FusionClassifier`: the same ``predict_paths`` / ``evaluate_folder``, plus texts)."""
    from animeai.checkpoint import metadata_kind, read_metadata

    if Path(path).suffix.lower() != ".onnx" and metadata_kind(read_metadata(path)) == "fusion":
        from animeai.fusion import FusionClassifier

        pick_device(device)  # a device this machine lacks fails before the weights are read
        return FusionClassifier.from_file(path, device)
    return Classifier.from_file(path, device)


def expand_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted) to the image files inside.

    Image-named entries that cannot be opened (broken symbolic links, link loops, unreadable files) and
    sub-folders that cannot be walked (unreadable, folder link loops) are kept: predicting them reports why.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += [f for f in visible_files(p) if f.suffix.lower() in IMAGE_EXTENSIONS or f.is_dir()]
        else:
            out.append(p)
    return out
