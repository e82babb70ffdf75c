"""``animeai data check DIR``: validate a data folder into its manifest and summarise it.

The same scanning as training (class folders, hidden files skipped, links followed safely) and the same
manifest (:mod:`animeai.data.manifest`): a later training run on the folder decodes nothing that was checked
here and has not changed since.
"""

from __future__ import annotations

import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from animeai.data.folder import DatasetError, _classes_and_errors, check_not_split_folders, has_train_val, walk_files
from animeai.data.images import DEFAULT_MAX_PIXELS, ImageError, ImageInfo, probe_images
from animeai.data.manifest import open_manifest
from animeai.data.remote import is_url

SIZE_BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
"""Upper bounds (exclusive) of the shorter-side histogram buckets; the last bucket is open."""


def reason_kind(reason: str) -> str:
    """The kind of a skip reason, without the file-specific details: ``"truncated or corrupt image data (...)"``
    -> ``"truncated or corrupt image data"``, ``"image too large: 9000x9000 = ..."`` -> ``"image too large"``."""
    return re.split(r" \(|: | -> ", reason, maxsplit=1)[0].strip() or reason


def size_bucket(short_side: int) -> str:
    lo = 0
    for hi in SIZE_BUCKETS:
        if short_side < hi:
            return f"<{hi}" if lo == 0 else f"{lo}-{hi - 1}"
        lo = hi
    return f">={SIZE_BUCKETS[-1]}"


def check_data(
    root: str | Path,
    *,
    manifest: str | None = "auto",
    strict: bool = False,
    refresh: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict[str, Any]:
    """Validate ``root`` (``<root>/<character>/...`` or ``<root>/{train,val}/<character>/...``) through its
    manifest and return the summary (see :func:`print_summary`). ``strict``: the first unreadable file is a
    ``DatasetError`` (after the manifest recorded what was decoded)."""
    if is_url(root):
        raise DatasetError(f"{root}: `data check` builds the manifest of a local folder; object storage has none "
                           "(training lists it, and decodes each object as it streams: see animeai.data.remote)")
    root = Path(root)
    parts = [("train", root / "train"), ("val", root / "val")] if has_train_val(root) else [("", root)]
    layout = "train/val folders" if parts[0][0] else "one folder per character"
    m = open_manifest(root, manifest)
    per_class: dict[str, dict[str, int]] = {}
    skipped: list[ImageError] = []
    sizes: list[int] = []
    total = decoded = reused = 0
    for part, folder in parts:
        classes, errors = _classes_and_errors(folder)
        check_not_split_folders(folder, classes)
        skipped += errors
        files: list[tuple[Path, str]] = []
        for name in classes:
            found, walk_errors = walk_files(folder / name)
            files += [(p, name) for p in found]
            skipped += walk_errors
            per_class.setdefault(name, {})
        if m is not None:
            results = m.update(files, scope=[folder], max_pixels=max_pixels, refresh=refresh, progress=progress)
            decoded, reused = decoded + m.decoded, reused + m.reused
        else:
            results = probe_images([p for p, _ in files], max_pixels=max_pixels)
            decoded += len(files)
        total += len(files)
        for (_, name), r in zip(files, results):
            if isinstance(r, ImageInfo):
                counts = per_class[name]
                counts[part or "images"] = counts.get(part or "images", 0) + 1
                sizes.append(min(r.width, r.height))
            else:
                skipped.append(r)
    skipped.sort(key=lambda e: str(e.path))
    if strict and skipped:
        raise DatasetError(f"unreadable image (strict mode): {skipped[0]}")
    keys = [p for p, _ in parts] if parts[0][0] else ["images"]
    classes = [{"name": n, **{k: c.get(k, 0) for k in keys}} for n, c in sorted(per_class.items())]
    empty = [c["name"] for c in classes if not any(c[k] for k in keys if k != "val")]
    hist = Counter(size_bucket(s) for s in sizes)
    buckets = [size_bucket(b - 1) for b in SIZE_BUCKETS] + [size_bucket(SIZE_BUCKETS[-1])]
    return {
        "root": str(root),
        "layout": layout,
        "manifest": str(m.path) if m is not None else None,
        "files": total,
        "usable": len(sizes),
        "decoded": decoded,
        "reused_from_manifest": reused,
        "classes": classes,
        "classes_without_usable_image": empty,
        "skipped": len(skipped),
        "skipped_by_reason": dict(Counter(reason_kind(e.reason) for e in skipped).most_common()),
        "skipped_files": [{"path": str(e.path), "reason": e.reason} for e in skipped],
        "size_histogram": {"measure": "shorter side in pixels", "buckets": {b: hist.get(b, 0) for b in buckets}},
    }


def print_summary(s: dict[str, Any], *, stream: TextIO = sys.stdout, max_classes: int = 50,
                  max_files: int = 20) -> None:
    """The human-readable form of :func:`check_data`'s summary."""
    def out(text: str = "") -> None:
        print(text, file=stream)

    out(f"data: {s['root']} ({s['layout']})")
    out(f"manifest: {s['manifest'] or 'off'}")
    out(f"{s['files']:,} files: {s['usable']:,} usable, {s['skipped']:,} skipped; decoded {s['decoded']:,} "
        f"(new or changed), reused {s['reused_from_manifest']:,} from the manifest")
    classes = s["classes"]
    keys = [k for k in classes[0] if k != "name"] if classes else []
    totals = [sum(c[k] for k in keys) for c in classes]
    spread = (f": images per class min {min(totals):,}, median {statistics.median(totals):g}, max {max(totals):,}"
              if totals else "")
    out(f"\nclasses ({len(classes):,}){spread}")
    width = max((len(c["name"]) for c in classes[:max_classes]), default=0)
    for c in classes[:max_classes]:
        out(f"  {c['name']:<{width}}  " + "  ".join(f"{c[k]:>7,}" + (f" {k}" if k != "images" else "")
                                                     for k in keys))
    if len(classes) > max_classes:
        out(f"  ... and {len(classes) - max_classes:,} more (--json lists every class)")
    if s["classes_without_usable_image"]:
        out(f"\nclasses with no usable training image (training refuses them): "
            f"{', '.join(s['classes_without_usable_image'])}")
    if s["skipped"]:
        out("\nskipped by reason")
        for reason, n in s["skipped_by_reason"].items():
            out(f"  {n:>7,}  {reason}")
        for f in s["skipped_files"][:max_files]:
            out(f"  skipped {f['path']}: {f['reason']}")
        if s["skipped"] > max_files:
            out(f"  ... and {s['skipped'] - max_files:,} more (--json lists every file)")
    buckets = s["size_histogram"]["buckets"]
    peak = max(buckets.values(), default=0) or 1
    out(f"\nimage sizes ({s['size_histogram']['measure']})")
    for b, n in buckets.items():
        out(f"  {b:>9}  {n:>9,}  {'#' * round(40 * n / peak)}".rstrip())
