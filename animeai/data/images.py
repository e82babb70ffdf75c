"""Robust, safe image loading.

Every file that cannot be used as an image is reported as an :class:`ImageError` naming the file and the
reason (missing, empty, not an image, truncated, too large, ...). Images that can be used are fully decoded,
EXIF-rotated, reduced to their first frame and converted to 8-bit RGB, with transparency composited on white.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from animeai.data.remote import is_url, read_object

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "ImageInfo",
    "access_error",
    "link_loop_error",
    "load_image",
    "probe_images",
    "too_large_reason",
    "validate_images",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""Lower-case file suffixes (with the dot) treated as images."""

DEFAULT_MAX_PIXELS: int = 50_000_000
"""Images with more pixels than this are refused as possible decompression bombs."""

_CORRUPT_DATA_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    SyntaxError,
    ValueError,
    struct.error,
    zlib.error,
)
_INT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageError(ValueError):
    """A file that cannot be used as an image; ``str()`` is ``f"{path}: {reason}"``.

    ``access`` marks problems of reaching the file (permission, broken link, missing, I/O) rather than of its
    content: they may go away without the file changing, so a data manifest never records them.
    ``size`` is ``(width, height)`` when the header was read (an image refused as too large)."""

    def __init__(self, path: str | os.PathLike[str], reason: str, *, access: bool = False,
                 size: tuple[int, int] | None = None) -> None:
        self.path = path if is_url(path) else Path(path)  # an object-storage URL stays a string
        self.reason = reason
        self.access = access
        self.size = size
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        """Pickle with the constructor arguments (e.g. to cross process boundaries)."""
        return (type(self), (self.path, self.reason), {"access": self.access, "size": self.size})


class ImageInfo(NamedTuple):
    """What a full decode of a usable image found: its size (after EXIF rotation) and the file's own mode."""

    width: int
    height: int
    mode: str


def load_image(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Open, fully decode and return an RGB 8-bit PIL image, or raise :class:`ImageError`.

    ``max_pixels`` bounds ``width * height`` as read from the header, before any decoding. Pillow's own
    decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) applies as well; its warning is turned into an
    error here. ``draft_size`` lets JPEGs decode at a reduced scale (a power of two) that keeps both sides
    at least ``draft_size`` pixels, which is much faster for huge photos.

    Pillow's warning filter is process-global: for concurrent loading use :func:`validate_images`, or make
    sure ``PIL.Image.DecompressionBombWarning`` is an error in the calling threads.
    """
    _check_limits(max_pixels, draft_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _load_image(path if is_url(path) else Path(path), max_pixels, draft_size)


def probe_images(
    paths: Iterable[str | os.PathLike[str]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_threads: int | None = None,
    on_done: Callable[[], None] | None = None,
) -> list[ImageInfo | ImageError]:
    """Fully decode each file in a thread pool: an :class:`ImageInfo` or the :class:`ImageError` per file, in
    input order. Never raises for a bad file. ``on_done`` is called (in the calling thread) after each file,
    e.g. to advance a progress bar. Decoding runs in parallel because Pillow releases the GIL while decoding.
    """
    _check_limits(max_pixels, None)
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    path_list = [Path(p) for p in paths]

    def check(path: Path) -> ImageInfo | ImageError:
        try:
            img, mode = _decode(path, max_pixels, None)
            info = ImageInfo(img.width, img.height, mode)
            img.close()
            return info
        except ImageError as exc:
            return exc
        except Exception as exc:  # validation must never raise for a bad file
            return ImageError(path, f"unexpected {type(exc).__name__}: {exc}")

    results: list[ImageInfo | ImageError] = []
    # One filter change for the whole pool: warnings.catch_warnings is not thread-safe, so workers must not use it.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            for result in pool.map(check, path_list):
                results.append(result)
                if on_done is not None:
                    on_done()
    return results


def validate_images(
    paths: Iterable[str | os.PathLike[str]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_threads: int | None = None,
) -> tuple[list[Path], list[ImageError]]:
    """Fully decode each file (:func:`probe_images`) and split into (usable paths, errors), both in input order.

    Never raises for a bad file.
    """
    path_list = [Path(p) for p in paths]
    results = probe_images(path_list, max_pixels=max_pixels, num_threads=num_threads)
    good = [path for path, r in zip(path_list, results) if isinstance(r, ImageInfo)]
    errors = [r for r in results if isinstance(r, ImageError)]
    return good, errors


def _check_limits(max_pixels: int, draft_size: int | None) -> None:
    """Reject nonsensical arguments (programming errors, not bad files)."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be >= 1, got {draft_size}")


