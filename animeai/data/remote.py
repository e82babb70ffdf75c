"""Training images on object storage: ``s3://bucket/prefix``, ``gs://bucket/prefix`` (any fsspec URL).

The layout is the local one with ``/`` as separator: ``<url>/<character>/<image>``, or ``<url>/train/`` +
``<url>/val/``. ``data.root`` (``--data``) and ``data.val_root`` take such a URL; the detector and distillation
train from it with either data engine (with ``--data-engine ray`` the objects are read and decoded by Ray Data
tasks on the cluster's CPUs).

* **Access**: through fsspec, with the protocol's package installed (``pip install 'animeai[cloud]'``: s3fs,
  gcsfs). Credentials come from where that package looks (environment, config files, instance roles); an
  S3-compatible endpoint is set the fsspec way, e.g. ``FSSPEC_S3_ENDPOINT_URL=http://minio:9000``. On a Ray
  cluster every node needs the same access (the decode tasks read the objects themselves).
* **Validation** is the listing: one recursive listing per root gives names and sizes; hidden names, names without
  an image extension and empty objects are skipped and reported with the reason, as unreadable files are locally.
  Objects are not decoded up front (that is the work the Ray Data engine spreads over the cluster): an object
  that does not decode when it is streamed is reported by URL and replaced by the next usable one, like a local
  file broken since validation (or, with ``--strict``, stops the run naming it). There is no manifest for
  object storage: its listing is the cheap part.
"""

from __future__ import annotations

import os
import re
from typing import Any

MAX_OBJECT_BYTES = 256 * 1024 * 1024  # an object larger than this is refused before it is read into memory
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs"}


class RemoteDataError(ValueError):
    """Object storage that cannot be used (no package for the protocol, unreachable, empty prefix)."""


def is_url(path: Any) -> bool:
    """True for a ``scheme://`` string other than ``file://`` (a local path stays a path)."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.lower().startswith("file://")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _filesystem(protocol: str):
    """fsspec's instance for the protocol. Not cached here: fsspec caches instances per process, and an instance
    made before a fork (a DataLoader worker) must not be reused in the child (its event loop stayed behind)."""
    import fsspec

    try:
        return fsspec.filesystem(protocol)
    except ImportError as exc:
        package = _PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise RemoteDataError(f"reading {protocol}:// data needs {package}: pip install {package} (or "
                              f"pip install 'animeai[cloud]' for s3 and gs) ({exc})") from None
    except ValueError as exc:  # a protocol fsspec does not know
        raise RemoteDataError(f"{protocol}://: not a storage protocol fsspec knows ({exc})") from None


def filesystem(url: str):
    """``(fsspec filesystem, path without the scheme)`` of a URL."""
    protocol = url.split("://", 1)[0].lower()
    fs = _filesystem(protocol)
    return fs, fs._strip_protocol(url)


def _url_of(path: str, like: str) -> str:
    """The URL of a listed ``path``, written with the scheme the user gave (``like``)."""
    return like.split("://", 1)[0] + "://" + path


def _listing(url: str, list_call):
    """``list_call(fs, path)`` with the backend's errors turned into a :class:`RemoteDataError` naming ``url``."""
    fs, root = filesystem(url)
    try:
        return fs, root, list_call(fs, root)
    except FileNotFoundError:
        raise RemoteDataError(f"{url}: no such bucket or prefix") from None
    except PermissionError as exc:
        raise RemoteDataError(f"{url}: access denied ({exc})") from None
    except Exception as exc:  # network, credentials, endpoint: name the URL and what the backend said
        raise RemoteDataError(f"{url}: cannot list ({type(exc).__name__}: {exc})") from None


def list_objects(url: str) -> dict[str, int]:
    """``{object URL: size in bytes}`` of every object under ``url`` (one recursive listing)."""
    fs, root, found = _listing(url, lambda fs, path: fs.find(path, detail=True, withdirs=False))
    fs.invalidate_cache(root)  # the next listing sees new objects (fsspec keeps listings per instance)
    return {_url_of(path, url): int(info.get("size") or 0) for path, info in found.items()}


def top_folders(url: str) -> set[str]:
    """Names of the "folders" (common prefixes) directly under ``url``: one non-recursive listing."""
    _, _, entries = _listing(url, lambda fs, path: fs.ls(path, detail=True, refresh=True))
    return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"}


def read_object(url: str, max_bytes: int = MAX_OBJECT_BYTES) -> bytes:
    """The bytes of one object (one ranged request); :class:`~animeai.data.images.ImageError` naming the URL if it
    cannot be read or is larger than ``max_bytes``."""
    from animeai.data.images import ImageError

    try:
        fs, path = filesystem(url)
    except RemoteDataError as exc:
        raise ImageError(url, str(exc), access=True) from None
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except FileNotFoundError:
        raise ImageError(url, "no such object (deleted since it was listed?)", access=True) from None
    except PermissionError as exc:
        raise ImageError(url, f"access denied ({exc})", access=True) from None
    except Exception as exc:
        raise ImageError(url, f"cannot read ({type(exc).__name__}: {exc})", access=True) from None
    if len(data) > max_bytes:
        raise ImageError(url, f"object larger than {max_bytes // (1024 * 1024)} MB: refused before decoding")
    if not data:
        raise ImageError(url, "empty object (0 bytes)")
    return data


def object_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def suffix(url: str) -> str:
    return os.path.splitext(object_name(url))[1].lower()
