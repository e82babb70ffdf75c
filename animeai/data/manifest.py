"""The data manifest: every image of a data root is decoded once; later runs reuse what was found.

A manifest lists, per file (path relative to the data root): size, mtime (ns), label, and the result of a full
decode: width, height and the file's own mode, or the reason the file is unusable. A run
stats each listed file and decodes only those that are new or changed (size or mtime differs); files gone from
the scanned folders are dropped. Problems of reaching a file (permission denied, a broken link, an I/O error)
are never recorded: they can go away without the file changing, so they are checked again on every run.

Where it lives (``location``, the ``--manifest`` option):

* ``auto`` (default): ``<root>/.animeai-manifest.json`` beside the data (a hidden file, never read as data);
  when the root is not writable, ``$ANIMEAI_CACHE/manifests/<hash of the absolute root>.json`` (default
  ``~/.cache/animeai``), seeded from a manifest found beside the read-only data.
* a file path: exactly that file (it records its root; a manifest of another root there is rebuilt).
* ``off``: no manifest; every run decodes every file (the behaviour before manifests).

The file is JSON (never a pickle) with a format name and version; it is written atomically (a temp file then
``os.replace``) under an exclusive ``flock`` on ``<manifest>.lock``, which is held from reading the manifest
to writing it back: a second process (another Ray worker, a second run) waits, then finds the images already
validated. A damaged or foreign file is reported and rebuilt, never trusted and never a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from animeai.data.images import DEFAULT_MAX_PIXELS, ImageError, ImageInfo, probe_images, too_large_reason

FORMAT = "animeai-data-manifest"
VERSION = 1
COLUMNS = ("path", "size", "mtime_ns", "label", "width", "height", "mode", "error")
"""One array per file in the JSON: ``error`` is ``null`` for a usable image (then ``width``, ``height`` and the
file's own ``mode`` are set); an unusable file has its reason in ``error`` (and its size when refused as too
large). Arrays rather than objects: a 100,000-file manifest reads about twice as fast."""
_SIZE, _MTIME, _LABEL, _W, _H, _MODE, _ERROR = range(7)  # positions in a record (the columns after "path")
MANIFEST_NAME = ".animeai-manifest.json"
LOCATIONS_HELP = "auto | off | PATH"

__all__ = ["FORMAT", "MANIFEST_NAME", "VERSION", "Manifest", "ManifestError", "cache_dir", "gc_paused",
           "open_manifest"]


class ManifestError(ValueError):
    """A manifest location that cannot be used (an explicit path in a folder that cannot be written)."""


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a scan allocates a few objects per file (paths, records,
    tuples: none of them in cycles, all freed by reference counting). With 100,000 files its passes cost about
    as much as the scan itself, more in a process that already holds a model. Nested uses are fine."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def cache_dir() -> Path:
    """``$ANIMEAI_CACHE`` or ``~/.cache/animeai``: where manifests of read-only data roots go."""
    env = os.environ.get("ANIMEAI_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "animeai"


def _absolute(root: Path) -> Path:
    try:
        return root.expanduser().resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(root.expanduser()))


def cache_path(root: str | os.PathLike[str]) -> Path:
    """The cache-folder manifest of ``root``: named by a hash of its absolute path."""
    digest = hashlib.sha256(str(_absolute(Path(root))).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return cache_dir() / "manifests" / f"{digest}.json"


def _writable_folder(folder: Path) -> bool:
    """Whether the manifest's lock file can be opened for writing in ``folder`` (created if missing: it is needed
    anyway). Tried for real: read-only mounts pass ``os.access``. A folder whose mode grants nobody write
    permission (``r-x``: a shared, read-only dataset) counts as read-only even for root, who could write it."""
    try:
        if folder.stat().st_mode & 0o222 == 0:
            return False
        fd = os.open(folder / (MANIFEST_NAME + ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


class Manifest:
    """The manifest of one data root (see the module docstring); :meth:`update` is the one entry point.

    After each :meth:`update`, ``decoded`` is the number of files decoded by it and ``reused`` the number
    answered from the manifest."""

    def __init__(self, root: str | os.PathLike[str], location: str = "auto", *, stream: TextIO | None = None):
        if location in ("off", "", None):
            raise ValueError("Manifest(location='off'): use open_manifest(), which returns None for 'off'")
        self.root = Path(root)
        self.stream = stream
        self.absolute_root = _absolute(self.root)
        self.seed_from: Path | None = None
        self.beside_data = location == "auto"
        if location == "auto":
            beside = self.root / MANIFEST_NAME
            if not self.root.is_dir() or _writable_folder(self.root):
                self.path = beside  # (a missing root: the scan reports it before the manifest is used)
            else:
                self.path = cache_path(self.root)
                self._say(f"manifest: {self.root} is not writable; keeping its manifest in {self.path}")
                if beside.is_file():
                    self.seed_from = beside
        else:
            self.path = Path(location).expanduser()
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._prefix_text = os.path.join(os.fspath(self.root), "")
        self._entries: dict[str, list[Any]] = {}
        self._signature: tuple[int, int, int] | None = None
        self.decoded = 0
        self.reused = 0

    def _say(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    # --- reading ----------------------------------------------------------------------------------
    def _file_signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def entries(self) -> dict[str, list[Any]]:
        """The records by relative path (the :data:`COLUMNS` after ``path``), as last read or written (reads the
        file if it changed since)."""
        self._refresh()
        return self._entries

    def _refresh(self) -> None:
        sig = self._file_signature()
        if sig is not None and sig == self._signature:
            return
        self._signature = sig
        self._entries = {}
        source = self.path if sig is not None else self.seed_from
        if source is None:
            return
        entries, problem = _read(source, self.absolute_root, check_root=not self.beside_data and source == self.path)
        if problem:
            self._say(f"manifest: {source} {problem}; rebuilding it (every image is decoded again)")
            return
        self._entries = entries

    # --- locking and writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise ManifestError(f"cannot use the data manifest {self.path}: {exc.strerror or exc} (choose another "
                                "place with --manifest PATH, or --manifest off)") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._say(f"manifest: waiting for {self.lock_path} (another process is validating this data)")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _write(self) -> None:
        files = [[rel, *rec] for rel, rec in sorted(self._entries.items())]
        doc = {"format": FORMAT, "version": VERSION, "root": str(self.absolute_root),
               "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "columns": list(COLUMNS),
               "files": files}
        tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}")
        try:
            # surrogateescape: file names that are not valid UTF-8 (Linux allows any bytes) round-trip unchanged
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
                json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ManifestError(f"cannot write the data manifest {self.path}: {exc.strerror or exc}") from None
        self._signature = self._file_signature()

    # --- the work ----------------------------------------------------------------------------------
    def relative(self, path: Path) -> str:
        """``path`` relative to the root, with ``/`` separators (string operations: pathlib's ``relative_to``
        costs more than the rest of a reused manifest's work)."""
        text = os.fspath(path)
        if text.startswith(self._prefix_text) and len(text) > len(self._prefix_text):
            rel = text[len(self._prefix_text):]
            return rel if os.sep == "/" else rel.replace(os.sep, "/")
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not inside the manifest's data root {self.root}") from None

    def update(
        self,
        files: Sequence[tuple[Path, str | None]],
        *,
        scope: Sequence[Path] = (),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        refresh: bool = False,
        progress: bool = False,
        num_threads: int | None = None,
    ) -> list[ImageInfo | ImageError]:
        """The decode result of each ``(path, label)`` in ``files`` (in order), decoding only files that are new
        or changed since the manifest recorded them (all of them with ``refresh``).

        ``scope``: folders that were listed completely; records below them of files not in ``files`` (deleted
        files) are dropped. The manifest is written back when anything changed."""
        with self._locked(), gc_paused():
            self._refresh()
            entries = self._entries
            changed = False
            results: list[ImageInfo | ImageError | None] = [None] * len(files)
            stale: list[tuple[int, str, os.stat_result | None]] = []
            listed: set[str] = set()
            prefix, cut = self._prefix_text, len(self._prefix_text)
            for i, (path, label) in enumerate(files):  # the hot loop of a reused manifest: kept lean
                text = os.fspath(path)
                rel = text[cut:] if text.startswith(prefix) and os.sep == "/" else self.relative(path)
                listed.add(rel)
                try:
                    st = os.stat(text)
                except OSError:
                    st = None
                if st is None or not stat.S_ISREG(st.st_mode):
                    stale.append((i, rel, None))  # decoding names the problem; never recorded
                    continue
                rec = entries.get(rel)
                if refresh or rec is None or rec[_SIZE] != st.st_size or rec[_MTIME] != st.st_mtime_ns:
                    stale.append((i, rel, st))
                    continue
                if rec[_ERROR] is None and rec[_W] * rec[_H] <= max_pixels and rec[_LABEL] == label:
                    results[i] = ImageInfo(rec[_W], rec[_H], rec[_MODE])  # the common case
                    continue
                result = _result(path, rec, max_pixels)
                if result is None:  # refused as too large under a lower limit: decode under this one
                    stale.append((i, rel, st))
                    continue
                if rec[_LABEL] != label:
                    rec[_LABEL] = label
                    changed = True
                results[i] = result
            self.reused = len(files) - len(stale)
            self.decoded = len(stale)
            if stale:
                changed |= self._decode(files, stale, results, label_of=lambda i: files[i][1],
                                        max_pixels=max_pixels, progress=progress, num_threads=num_threads)
            prefixes = [self._prefix(s) for s in scope]
            gone = [rel for rel in entries if rel not in listed and any(_under(rel, p) for p in prefixes)]
            for rel in gone:
                del entries[rel]
            changed = changed or bool(gone) or self._file_signature() is None
            if changed:
                self._write()
        return results  # type: ignore[return-value]

    def _prefix(self, folder: Path) -> str:
        rel = self.relative(folder)
        return "" if rel == "." else rel

    def _decode(self, files, stale, results, *, label_of, max_pixels, progress, num_threads) -> bool:
        """Decode the ``stale`` files into ``results`` and the records; whether any record changed."""
        self._say(f"manifest: decoding {len(stale):,} new or changed of {len(files):,} images "
                  f"({self.path})")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(stale), desc="validating images", unit="img", file=sys.stderr, mininterval=0.5,
                       dynamic_ncols=True)
        try:
            decoded = probe_images([files[i][0] for i, _, _ in stale], max_pixels=max_pixels,
                                   num_threads=num_threads, on_done=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        changed = False
        for (i, rel, st), result in zip(stale, decoded):
            results[i] = result
            if st is None or (isinstance(result, ImageError) and result.access):
                changed |= self._entries.pop(rel, None) is not None  # never recorded (see the module docstring)
            else:
                self._entries[rel] = _record(st, label_of(i), result)
                changed = True
        return changed


def open_manifest(root: str | os.PathLike[str], location: str | None, *, stream: TextIO | None = None
                  ) -> Manifest | None:
    """The :class:`Manifest` of ``root`` at ``location`` (``auto``, a path), or ``None`` for ``off``/``None``."""
    if location is None or str(location).strip() in ("", "off"):
        return None
    return Manifest(root, str(location).strip(), stream=stream)


# ------------------------------------------------------------------------------------------ records


def _under(rel: str, prefix: str) -> bool:
    return prefix == "" or rel == prefix or rel.startswith(prefix + "/")


def _record(st: os.stat_result, label: str | None, result: ImageInfo | ImageError) -> list[Any]:
    if isinstance(result, ImageInfo):
        return [st.st_size, st.st_mtime_ns, label, result.width, result.height, result.mode, None]
    w, h = result.size if result.size is not None else (None, None)
    return [st.st_size, st.st_mtime_ns, label, w, h, None, result.reason]


def _result(path: Path, rec: list[Any], max_pixels: int) -> ImageInfo | ImageError | None:
    """The recorded result under ``max_pixels``; ``None`` when the record cannot answer (decode again)."""
    w, h = rec[_W], rec[_H]
    if rec[_ERROR] is None:
        if w * h > max_pixels:
            return ImageError(path, too_large_reason(w, h, max_pixels), size=(w, h))
        return ImageInfo(w, h, rec[_MODE])
    if w is not None and w * h <= max_pixels:
        return None
    return ImageError(path, rec[_ERROR], size=(w, h) if w is not None else None)


def _valid_record(f: Any) -> bool:
    if type(f) is not list or len(f) != len(COLUMNS):
        return False
    path, size, mtime, label, w, h, mode, error = f
    if type(path) is not str or not path or type(size) is not int or type(mtime) is not int:
        return False
    if label is not None and type(label) is not str:
        return False
    if error is None:
        return type(w) is int and type(h) is int and w > 0 and h > 0 and type(mode) is str
    if type(error) is not str or mode is not None:
        return False
    return (w is None and h is None) or (type(w) is int and type(h) is int)


def _read(path: Path, absolute_root: Path, *, check_root: bool) -> tuple[dict[str, list[Any]], str | None]:
    """``(records by relative path, None)``, or ``({}, what is wrong)`` for a file that cannot be trusted."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return {}, f"cannot be read ({type(exc).__name__}: {exc})"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return {}, f"is not an animeai data manifest (no \"format\": \"{FORMAT}\")"
    if doc.get("version") != VERSION:
        return {}, f"has format version {doc.get('version')!r}, this animeai reads version {VERSION}"
    if check_root and doc.get("root") != str(absolute_root):
        return {}, f"belongs to another data root ({doc.get('root')!r}, not {str(absolute_root)!r})"
    if doc.get("columns") != list(COLUMNS):
        return {}, f"is damaged (its \"columns\" are not {list(COLUMNS)})"
    files = doc.get("files")
    if not isinstance(files, list):
        return {}, "is damaged (no \"files\" list)"
    entries: dict[str, dict[str, Any]] = {}
    for n, f in enumerate(files):
        if not _valid_record(f):
            return {}, f"is damaged (record {n} is malformed: {str(f)[:120]})"
        rel = f[0]
        if rel.startswith("/") or ".." in rel.split("/"):
            return {}, f"is damaged (record {n} has a path outside the data root: {rel!r})"
        entries[rel] = f[1:]
    return entries, None
