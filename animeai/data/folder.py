"""Folder datasets: ``<root>/<character>/<image>`` (folder name = label), validated up front.

Either ``<root>/train/`` + ``<root>/val/`` (or an explicit validation root), or one folder that is
split per class with a seeded, stratified split. Every unreadable file is reported by path with its
reason and skipped (or, with ``strict``, fails the run); a class left without images is an error.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from animeai.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image, validate_images

Sample = tuple[Path, int]


class DatasetError(ValueError):
    """A dataset folder that cannot be used (missing, empty, inconsistent classes)."""


def _visible(name: str) -> bool:
    """Hidden files/folders (``.DS_Store``, ``.git``) and macOS ``__MACOSX`` archive debris are not data."""
    return not name.startswith(".") and name != "__MACOSX"


def has_train_val(root: str | Path) -> bool:
    root = Path(root)
    return (root / "train").is_dir() and (root / "val").is_dir()


def find_classes(root: str | Path) -> list[str]:
    """Sorted class names: the visible sub-folders of ``root`` (any unicode name)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder not found (expected {root}/<character>/<images>)")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not classes:
        raise DatasetError(f"{root}: no character folders inside (expected {root}/<character>/<images>)")
    return classes


def visible_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` (recursively, sorted), skipping hidden files and folders."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and all(_visible(q) for q in p.relative_to(folder).parts))


@dataclass
class ScanResult:
    class_names: list[str]
    samples: list[Sample]
    errors: list[ImageError] = field(default_factory=list)


def scan_folder(
    root: str | Path,
    class_names: Sequence[str] | None = None,
    *,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    require_all_classes: bool = True,
) -> ScanResult:
    """List and validate the images of a class-folder tree.

    ``class_names`` fixes the label order (e.g. the training classes when scanning validation data);
    a folder naming an unknown class is then an error.
    """
    root = Path(root)
    found = find_classes(root)
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DatasetError(f"{root}: class folder(s) not among the known classes: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(class_names)}
    candidates: list[Sample] = []
    for name in found:
        candidates += [(p, index[name]) for p in visible_files(root / name)]
    ok, errors = validate_images([p for p, _ in candidates], max_pixels=max_pixels)
    if strict and errors:
        raise DatasetError(f"unreadable image (strict mode): {errors[0]}")
    good = set(ok)
    samples = [(p, y) for p, y in candidates if p in good]
    counts = [0] * len(class_names)
    for _, y in samples:
        counts[y] += 1
    empty = [name for name, c in zip(class_names, counts) if c == 0 and (require_all_classes or name in found)]
    if empty:
        bad = {e.path.relative_to(root).parts[0] for e in errors}  # the class folder, also for nested files
        details = "; ".join(
            f"{root / n}: " + ("all files unreadable" if n in bad else "no files") for n in empty
        )
        raise DatasetError(f"class(es) with no usable image: {details}")
    return ScanResult(list(class_names), samples, errors)


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per-class seeded split; every class with >= 2 images keeps >= 1 image on each side."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = round(len(items) * val_fraction)
        if val_fraction > 0 and len(items) >= 2:
            n_val = min(max(n_val, 1), len(items) - 1)
        else:
            n_val = 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


@dataclass
class DataSplits:
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[ImageError]
    layout: str  # "train/val folders", "separate val folder" or "split <fraction> seed <seed>"


def build_splits(
    root: str | Path,
    *,
    val_root: str | Path | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DataSplits:
    root = Path(root)
    if val_root is None and has_train_val(root):
        root, val_root = root / "train", root / "val"
        layout = "train/val folders"
    elif val_root is not None:
        layout = "separate val folder"
    else:
        layout = f"stratified split val_fraction={val_fraction} seed={split_seed}"
    train_scan = scan_folder(root, strict=strict, max_pixels=max_pixels)
    if val_root is None:
        train, val = stratified_split(train_scan.samples, val_fraction, split_seed)
        skipped = train_scan.errors
    else:
        val_scan = scan_folder(
            val_root, train_scan.class_names, strict=strict, max_pixels=max_pixels, require_all_classes=False
        )
        train, val = train_scan.samples, val_scan.samples
        skipped = train_scan.errors + val_scan.errors
    return DataSplits(train_scan.class_names, train, val, skipped, layout)


def report_skipped(errors: Sequence[ImageError], limit: int = 20, stream=sys.stderr) -> None:
    if not errors:
        return
    print(f"skipped {len(errors)} unreadable file(s):", file=stream)
    for e in errors[:limit]:
        print(f"  {e}", file=stream)
    if len(errors) > limit:
        print(f"  ... and {len(errors) - limit} more", file=stream)


class ImageFolderDataset(Dataset):
    """(image tensor, label) pairs from validated samples; a file that broke since validation raises
    ``ImageError`` naming it."""

    def __init__(self, samples: Sequence[Sample], transform: Callable | None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_image(path, max_pixels=self.max_pixels, draft_size=self.draft_size)
        return (self.transform(img) if self.transform else img), label

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]


class EpochShuffleSampler(Sampler[int]):
    """Seeded shuffling that depends only on (seed, epoch): resumable and identical on every process."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)
