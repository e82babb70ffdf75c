"""Texts about the images, for fusion: sidecar files and ``captions.jsonl``, read and checked up front.

Two ways to give an image a text (tags such as ``pink_hair, ribbon, idol`` or a description):

* a sidecar file beside the image: ``akari/akari_0001.txt`` for ``akari/akari_0001.jpg`` (UTF-8);
* a ``captions.jsonl`` file in a data folder (the dataset root, ``train/`` / ``val/``, or a character folder), one
  JSON object per line: ``{"file": "akari/akari_0001.jpg", "text": "pink_hair, ribbon"}``, ``file`` relative to
  the folder holding ``captions.jsonl`` (or absolute). Blank lines are ignored; other keys are allowed.

An image may have no text (it trains with the text left out, as modality dropout does). Errors name the file and,
for ``captions.jsonl``, the line: a line that is not a JSON object with string ``file`` and ``text``, a caption for
an image that does not exist (a sidecar ``x.txt`` with no ``x.jpg``/``x.png``/... beside it too), two captions for
one image, a caption file that is not UTF-8. An empty text is not an error: the image counts as having no text, and
the reader says how many such texts there are (:attr:`Captions.empty`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from animeai.data.folder import CAPTION_SUFFIX, CAPTIONS_FILE, DatasetError, Sample
from animeai.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image

MAX_CAPTION_BYTES = 1 << 20  # a caption is a tag list or a paragraph: a larger sidecar is not a caption


class CaptionError(DatasetError):
    """A caption file that cannot be used; the message names the file (and line)."""


@dataclass
class Captions:
    texts: dict[Path, str] = field(default_factory=dict)  # image -> non-empty text
    sources: dict[Path, str] = field(default_factory=dict)  # image -> "x.txt" or "captions.jsonl:LINE"
    empty: list[str] = field(default_factory=list)  # sources whose text is empty (the image has no text)
    unused: list[str] = field(default_factory=list)  # captions of existing files that are not dataset images

    def text_of(self, path: Path) -> str | None:
        return self.texts.get(_key(path))

    def source_of(self, path: Path) -> str | None:
        return self.sources.get(_key(path))


def _key(path: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(path)))


def _read_text_file(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CAPTION_BYTES:
            raise CaptionError(f"{path}: caption file of {size} bytes, more than {MAX_CAPTION_BYTES} (1 MiB): not a "
                               "caption")
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(f"{path}: caption file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CaptionError(f"{path}: cannot read the caption file ({exc.strerror or exc})") from None


def _add(caps: Captions, image: Path, text: str, source: str, known: set[Path]) -> None:
    key = _key(image)
    if key not in known:
        caps.unused.append(source)
        return
    if key in caps.sources:
        raise CaptionError(f"{source}: a second caption for {image} (the first: {caps.sources[key]}); give each "
                           "image one caption")
    caps.sources[key] = source
    if text.strip():
        caps.texts[key] = text.strip()
    else:
        caps.empty.append(source)


def _has_image_beside(txt: Path) -> bool:
    return any(txt.with_suffix(ext).exists() or txt.with_suffix(ext.upper()).exists() for ext in IMAGE_EXTENSIONS)


def read_jsonl(path: Path, caps: Captions, known: set[Path]) -> None:
    """Add the captions of one ``captions.jsonl`` file (``CaptionError`` naming the line for a bad one)."""
    content = _read_text_file(path) if path.stat().st_size <= MAX_CAPTION_BYTES * 64 else None
    if content is None:
        raise CaptionError(f"{path}: more than 64 MiB: too large for a captions file")
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise CaptionError(f"{where}: not a JSON object ({exc}); each line must be "
                               '{"file": "<image path>", "text": "<caption>"}') from None
        if not isinstance(obj, dict):
            raise CaptionError(f"{where}: a JSON {type(obj).__name__}, not an object with 'file' and 'text'")
        for k in ("file", "text"):
            if k not in obj:
                raise CaptionError(f"{where}: the key '{k}' is missing (each line: "
                                   '{"file": "<image path>", "text": "<caption>"})')
            if not isinstance(obj[k], str):
                raise CaptionError(f"{where}: '{k}' must be a string, got {json.dumps(obj[k])[:60]}")
        if not obj["file"].strip():
            raise CaptionError(f"{where}: 'file' is empty")
        image = Path(obj["file"])
        image = image if image.is_absolute() else path.parent / image
        if not image.exists():
            raise CaptionError(f"{where}: caption for a missing image {image} (paths are relative to {path.parent})")
        _add(caps, image, obj["text"], where, known)


def read_captions(images: Sequence[Path], folders: Sequence[Path] = (), *, check_orphans: bool = True) -> Captions:
    """The captions of ``images``: their sidecar ``.txt`` files, and every ``captions.jsonl`` in ``folders`` (the
    data roots), in their sub-folders (character folders) and in the images' own folders. With ``check_orphans``,
    a sidecar ``.txt`` with no image beside it is an error (a caption for a missing image).
    """
    known = {_key(p) for p in images}
    caps = Captions()
    dirs: dict[Path, Path] = {}
    for root in map(Path, folders):
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() \
            else []
        for d in [root, *subdirs]:
            dirs.setdefault(_key(d), d)
    for d in sorted({Path(p).parent for p in images}):
        dirs.setdefault(_key(d), d)
    for d in dirs.values():
        if (d / CAPTIONS_FILE).is_file():
            read_jsonl(d / CAPTIONS_FILE, caps, known)
    for image in {_key(p): Path(p) for p in images}.values():  # an image given twice has one sidecar
        txt = image.with_suffix(CAPTION_SUFFIX)
        if txt.is_file():
            _add(caps, Path(image), _read_text_file(txt), str(txt), known)
    for d in dirs.values() if check_orphans else ():  # sidecars whose image does not exist
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for f in entries:
            if f.suffix.lower() == CAPTION_SUFFIX and f.is_file() and not _has_image_beside(f):
                raise CaptionError(f"{f}: caption for a missing image (no {f.stem}.jpg/.png/... beside it); remove "
                                   "the caption or add its image")
    return caps


# ------------------------------------------------------------------------------------------ dataset


class CaptionedImageDataset(Dataset):
    """``(image tensor, text or None, label)`` for validated samples and their texts."""

    def __init__(self, samples: Sequence[Sample], texts: Sequence[str | None], transform, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None):
        if len(samples) != len(texts):
            raise ValueError("one text (or None) per sample")
        self.samples, self.texts = list(samples), list(texts)
        self.transform, self.max_pixels, self.draft_size = transform, max_pixels, draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_image(path, max_pixels=self.max_pixels, draft_size=self.draft_size)
        return self.transform(img), self.texts[i], label


class CaptionCollate:
    """Batches of ``CaptionedImageDataset`` items as a dict: ``images``, ``input_ids``, ``attention_mask`` (the
    batch's texts tokenised at once, padded to the longest), ``has_text`` (bool) and ``labels``. A missing text is
    tokenised as the empty string and flagged ``has_text = False``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        images = torch.stack([it[0] for it in items])
        texts = [it[1] for it in items]
        tokens = self.tokenizer([t or "" for t in texts])
        return {
            "images": images,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "has_text": torch.tensor([t is not None for t in texts], dtype=torch.bool),
            "labels": torch.tensor([int(it[2]) for it in items], dtype=torch.long),
        }
