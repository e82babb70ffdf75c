"""The animeai model file: one safetensors file = weights + JSON metadata.

The metadata says everything a loader needs without guessing (architecture, class names in id
order, image size, normalisation, the resolved training config, best metrics, library version).
Loading parses a JSON header and raw tensor bytes only: it never unpickles, so a model file cannot
run code. Files of any other kind (PyTorch pickles included) are refused with a clear message.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "animeai.model"
FORMAT_VERSION = 1
_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointError(ValueError):
    """A file that is not a usable animeai model file."""


def _library_version() -> str:
    from animeai import __version__

    return __version__


def _tensors_for_saving(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared/non-contiguous storage: give each tensor its own contiguous CPU copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_model_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write weights + metadata atomically. ``metadata`` must be JSON-serialisable."""
    meta = dict(metadata)
    meta.setdefault("library_version", _library_version())
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "metadata": json.dumps(meta, ensure_ascii=False, sort_keys=True),
    }
    data = _tensors_for_saving(tensors)
    return atomic_write(Path(path), lambda tmp: save_file(data, str(tmp), metadata=header))


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header length (u64 little-endian) and then ``{``. The length's
    first bytes can equal a pickle magic (e.g. 640 = ``80 02 ...``), so check this before sniffing for pickles."""
    return len(head) >= 9 and 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def _sniff_other_format(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if not head:
        return "it is empty (0 bytes)"
    if looks_like_safetensors(head, path.stat().st_size):
        return None
    if head.startswith(_PICKLE_MAGICS):
        return (
            "it is a PyTorch/pickle checkpoint. Pickle files can run arbitrary code when loaded, so animeai "
            "never unpickles model files; re-export it with animeai, or pass plain weights as --pretrained PATH "
            "(loaded with weights_only=True)"
        )
    return None


def read_model_file(path: str | Path, *, load_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, metadata)`` of an animeai model file, or raise ``CheckpointError``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: model file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    other = _sniff_other_format(path)
    if other:
        raise CheckpointError(f"{path}: not an animeai model file: {other}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            if header.get("format") != FORMAT:
                raise CheckpointError(
                    f"{path}: a safetensors file but not an animeai model file (no '{FORMAT}' metadata). "
                    "If it holds backbone weights, pass it as --pretrained PATH instead."
                )
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if load_tensors else {}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not an animeai model file (unreadable as safetensors: {exc})") from None
    version = header.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: model file format version {version} is not supported (need {FORMAT_VERSION})")
    try:
        meta = json.loads(header["metadata"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: model file metadata is damaged ({exc})") from None
    return tensors, meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata only (fast: the tensors are not read)."""
    return read_model_file(path, load_tensors=False)[1]


def require_keys(meta: dict[str, Any], keys: tuple[str, ...], path: str | Path) -> None:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: model file metadata lacks {', '.join(missing)}")
