"""The animeai model file: one safetensors file = weights + JSON metadata.

The metadata says everything a loader needs without guessing (architecture, class names in id
order, image size, normalisation, the resolved training config, best metrics, library version).
Loading parses a JSON header and raw tensor bytes only: it never unpickles, so a model file cannot
run code. Files of any other kind (PyTorch pickles included) are refused with a clear message.

Every file read is checked once, here: the metadata against a schema (common fields for every kind,
then the fields of its ``kind``, see :func:`register_metadata_schema`) and the float tensors for
NaN/Infinity. Whatever is wrong with a file comes out as a :class:`CheckpointError` naming the file
and the field or tensor, never as a traceback from deeper down.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "animeai.model"
FORMAT_VERSION = 1
DEFAULT_KIND = "classifier"
MAX_IMAGE_SIZE = 8192
_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointError(ValueError):
    """A file that is not a usable animeai model file."""


class MetadataError(CheckpointError):
    """One metadata field breaks its schema. Validators raise it without ``path``; the reader adds the file."""

    def __init__(self, field: str, reason: str, path: str | Path | None = None):
        self.field, self.reason, self.path = field, reason, path
        where = f"{path}: invalid model file metadata: " if path is not None else ""
        super().__init__(f"{where}field '{field}' {reason}")


def _library_version() -> str:
    from animeai import __version__

    return __version__


def _tensors_for_saving(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared/non-contiguous storage: give each tensor its own contiguous CPU copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file.

    The file gets the mode of any newly created file (``0o666 & ~umask``), not the 0600 of the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_current_umask())
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


# ------------------------------------------------------------------------------------------ metadata schema

Validator = Callable[[dict[str, Any], "dict[str, torch.Tensor] | None"], None]
_SCHEMAS: dict[str, Validator] = {}
# Kinds whose schema lives with their capability: imported on first use, so every reader (``animeai info`` too)
# checks them without importing every capability up front.
_SCHEMA_MODULES: dict[str, str] = {"generator": "animeai.generation", "fusion": "animeai.fusion"}


def register_metadata_schema(kind: str, validator: Validator) -> None:
    """Check the metadata of model files of ``kind`` with ``validator(meta, tensors)`` on every read.

    ``meta`` is the metadata dict (the common fields already checked); ``tensors`` is the tensor dict, or
    ``None`` when only the metadata is read. The validator raises :class:`MetadataError` (field, reason)
    for the first problem; the ``expect_*`` helpers below cover the usual field types. Files of a kind
    nobody registered get the common checks only. Registering a kind again replaces its validator.
    Register at import time of the kind's module and name that module in ``_SCHEMA_MODULES``, so that readers
    which never imported it (``animeai info``) still check the kind."""
    if not isinstance(kind, str) or not kind:
        raise ValueError("a model kind is a non-empty string")
    _SCHEMAS[kind] = validator


def metadata_kind(meta: dict[str, Any]) -> str:
    """The kind of model a (validated) metadata dict describes; files without ``kind`` are classifiers."""
    return meta.get("kind", DEFAULT_KIND)


def _show(value: Any) -> str:
    kind = ("null" if value is None else "a boolean" if isinstance(value, bool) else "an integer"
            if isinstance(value, int) else "a number" if isinstance(value, float) else "a string"
            if isinstance(value, str) else "a list" if isinstance(value, list) else "an object")
    text = json.dumps(value, ensure_ascii=False)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({kind})"


_MISSING = object()


def _get(meta: dict[str, Any], key: str, required: bool) -> Any:
    value = meta.get(key, _MISSING)
    if value is _MISSING and required:
        raise MetadataError(key, "is missing")
    return value


def expect_str(meta: dict[str, Any], key: str, *, required: bool = False, non_empty: bool = True) -> None:
    value = _get(meta, key, required)
    if value is not _MISSING and (not isinstance(value, str) or (non_empty and not value)):
        raise MetadataError(key, f"must be a {'non-empty ' if non_empty else ''}string, got {_show(value)}")


def expect_dict(meta: dict[str, Any], key: str, *, required: bool = False) -> None:
    value = _get(meta, key, required)
    if value is not _MISSING and not isinstance(value, dict):
        raise MetadataError(key, f"must be an object, got {_show(value)}")


def expect_int(meta: dict[str, Any], key: str, *, required: bool = False, lo: int | None = None,
               hi: int | None = None) -> None:
    value = _get(meta, key, required)
    if value is _MISSING:
        return
    bounds = (f" from {lo} to {hi}" if lo is not None and hi is not None else f" >= {lo}" if lo is not None
              else f" <= {hi}" if hi is not None else "")
    if (not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo)
            or (hi is not None and value > hi)):
        raise MetadataError(key, f"must be an integer{bounds}, got {_show(value)}")


def expect_str_list(meta: dict[str, Any], key: str, *, required: bool = False) -> None:
    """A non-empty list of unique non-empty strings (e.g. class names)."""
    value = _get(meta, key, required)
    if value is _MISSING:
        return
    if not isinstance(value, list) or not value:
        raise MetadataError(key, f"must be a non-empty list of strings, got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise MetadataError(key, f"must hold non-empty strings, item {i} is {_show(item)}")
    seen: set[str] = set()
    dups = [x for x in value if x in seen or seen.add(x)]
    if dups:
        raise MetadataError(key, f"must not repeat names, repeated: {', '.join(map(repr, dict.fromkeys(dups)))}")


def expect_numbers(meta: dict[str, Any], key: str, length: int, *, required: bool = False,
                   positive: bool = False) -> None:
    """A list of ``length`` finite numbers (all > 0 if ``positive``)."""
    value = _get(meta, key, required)
    if value is _MISSING:
        return
    what = f"must be a list of {length} finite{' positive' if positive else ''} numbers"
    if not isinstance(value, list) or len(value) != length:
        raise MetadataError(key, f"{what}, got {_show(value)}")
    for x in value:
        if (not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x)
                or (positive and x <= 0)):
            raise MetadataError(key, f"{what}, got {_show(value)}")


def _check_common(meta: dict[str, Any]) -> None:
    expect_str(meta, "kind")
    expect_str(meta, "library_version")
    expect_dict(meta, "config")
    expect_dict(meta, "metrics")
    expect_int(meta, "epoch", lo=0)


def _check_classifier(meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None) -> None:
    expect_str(meta, "arch", required=True)
    expect_str_list(meta, "class_names", required=True)
    expect_int(meta, "num_classes", lo=1)
    if "num_classes" in meta and meta["num_classes"] != len(meta["class_names"]):
        raise MetadataError("num_classes", f"is {meta['num_classes']} but 'class_names' holds "
                                           f"{len(meta['class_names'])} names")
    expect_int(meta, "image_size", required=True, lo=1, hi=MAX_IMAGE_SIZE)
    expect_numbers(meta, "mean", 3, required=True)
    expect_numbers(meta, "std", 3, required=True, positive=True)


register_metadata_schema("classifier", _check_classifier)


def validate_metadata(meta: Any, path: str | Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Check ``meta`` (as parsed from the file at ``path``) against the common fields and its kind's schema;
    raise :class:`MetadataError` naming the file and the field. Every read of a model file calls this."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: invalid model file metadata: it must be a JSON object, got {_show(meta)}")
    try:
        _check_common(meta)
        kind = metadata_kind(meta)
        if kind not in _SCHEMAS and kind in _SCHEMA_MODULES:
            importlib.import_module(_SCHEMA_MODULES[kind])  # registers its schema
        validator = _SCHEMAS.get(kind)
        if validator is not None:
            validator(meta, tensors)
    except MetadataError as exc:
        if exc.path is not None:
            raise
        raise MetadataError(exc.field, exc.reason, path) from None


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse float tensors that hold NaN or Infinity (a diverged run must not be served)."""
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        if t.element_size() == 1:  # float8: isfinite is not implemented for every float8 type
            t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: invalid model file: tensor '{name}' holds non-finite values "
                                  "(NaN or Infinity); the run that wrote it diverged")


