"""Export a classifier model file to ONNX, checked against PyTorch.

``export_classifier(model, out)`` writes an ONNX graph (input ``images``: a float batch ``(N, 3, S, S)``
normalised as the model file says; output ``logits``; the batch axis is dynamic) with the model file's
classifier metadata (class names, image size, mean/std, architecture) as JSON in the ONNX metadata key
``animeai``, so a reader needs nothing else. It then runs the exported graph with onnxruntime on sample
images (the given image files, else seeded random inputs) and compares it with PyTorch: the top-1 class of
every sample must agree, or the export is an error (and the file is removed).

The exporter is PyTorch's TorchScript-based ONNX exporter (``dynamo=False``, opset 17 by default): it needs only
``onnx``; the newer ``torch.export`` path would add ``onnxscript``. TorchScript output is not offered:
``torch.jit`` is deprecated in the PyTorch this project supports.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_OPSET = 17
FORMATS = ("onnx",)
INSTALL_HINT = 'pip install -e ".[export]"  (or: pip install onnx onnxruntime)'


class ExportError(ValueError):
    """A model that cannot be exported, or an export that does not reproduce the PyTorch model."""


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"exporting to ONNX needs the '{module}' package, which is not installed: "
                          f"{INSTALL_HINT}") from None


def default_output(model_path: str | Path, fmt: str = "onnx") -> Path:
    return Path(model_path).with_suffix(f".{fmt}")


def sample_inputs(clf, images: Sequence[str | Path] = (), n_random: int = 8, seed: int = 0) -> torch.Tensor:
    """Preprocessed image files (decoded like ``predict``), else ``n_random`` seeded random inputs."""
    from animeai.data.images import load_image

    if images:
        return torch.stack([clf.transform(load_image(p, draft_size=clf.image_size)) for p in images])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_random, 3, clf.image_size, clf.image_size, generator=g)


def export_classifier(model_path: str | Path, out: str | Path | None = None, *, fmt: str = "onnx",
                      opset: int = DEFAULT_OPSET, images: Sequence[str | Path] = (), n_random: int = 8,
                      overwrite: bool = False) -> dict[str, Any]:
    """Export the classifier in ``model_path`` and check it; returns a summary (output path, opset, samples,
    top-1 agreement, largest logit difference). ``CheckpointError`` for a file that is not a classifier model file;
    :class:`ExportError` for a missing exporter package or an export that disagrees with PyTorch."""
    from animeai.inference import Classifier

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    clf = Classifier.from_file(model_path, device="cpu")  # refuses files that are not classifier model files
    if clf.model is None:
        raise ExportError(f"{model_path}: already an ONNX export; export the .pth model file instead")
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    out = Path(out) if out is not None else default_output(model_path, fmt)
    if out.resolve() == Path(model_path).resolve():
        raise ExportError(f"--out {out} is the model file itself; choose another path")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists")
    model = clf.model.float().to(memory_format=torch.contiguous_format).eval()
    x = sample_inputs(clf, images, n_random)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(model, (x[:1],), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph)
        meta = {k: clf.meta[k] for k in ("arch", "class_names", "image_size", "mean", "std") if k in clf.meta}
        meta["source_model"] = str(model_path)
        entry = graph.metadata_props.add()
        entry.key, entry.value = "animeai", json.dumps(meta, ensure_ascii=False)
        onnx.save(graph, str(tmp))
        check = compare_onnx(model, tmp, x, ort)
        if check["top1_agreement"] < 1.0:
            raise ExportError(f"the exported model disagrees with PyTorch on the top-1 class of "
                              f"{check['disagreements']} of {len(x)} sample(s) (largest logit difference "
                              f"{check['max_abs_diff']:.3g}); not writing {out}")
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"model": str(model_path), "out": str(out), "format": fmt, "opset": opset,
            "onnx_ir_version": int(graph.ir_version), "samples": len(x),
            "samples_from": "images" if images else "random", **check}


def compare_onnx(model: torch.nn.Module, onnx_path: str | Path, x: torch.Tensor, ort=None) -> dict[str, Any]:
    """Run ``x`` through the PyTorch model and the ONNX file (onnxruntime, CPU); top-1 agreement and the largest
    absolute logit difference."""
    ort = ort or _require("onnxruntime")
    with torch.no_grad():
        ref = model(x).float()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0]).float()
    same = ref.argmax(1) == got.argmax(1)
    return {"top1_agreement": same.float().mean().item(), "disagreements": int((~same).sum()),
            "max_abs_diff": (ref - got).abs().max().item()}


# ------------------------------------------------------------------------------------------ running an export


class OnnxClassifier:
    """An exported classifier run by onnxruntime (CPU) with the same interface as
    :class:`animeai.inference.Classifier` for ``predict`` and ``evaluate`` (``predict_paths``, ``evaluate_folder``,
    ``logits``). Preprocessing comes from the ``animeai`` metadata written by :func:`export_classifier`."""

    def __init__(self, session, meta: dict[str, Any], path: str | Path):
        from animeai.data.transforms import eval_transform

        self.session, self.meta, self.path = session, meta, Path(path)
        self.model = None
        self.device = torch.device("cpu")
        self.class_names: list[str] = list(meta["class_names"])
        self.image_size = int(meta["image_size"])
        self.transform = eval_transform(self.image_size, meta["mean"], meta["std"])

    @classmethod
    def from_file(cls, path: str | Path, device: str | None = None) -> OnnxClassifier:
        from animeai.checkpoint import CheckpointError, MetadataError, validate_metadata

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX file not found")
        if device not in (None, "auto", "cpu"):
            raise ExportError(f"--device {device}: ONNX files run on the CPU here (onnxruntime); use --device cpu")
        onnx = _require("onnx")
        ort = _require("onnxruntime")
        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as exc:  # noqa: BLE001 - any parse failure: not a usable ONNX file
            raise CheckpointError(f"{path}: not a readable ONNX file ({str(exc).splitlines()[0][:200]})") from None
        if "animeai" not in props:
            raise CheckpointError(f"{path}: an ONNX file without animeai metadata (class names, image size, "
                                  "normalisation); export it with `animeai export`")
        try:
            meta = json.loads(props["animeai"])
            validate_metadata({**meta, "kind": "classifier"}, path)
        except (ValueError, MetadataError) as exc:
            raise CheckpointError(f"{path}: damaged animeai metadata in the ONNX file ({exc})") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return cls(session, meta, path)

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.session.run(["logits"], {"images": batch.float().contiguous().numpy()})[0]
        return torch.from_numpy(out).float()

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise ExportError(f"{self.path}: an ONNX export gives logits only, no embeddings; use the .pth model file")

    def predict_paths(self, paths, top_k: int = 5, batch_size: int = 32):
        from animeai.inference import Classifier

        return Classifier.predict_paths(self, paths, top_k=top_k, batch_size=batch_size)  # type: ignore[arg-type]

    def evaluate_folder(self, root, batch_size: int = 32, num_workers: int = 0):
        from animeai.inference import Classifier

        return Classifier.evaluate_folder(self, root, batch_size=batch_size, num_workers=num_workers)  # type: ignore

    def _loader(self, dataset, batch_size: int, num_workers: int):
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