def _check_file(path: Path) -> None:
    """Raise ImageError unless ``path`` is an existing, non-empty regular file (or a link to one)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise access_error(path, exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(path, _folder_reason(path), access=True)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, "not a regular file", access=True)
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _is_symlink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def access_error(path: str | os.PathLike[str], exc: OSError) -> ImageError:
    """The :class:`ImageError` for a path that cannot be stat'ed or opened: one wording for every caller.

    Broken symbolic links say where they point (``"broken symbolic link -> target"``), link cycles say
    ``"symbolic link loop (-> target)"``, and permission problems ``"permission denied"``.
    """
    path = Path(path)
    if exc.errno == errno.ELOOP:
        reason = f"symbolic link loop (-> {_link_target(path)})"
    elif isinstance(exc, FileNotFoundError):
        reason = f"broken symbolic link -> {_link_target(path)}" if _is_symlink(path) else "file not found"
    elif isinstance(exc, PermissionError):
        reason = "permission denied"
    else:
        reason = f"cannot access file ({type(exc).__name__}: {exc.strerror or exc})"
    return ImageError(path, reason, access=True)


def link_loop_error(path: str | os.PathLike[str], ancestor: str | os.PathLike[str]) -> ImageError:
    """A folder link leading back to a folder that encloses it (following it would never end)."""
    path = Path(path)
    return ImageError(path, f"symbolic link loop (-> {_link_target(path)}, back to the enclosing folder {ancestor})",
                      access=True)


def _folder_reason(path: Path) -> str:
    """Why a folder given where an image file is expected cannot be used."""
    if _is_symlink(path):
        try:
            target, parent = path.resolve(), path.parent.resolve()
        except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 reports loops met while resolving so
            target = parent = None
        if target is not None and (target == parent or target in parent.parents):
            return link_loop_error(path, target).reason
    if not os.access(path, os.R_OK | os.X_OK):
        return "folder not readable: permission denied"
    return "a folder, not a regular file"


def too_large_reason(width: int, height: int, max_pixels: int) -> str:
    """The reason given for an image whose ``width * height`` exceeds ``max_pixels``."""
    return (
        f"image too large: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
        "(raise max_pixels to allow it)"
    )


def _load_image(path: Path, max_pixels: int, draft_size: int | None) -> Image.Image:
    """Implementation of :func:`load_image`, without touching the warning filters."""
    return _decode(path, max_pixels, draft_size)[0]


def _decode(path: Path | str, max_pixels: int, draft_size: int | None) -> tuple[Image.Image, str]:
    """The RGB image and the file's own mode; ImageError for anything unusable. ``path`` is a local path or an
    object-storage URL (a string, read whole first: see :mod:`animeai.data.remote`)."""
    if isinstance(path, str):
        source: Path | io.BytesIO = io.BytesIO(read_object(path))
    else:
        _check_file(path)
        source = path
    try:
        with Image.open(source) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageError(path, f"invalid image size {width}x{height}")
            if width * height > max_pixels:
                raise ImageError(path, too_large_reason(width, height, max_pixels), size=(width, height))
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            try:
                img.seek(0)  # multi-frame images (animated GIF/WebP, multi-page TIFF): first frame only
                img.load()
            except _CORRUPT_DATA_ERRORS as exc:
                raise ImageError(path, f"truncated or corrupt image data ({exc})") from None
            return _to_rgb(_exif_transpose(img), path), img.mode
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            path, f"image too large: {exc} (raise PIL.Image.MAX_IMAGE_PIXELS and max_pixels to allow it)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(path, "not a recognised image format") from None
    except MemoryError:
        raise ImageError(path, "out of memory while decoding") from None
    except OSError as exc:
        if exc.errno is None:  # Pillow's own OSErrors carry no errno
            raise ImageError(path, f"unexpected OSError: {exc}") from None
        raise access_error(path, exc) from None  # permissions, I/O errors, a link changed since the check
    except Exception as exc:  # any other Pillow failure must name the file
        raise ImageError(path, f"unexpected {type(exc).__name__}: {exc}") from None


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Return a detached copy of ``img`` rotated/flipped per its EXIF orientation (ignoring unreadable EXIF)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not make an otherwise good image unusable
        return img.copy()


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode in _ALPHA_MODES:
        return _on_white(img)
    if mode in _INT16_MODES:
        values = np.asarray(img).astype(np.uint16)  # native byte order whatever the mode's endianness
        return _gray(values >> 8)
    if mode == "I":
        ints = np.clip(np.asarray(img, dtype=np.int64), 0, None)
        peak = int(ints.max()) if ints.size else 0
        return _gray(ints * 255 // peak if peak > 255 else ints)
    if mode == "F":
        floats = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if floats.size and floats.max() <= 1.0:
            floats = floats * 255.0
        return _gray(np.rint(np.clip(floats, 0.0, 255.0)))
    if "transparency" in img.info:  # palette or colour-key transparency ("P", "L", "1", "RGB")
        return _on_white(img)
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")  # "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", ...
    except ValueError as exc:
        raise ImageError(path, f"unsupported image mode {mode!r} ({exc})") from None


def _gray(values: np.ndarray) -> Image.Image:
    """RGB image from a 2-D array of grey levels already in 0..255."""
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    """Alpha-composite ``img`` (via RGBA, honouring palette/colour-key transparency) onto a white background."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