# ------------------------------------------------------------------------------------------ reading


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content (hex): how model files, teachers, judges and saved states are told apart."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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


# What a malformed file can make the parser raise: SafetensorError, I/O errors, UnicodeDecodeError and other
# ValueErrors, torch's RuntimeError/TypeError for odd dtypes/shapes, OverflowError, MemoryError for huge claims.
_PARSE_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError)


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _read_unchecked(path: Path, load_tensors: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors and the parsed JSON metadata, with the format checked but not the metadata schema."""
    if not path.exists():
        raise CheckpointError(f"{path}: model file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        other = _sniff_other_format(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the model file: {_short(exc)}") from None
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
    except _PARSE_ERRORS as exc:
        raise CheckpointError(f"{path}: not an animeai model file (unreadable as safetensors: {_short(exc)})") \
            from None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":  # a Rust panic in the parser arrives as pyo3's BaseException
            raise
        raise CheckpointError(f"{path}: not an animeai model file (unreadable as safetensors: {_short(exc)})") \
            from None
    version = header.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: model file format version {version} is not supported (need {FORMAT_VERSION})")
    if "metadata" not in header:
        raise CheckpointError(f"{path}: model file metadata is damaged (the header has no 'metadata' entry)")
    try:
        meta = json.loads(header["metadata"])
    except (ValueError, RecursionError, TypeError) as exc:  # JSONDecodeError, too many digits, deep nesting
        raise CheckpointError(f"{path}: model file metadata is damaged ({_short(exc)})") from None
    return tensors, meta


def read_model_file(path: str | Path, *, load_tensors: bool = True,
                    kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, metadata)`` of a valid animeai model file, or raise ``CheckpointError``.

    The metadata is checked against its schema (:func:`validate_metadata`) and, when the tensors are read, every
    float tensor must be finite. With ``kind``, a file holding another kind of model is refused too."""
    path = Path(path)
    tensors, meta = _read_unchecked(path, load_tensors)
    validate_metadata(meta, path, tensors if load_tensors else None)
    if load_tensors:
        check_finite(tensors, path)
    if kind is not None and metadata_kind(meta) != kind:
        raise CheckpointError(f"{path}: holds a '{metadata_kind(meta)}' model, not a {kind}")
    return tensors, meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata only, validated (fast: the tensors are not read)."""
    return read_model_file(path, load_tensors=False)[1]


def read_raw_metadata(path: str | Path) -> Any:
    """The metadata JSON exactly as stored, not validated (for inspection tools such as ``animeai info``).
    Raises ``CheckpointError`` only if the file is not a model file at all or its metadata is not JSON."""
    return _read_unchecked(Path(path), load_tensors=False)[1]
