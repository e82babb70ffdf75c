"""Folder datasets: ``<root>/<character>/<image>`` (folder name = label), validated up front.

Either ``<root>/train/`` + ``<root>/val/`` (or an explicit validation root), or one folder that is
split per class with a seeded, stratified split. Every unreadable file is reported by path with its
reason and skipped (or, with ``strict``, fails the run); a class left without images is an error.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from animeai.data import remote
from animeai.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    access_error,
    link_loop_error,
    load_image,
    validate_images,
)
from animeai.data.manifest import Manifest, gc_paused, open_manifest
from animeai.data.remote import is_url

Sample = tuple[Path | str, int]  # a local path, or an object-storage URL


class DatasetError(ValueError):
    """A dataset folder that cannot be used (missing, empty, inconsistent classes)."""


CAPTION_SUFFIX = ".txt"
CAPTIONS_FILE = "captions.jsonl"
"""Texts beside the images (fusion, :mod:`animeai.data.captions`): ``x.txt`` next to ``x.jpg``, ``captions.jsonl``.
They are not images: folder scans leave them out instead of reporting them as unreadable."""


def is_caption_file(path: Path) -> bool:
    return path.suffix.lower() == CAPTION_SUFFIX or path.name == CAPTIONS_FILE


SPLIT_FOLDER_NAMES: frozenset[str] = frozenset({"train", "val", "validation", "valid", "test"})
"""Folder names (compared case-insensitively) that mark a train/val layout; never read as character classes."""


def _visible(name: str) -> bool:
    """Hidden files/folders (``.DS_Store``, ``.git``) and macOS ``__MACOSX`` archive debris are not data."""
    return not name.startswith(".") and name != "__MACOSX"


def has_train_val(root: str | Path) -> bool:
    if is_url(root):
        try:
            return {"train", "val"} <= remote.top_folders(root)
        except remote.RemoteDataError as exc:
            raise DatasetError(str(exc)) from None
    root = Path(root)
    return (root / "train").is_dir() and (root / "val").is_dir()


def _list_dir(folder: Path) -> list[os.DirEntry]:
    """Visible entries of ``folder``, sorted by name; ``OSError`` if it cannot be listed."""
    with os.scandir(folder) as it:
        return sorted((e for e in it if _visible(e.name)), key=lambda e: e.name)


def _dir_key(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _classes_and_errors(root: Path) -> tuple[list[str], list[ImageError]]:
    """Class folders of ``root`` plus errors for root entries that cannot be followed (broken links, loops)."""
    if not root.exists():
        if root.is_symlink():
            raise DatasetError(f"{root}: dataset folder is a broken symbolic link -> {os.readlink(root)}")
        raise DatasetError(f"{root}: dataset folder not found (expected {root}/<character>/<images>)")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    try:
        entries = _list_dir(root)
    except OSError as exc:
        raise DatasetError(f"{root}: cannot read the dataset folder ({exc.strerror or exc})") from None
    classes, errors = [], []
    for e in entries:
        try:
            if e.is_dir():
                classes.append(e.name)
            else:
                os.stat(e.path)  # a regular file (ignored) or a link that cannot be followed (reported)
        except OSError as exc:
            errors.append(access_error(e.path, exc))
    if not classes:
        found = f" (unusable entries: {'; '.join(map(str, errors))})" if errors else ""
        raise DatasetError(f"{root}: no character folders inside (expected {root}/<character>/<images>){found}")
    return classes, errors


def find_classes(root: str | Path) -> list[str]:
    """Sorted class names: the visible sub-folders of ``root`` (any unicode name)."""
    return _classes_and_errors(Path(root))[0]


def walk_files(folder: str | Path) -> tuple[list[Path], list[ImageError]]:
    """Every visible non-folder entry below ``folder`` (recursively, sorted) and the folders that cannot be walked.

    Hidden files and folders are skipped. Folder links are followed, except one leading back to a folder that
    encloses it (a link loop). Entries that cannot be followed (broken links, file link loops) and unreadable
    files are returned as files: opening them (:func:`animeai.data.images.load_image`) names the problem.
    Folders that cannot be listed (permission denied) and folder link loops are returned as ``ImageError``.
    """
    folder = Path(folder)
    files: list[Path] = []
    errors: list[ImageError] = []
    try:
        parent = folder.absolute().parent.resolve()
        enclosing = {_dir_key(p) for p in (parent, *parent.parents)}  # a link to any of these never ends
        own = _dir_key(folder)
    except OSError as exc:
        return [], [access_error(folder, exc)]
    except RuntimeError as exc:  # Python < 3.13: a link loop met while resolving
        return [], [ImageError(folder, f"symbolic link loop ({exc})")]
    if own in enclosing:
        return [], [link_loop_error(folder, os.path.realpath(folder))]
    stack: list[tuple[Path, frozenset[tuple[int, int]]]] = [(folder, frozenset(enclosing | {own}))]
    while stack:
        current, ancestors = stack.pop()
        try:
            entries = _list_dir(current)
        except OSError as exc:
            reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
            errors.append(ImageError(current, f"folder not readable: {reason}"))
            continue
        for e in entries:
            path = current / e.name  # joining one name: several times cheaper than parsing e.path
            try:
                is_dir = e.is_dir()  # follows links; False for broken links and link loops
                key = _dir_key(path) if is_dir else None
            except OSError:
                is_dir, key = False, None
            if not is_dir:
                files.append(path)
            elif key in ancestors:
                errors.append(link_loop_error(path, os.path.realpath(path)))
            else:
                stack.append((path, ancestors | {key}))
    return sorted(files), sorted(errors, key=lambda err: err.path)


def visible_files(folder: str | Path) -> list[Path]:
    """Every path below ``folder`` that a caller must load or report (sorted): the entries of :func:`walk_files`
    plus the folders it could not walk. Loading any bad one raises an ``ImageError`` that names the problem."""
    files, errors = walk_files(folder)
    return sorted(files + [e.path for e in errors])


def check_not_split_folders(root: str | Path, classes: Sequence[str]) -> None:
    """Refuse class folders named like the folders of a train/val layout (``train/`` without ``val/``, ...).

    Such a root would otherwise train one class called "train" (or "val", "test", ...).
    """
    root = str(root).rstrip("/") if is_url(root) else Path(root)
    split = [c for c in classes if c.casefold() in SPLIT_FOLDER_NAMES]
    if not split:
        return
    by_fold = {c.casefold(): c for c in split}
    have = ", ".join(f"{c}/" for c in split)
    others = [c for c in split if c.casefold() not in ("train", "val")]
    if "train" in by_fold and "val" not in by_fold:
        rename = f" (or rename {others[0]}/ to val/)" if others else ""
        what, fix = f"holds {have} but no val/", (
            f"add {root}/val/<character>/{rename}, or point --data at {root}/{by_fold['train']} and let "
            "--val-fraction split it, or give a validation folder with --val-data")
    elif "train" not in by_fold:
        what, fix = f"holds {have} but no train/", (
            f"add {root}/train/<character>/ next to it, or point --data at the folder of training character folders")
    elif "train" in classes and "val" in classes:  # the right layout, scanned as classes (e.g. with --val-data)
        what, fix = f"holds {have}", (
            f"give --data {root} without --val-data, or point --data at {root}/train")
    else:
        what, fix = f"holds {have}", "rename the folders to train/ and val/ (lower case)"
    raise DatasetError(
        f"{root}: {what}: these are split folders, not character classes (a train/val layout needs both "
        f"{root}/train/<character>/ and {root}/val/<character>/). Fix: {fix}."
    )


def check_images(
    files: Sequence[tuple[Path, str | None]],
    manifest: Manifest | None,
    *,
    scope: Sequence[Path] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    refresh: bool = False,
    progress: bool = False,
) -> tuple[list[Path], list[ImageError]]:
    """``(usable paths, errors)`` of ``(path, label)`` pairs, in input order: through ``manifest`` (decoding only
    new or changed files; ``scope``: the folders listed completely) or, without one, by decoding every file."""
    flags = _check_flags(files, manifest, scope=scope, max_pixels=max_pixels, refresh=refresh, progress=progress)
    return [p for (p, _), e in zip(files, flags) if e is None], [e for e in flags if e is not None]


def _check_flags(files, manifest, *, scope, max_pixels, refresh, progress) -> list[ImageError | None]:
    """Per file of :func:`check_images`: its ``ImageError``, or ``None`` when usable."""
    if manifest is None:
        paths = [p for p, _ in files]
        _, errors = validate_images(paths, max_pixels=max_pixels)
        by_path = {e.path: e for e in errors}
        return [by_path.get(p) for p in paths]
    results = manifest.update(files, scope=scope, max_pixels=max_pixels, refresh=refresh, progress=progress)
    return [r if isinstance(r, ImageError) else None for r in results]


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
    manifest: Manifest | None = None,
    refresh: bool = False,
    progress: bool = False,
) -> ScanResult:
    """List and validate the images of a class-folder tree.

    ``class_names`` fixes the label order (e.g. the training classes when scanning validation data);
    a folder naming an unknown class is then an error. With a ``manifest`` (of ``root`` or a folder above it),
    only files that are new or changed since it recorded them are decoded (all with ``refresh``).
    """
    if is_url(root):
        return _scan_remote(root, class_names, strict=strict, require_all_classes=require_all_classes)
    root = Path(root)
    found, errors = _classes_and_errors(root)
    class_names = _label_order(root, found, class_names)
    index = {name: i for i, name in enumerate(class_names)}
    candidates: list[Sample] = []
    with gc_paused():
        for name in found:
            files, walk_errors = walk_files(root / name)
            candidates += [(p, index[name]) for p in files if not is_caption_file(p)]
            errors += walk_errors
        flags = _check_flags([(p, class_names[y]) for p, y in candidates], manifest, scope=[root],
                             max_pixels=max_pixels, refresh=refresh, progress=progress)
        samples = [s for s, e in zip(candidates, flags) if e is None]
    errors = sorted(errors + [e for e in flags if e is not None], key=lambda e: e.path)
    if strict and errors:
        raise DatasetError(f"unreadable image (strict mode): {errors[0]}")
    counts = [0] * len(class_names)
    for _, y in samples:
        counts[y] += 1
    empty = [name for name, c in zip(class_names, counts) if c == 0 and (require_all_classes or name in found)]
    if empty:
        bad = {e.path.relative_to(root).parts[0] for e in errors}  # the class folder, also for nested files
        details = "; ".join(
            f"{root / n}: " + ("all files unreadable" if n in bad else "no files") for n in empty
        )
        shown = [e for e in errors if e.path.relative_to(root).parts[0] in empty]
        listing = "".join(f"\n  skipped {e}" for e in shown[:20])
        more = f"\n  ... and {len(shown) - 20} more" if len(shown) > 20 else ""
        raise DatasetError(f"class(es) with no usable image: {details}{listing}{more}")
    return ScanResult(list(class_names), samples, errors)


def _label_order(root: str | Path, found: list[str], class_names: Sequence[str] | None) -> Sequence[str]:
    """The label order: ``class_names`` when given (a found folder outside it is an error), else the folders."""
    check_not_split_folders(root, found)
    if class_names is None:
        return found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DatasetError(f"{root}: class folder(s) not among the known classes: {', '.join(unknown)}")
    return class_names


def _scan_remote(root: str, class_names: Sequence[str] | None, *, strict: bool,
                 require_all_classes: bool) -> ScanResult:
    """:func:`scan_folder` for an object-storage URL (see :mod:`animeai.data.remote`): one listing; hidden names,
    non-image names and empty objects are skipped with the reason; nothing is decoded here."""
    try:
        objects = remote.list_objects(root)
    except remote.RemoteDataError as exc:
        raise DatasetError(str(exc)) from None
    prefix = root.rstrip("/") + "/"
    by_class: dict[str, list[str]] = {}
    folders: set[str] = set()
    errors: list[ImageError] = []
    for url in sorted(objects):
        parts = url[len(prefix):].split("/")
        if len(parts) < 2 or not all(_visible(p) for p in parts):
            continue  # objects at the root (like files beside the class folders) and hidden names are not data
        folders.add(parts[0])
        if remote.suffix(url) not in IMAGE_EXTENSIONS:
            if not is_caption_file(Path(remote.object_name(url))):
                errors.append(ImageError(url, "not an image file name (object storage is checked by name and size "
                                              "when listed, decoded when streamed)"))
            continue
        if objects[url] == 0:
            errors.append(ImageError(url, "empty object (0 bytes)"))
            continue
        by_class.setdefault(parts[0], []).append(url)
    found = sorted(folders)
    if not found:
        raise DatasetError(f"{root}: no character folders inside (expected {prefix}<character>/<images>)")
    class_names = _label_order(root, found, class_names)
    if strict and errors:
        raise DatasetError(f"unusable object (strict mode): {errors[0]}")
    samples = [(url, i) for i, name in enumerate(class_names) for url in by_class.get(name, [])]
    empty = [n for n in class_names if not by_class.get(n) and (require_all_classes or n in found)]
    if empty:
        raise DatasetError(f"class(es) with no usable image: {', '.join(prefix + n for n in empty)}"
                           + "".join(f"\n  skipped {e}" for e in errors[:20]))
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
    min_classes: int = 2,
    require_val: bool = True,
    manifest: str | None = None,
    refresh: bool = False,
    progress: bool = False,
) -> DataSplits:
    """Scan and split a dataset for training, refusing data that cannot train a classifier.

    Layouts: ``root/train/`` + ``root/val/``; ``root`` + a separate ``val_root``; or ``root`` alone, split per
    class with :func:`stratified_split`. Raises :class:`DatasetError` (naming the folder) when the training data
    has fewer than ``min_classes`` classes, when ``root`` holds only some of the split folders (``train/``
    without ``val/``, ...), and, with ``require_val``, when no validation image is left (``val_fraction`` 0, or
    every class has a single image).

    ``manifest``: where the data manifest of ``root`` (and of ``val_root``) lives: ``auto``, a file (for ``root``;
    ``val_root``'s is then ``auto``) or ``off``/``None`` (decode every file): see :mod:`animeai.data.manifest`.
    """
    root = root if is_url(root) else Path(root)  # a URL: object storage, listed not decoded (no manifest)
    root_manifest = None if is_url(root) else open_manifest(root, manifest)
    val_manifest = None
    if val_root is not None and root_manifest is not None and not is_url(val_root):
        val_manifest = open_manifest(val_root, "auto")
    common = dict(strict=strict, max_pixels=max_pixels, refresh=refresh, progress=progress)
    if val_root is None and has_train_val(root):
        val_manifest = root_manifest  # one manifest for root/train and root/val
        root, val_root = (remote.join(root, "train"), remote.join(root, "val")) if is_url(root) else \
            (root / "train", root / "val")
        layout = "train/val folders"
    elif val_root is not None:
        layout = "separate val folder"
    else:
        layout = f"stratified split val_fraction={val_fraction} seed={split_seed}"
    train_scan = scan_folder(root, manifest=root_manifest, **common)
    names = train_scan.class_names
    if len(names) < min_classes:
        raise DatasetError(
            f"{root}: found {len(names)} character folder(s) ({', '.join(names)}), but training a classifier needs "
            f"at least {min_classes} classes: one folder per character, {root}/<character>/<images>"
        )
    if val_root is None:
        train, val = stratified_split(train_scan.samples, val_fraction, split_seed)
        skipped = train_scan.errors
    else:
        val_scan = scan_folder(val_root, names, require_all_classes=False, manifest=val_manifest, **common)
        train, val = train_scan.samples, val_scan.samples
        skipped = train_scan.errors + val_scan.errors
    if require_val and not val:
        if val_root is not None:
            raise DatasetError(f"{val_root}: no usable validation image")
        if val_fraction == 0:
            problem = "--val-fraction is 0; set it > 0, or"
        else:
            counts = Counter(y for _, y in train)
            singles = [names[y] for y in sorted(counts) if counts[y] == 1]
            listed = ", ".join(singles[:10]) + (f" and {len(singles) - 10} more" if len(singles) > 10 else "")
            problem = f"a split needs at least 2 images per class, but every class has a single image ({listed}); " \
                      "add images, or"
        raise DatasetError(
            f"{root}: no validation images: {problem} give validation data (the {root}/train/ + {root}/val/ "
            "layout, or --val-data)"
        )
    return DataSplits(names, train, val, skipped, layout)


def report_skipped(errors: Sequence[ImageError], limit: int = 20, stream=sys.stderr) -> None:
    if not errors:
        return
    print(f"skipped {len(errors)} unreadable file(s):", file=stream)
    for e in errors[:limit]:
        print(f"  {e}", file=stream)
    if len(errors) > limit:
        print(f"  ... and {len(errors) - limit} more", file=stream)


class ImageFolderDataset(Dataset):
    """(image tensor, label) pairs from validated samples.

    A file that broke since it was validated (truncated, deleted, made unreadable after the scan or the manifest
    recorded it): with ``on_error="raise"`` (strict runs) ``__getitem__`` raises the ``ImageError`` naming it;
    with ``on_error="skip"`` the file is reported on stderr by path and reason (once per process) and the next
    usable sample in index order takes its place, so an epoch keeps its length and its batches."""

    MAX_REPLACEMENT_TRIES = 16

    def __init__(self, samples: Sequence[Sample], transform: Callable | None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.on_error = on_error
        self.reported: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int):
        path, label = self.samples[i]
        img = load_image(path, max_pixels=self.max_pixels, draft_size=self.draft_size)
        return (self.transform(img) if self.transform else img), label

    def __getitem__(self, i: int):
        if self.on_error == "raise":
            return self._load(i)
        first: ImageError | None = None
        for k in range(min(len(self.samples), self.MAX_REPLACEMENT_TRIES)):
            j = (i + k) % len(self.samples)
            try:
                return self._load(j)
            except ImageError as exc:
                first = first or exc
                if exc.path not in self.reported:
                    self.reported.add(exc.path)
                    print(f"skipped {exc} (unreadable since the data was validated; another image takes its place "
                          "in this epoch; `animeai data check` updates the manifest)", file=sys.stderr, flush=True)
        raise ImageError(first.path, f"{first.reason} (and the {self.MAX_REPLACEMENT_TRIES - 1} samples after it "
                         "are unreadable too: the data changed since it was validated)")

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
