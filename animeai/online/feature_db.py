"""The role feature database: L2-normalised embeddings in a FAISS index, ids <-> roles beside it.

* **Vectors.** Every stored vector is an L2-normalised embedding, so inner product = cosine similarity. A vector's
  id is its row number (ids are never reused); ``vec_role[id]`` is the role it belongs to (``-1`` once its role
  is removed). The normalised vectors and their original norms are kept next to the index (``vectors.npy``,
  ``norms.npy``): they give the raw features back for replay training and let the index be rebuilt or re-trained
  as another kind (:meth:`FeatureDB.rebuild`) without decoding an image again.
* **Auxiliary features** (``aux_dim > 0``): another raw feature vector per exemplar, kept as given next to the
  index (``aux.npy``) and returned by :meth:`FeatureDB.aux_of`. The online system indexes a retrieval descriptor
  and keeps the classifier's own input features here for imprinting and replay.
* **Roles.** Role ``i`` of the database is class ``i`` of the classifier it was built for. Each role has metadata
  (a JSON object) and a prototype: the normalised mean of its exemplars, or, for a role without exemplars, a
  vector given when it was added (e.g. the classifier's own weight row), or none (``name_only``: a zero
  prototype until exemplars come).
* **Index kinds** (:func:`choose_index`): FAISS ``index_factory`` strings. ``auto`` picks exact ``Flat`` up to
  50k vectors, ``IVF<nlist>,Flat`` up to 2M, and above that ``OPQ<m>_<4m>,IVF<nlist>,PQ<m>x4fsr,Refine(SQ8)``
  with ``m = dim/4`` (compressed fast-scan codes of half a byte per 4 dimensions, candidates re-ranked from 8-bit
  scalar codes; ``OPQ128_512,...,PQ128x4fsr`` for 512-d). From ``LARGE_NLIST`` lists on
  (about 4M vectors) the IVF kinds assign vectors to lists through an HNSW graph over the centroids instead of
  comparing with every centroid (``IVF<nlist>_HNSW32``), and :func:`train_index` trains their k-means in two
  levels (``sqrt(nlist)`` coarse clusters, each split in proportion to its size): training 16,384 lists takes
  minutes instead of the better part of an hour on 2 cores. The names ``flat``, ``ivf``,
  ``hnsw``, ``ivfpq`` and ``opq`` pick a kind with the same size rules for its parameters; any other string is
  used as a factory string as is. Indexes that cannot remove vectors (HNSW, re-ranking indexes) keep removed
  vectors as tombstones that searches skip until the next rebuild.
* **GPU.** With ``device="auto"`` the index is copied to a GPU when ``faiss`` was built with GPU support (the
  ``[gpu]`` extra, ``faiss-gpu-cu12``) and a CUDA device is visible; otherwise (and for kinds FAISS has no GPU
  version of) it stays on the CPU. The API is the same.
* **Threads.** A readers-writer lock: any number of concurrent searches on a CPU index (FAISS CPU search is
  thread-safe), adds/removals/rebuilds exclusive. GPU indexes are not safe even for concurrent searches, so there
  every search takes the lock exclusively.
* **Persistence** (:meth:`FeatureDB.save` / :meth:`FeatureDB.load`): a folder holding generation folders
  ``gen-<n>/`` and a ``CURRENT`` file naming the live one. A save writes a complete new generation into a
  temporary folder (each file fsync'ed, then the folder), renames it into place, fsyncs the parent, then replaces
  ``CURRENT`` atomically (temp file, fsync, rename, fsync of the folder). A process killed at any moment leaves
  ``CURRENT`` naming either the previous or the new generation, both complete. Each generation has
  ``manifest.json`` (format, version, dimension, model hash, index kind, counts, and the size + SHA-256 of every
  file), ``index.faiss`` (``faiss.write_index``; FAISS files are not pickles), ``roles.json`` and ``.npy`` arrays
  read with ``allow_pickle=False``. Nothing is ever unpickled.
* **Memory at scale** (``keep_vectors=False``): by default the normalised vectors are kept next to the index
  (4 bytes per dimension per vector: 20 GB for 10M x 512). Without them the index is the only copy: the vectors a
  replay, a rebuild or :meth:`FeatureDB.vectors_of` needs are reconstructed from it (exact for ``Flat``/``IVF,Flat``,
  8-bit plus residual bits for the ``Refine(SQ8)`` kinds), so a 10M x 512 ``opq`` database holds ~7 GB. IVF kinds get a
  hash-table direct map for that (reconstruction by id). Such a database starts with an exact ``Flat`` index and
  becomes its kind at the first :meth:`FeatureDB.rebuild`, trained on a sample of everything added by then (a
  kind trained on the first few vectors would clip later ones, and its codes are the only copy).
* **The last re-ranking** (compressed ``Refine`` kinds on the CPU): a search takes ``fine_factor * k`` results
  from the index (with as many first-stage candidates as ``k`` results would have had) and re-scores them finer,
  keeping the best ``k``: from the kept vectors (exact), or, without them, from the 8-bit code plus ``fine_bits``
  residual bits per dimension (:mod:`animeai.online.residual`, ``fine.npy``; 1 bit by default: 64 bytes a 512-d
  vector, +12 % memory). At 10M the 8-bit code alone lost ~4 points of recall@10 that its candidates held (README).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from animeai.online.errors import FeatureDBError, OnlineError
from animeai.online.residual import MAX_BITS, ResidualCodec

FORMAT = "animeai.feature_db"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
_GEN_RE = re.compile(r"^gen-(\d{8})$")
_FILES = ("index.faiss", "vectors.npy", "norms.npy", "vec_role.npy", "prototypes.npy", "roles.json")
_AUX_FILE = "aux.npy"  # only in databases with auxiliary features (aux_dim > 0)
_FINE_FILES = ("fine.npy", "fine_range.npy")  # only in databases with residual codes (see residual.py)
FINE_BITS = 1  # residual bits per dimension of a compressed kind without kept vectors (README, "Measured")
_FINE_TRAIN = 65_536  # vectors the residual ranges are learnt from
_RESCORE_ROWS = 512  # results re-scored at a time in the last re-ranking (cache-sized blocks)
FLAT_MAX = 50_000
IVF_FLAT_MAX = 2_000_000
LARGE_NLIST = 8192  # from here on: HNSW coarse quantizer and two-level k-means
_CHUNK = 65_536  # vectors per step when reconstructing, rebuilding or summing
_TRAIN_MAX = 500_000  # training sample of a rebuild
ADD_EF_SEARCH = 32  # HNSW coarse quantizer beam while adding (searches use SearchParams.ef_search)


def require_faiss():
    """Import FAISS or explain how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise OnlineError('the online-learning system needs FAISS: pip install -e ".[online]" (faiss-cpu), or '
                          f'".[gpu]" for faiss-gpu-cu12 ({exc})') from None
    return faiss


# ------------------------------------------------------------------------------------------ index kinds


def set_search_threads(threads: int) -> int:
    """FAISS's OpenMP threads in this process (``0``: FAISS's default, one per core); returns the number now used.

    A server answering one query per request should use 1: concurrency then comes from the requests, and FAISS
    does not open an OpenMP team per query (with several requests in flight on a busy machine those teams
    spin-wait on one another: a search of a few vectors took 1.9 ms instead of under 0.1 ms in
    ``bench_service.py``). Batch work (building, evaluating, bulk search) keeps the default."""
    global _DEFAULT_SEARCH_THREADS
    faiss = require_faiss()
    if threads < 0:
        raise ValueError(f"search threads must be >= 0, got {threads}")
    if _DEFAULT_SEARCH_THREADS is None:  # FAISS's own default (it honours OMP_NUM_THREADS), before any change
        _DEFAULT_SEARCH_THREADS = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads or _DEFAULT_SEARCH_THREADS)
    return faiss.omp_get_max_threads()


_DEFAULT_SEARCH_THREADS: int | None = None


def _nlist(n: int) -> int:
    """IVF lists: about 4 * sqrt(n), a power of two, and at least 39 training points per list."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return max(1, nlist)


def _pq_m(dim: int, divides: bool = True) -> int:
    """PQ sub-quantisers of the compressed kinds' first stage: dim/4 (128 for 512-d), 4 bits each, so the code is
    1/8 of the 8-bit re-ranking code. With ``divides`` (plain PQ) the largest divisor of ``dim`` not above dim/4;
    an OPQ kind rotates into ``4 * m`` dimensions and needs none. Measured against dim/8 (the rule before) on
    embedding-like 512-d vectors, at equal recall: 1.4x the queries per second for PQ (1M and 10M), 1.1-1.3x for
    OPQ (1M), for 32 more bytes a vector (README)."""
    m = max(1, dim // 4)
    while divides and dim % m:
        m -= 1
    return m


def choose_index(n: int, dim: int, kind: str = "auto") -> str:
    """The ``faiss.index_factory`` string for ``n`` vectors of ``dim`` (see the module docstring for the rules)."""
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else "ivf" if n <= IVF_FLAT_MAX else "opq"
    nlist = _nlist(n)
    m, mo = _pq_m(dim), _pq_m(dim, divides=False)
    ivf = f"IVF{nlist}_HNSW32" if nlist >= LARGE_NLIST else f"IVF{nlist}"
    named = {
        "flat": "Flat",
        "ivf": f"{ivf},Flat",
        "hnsw": "HNSW32,Flat",
        "ivfpq": f"{ivf},PQ{m}x4fsr,Refine(SQ8)",
        "opq": f"OPQ{mo}_{4 * mo},{ivf},PQ{mo}x4fsr,Refine(SQ8)",
    }
    return named.get(kind, kind)


def _inner_ivf(index, faiss, x: np.ndarray):
    """The IVF index inside ``index`` (through id maps, re-ranking and pre-transforms, training the transforms on
    ``x`` on the way) and ``x`` as that IVF sees it; ``(None, x)`` when there is none."""
    node = faiss.downcast_index(index)
    for _ in range(8):
        if isinstance(node, faiss.IndexIVF):
            return node, x
        if isinstance(node, faiss.IndexPreTransform):
            for i in range(node.chain.size()):
                vt = node.chain.at(i)
                if not vt.is_trained:
                    vt.train(x)
                x = vt.apply(x)
        inner = getattr(node, "index", None) or getattr(node, "base_index", None)
        if inner is None:
            return None, x
        node = faiss.downcast_index(inner)
    return None, x


def two_level_kmeans(x: np.ndarray, k: int, faiss, *, niter: int = 20, seed: int = 1234) -> np.ndarray:
    """``k`` centroids of ``x`` in two levels: ``sqrt(k)`` coarse clusters, then each split into a share of ``k``
    proportional to its size (at least one centroid each, never more than its points). Costs about
    ``2 * sqrt(k)`` distance computations per point and iteration instead of ``k``."""
    n, d = x.shape
    if n < k:
        raise FeatureDBError(f"{k} centroids need at least {k} training vectors, got {n}")
    k1 = max(1, min(int(math.sqrt(k)), n))
    quiet = {"min_points_per_centroid": 1}  # few points per centroid is the point here: no FAISS warnings
    top = faiss.Kmeans(d, k1, niter=niter, seed=seed, max_points_per_centroid=2000, **quiet)
    top.train(x)
    assign = top.assign(x)[1]
    sizes = np.bincount(assign, minlength=k1)
    share = np.maximum(1, np.floor(sizes / n * k)).astype(np.int64) * (sizes > 0)
    share = np.minimum(share, sizes)
    order = np.argsort(-(sizes / n * k - share))  # hand the remainder to the largest fractional parts
    i = 0
    while share.sum() < k:
        c = order[i % k1]
        if share[c] < sizes[c]:
            share[c] += 1
        i += 1
    while share.sum() > k:  # the "at least one" floor overshot: take back from the largest shares
        share[np.argmax(share)] -= 1
    parts = []
    for c in range(k1):
        if share[c] == 0:
            continue
        sub = x[assign == c]
        if share[c] == len(sub):
            parts.append(sub)
            continue
        km = faiss.Kmeans(d, int(share[c]), niter=niter, seed=seed + c + 1, max_points_per_centroid=256, **quiet)
        km.train(np.ascontiguousarray(sub))
        parts.append(km.centroids)
    return np.ascontiguousarray(np.concatenate(parts).astype(np.float32))


def train_index(index, x: np.ndarray, faiss=None) -> None:
    """Train ``index`` on ``x``. An IVF of ``LARGE_NLIST`` lists or more gets its centroids from
    :func:`two_level_kmeans` first (FAISS then trains the rest: codes, re-ranking, transforms); smaller ones are
    trained by FAISS alone."""
    faiss = faiss or require_faiss()
    ivf, xt = _inner_ivf(index, faiss, x)
    if ivf is not None and ivf.nlist >= LARGE_NLIST and ivf.quantizer.ntotal == 0:
        centroids = two_level_kmeans(np.ascontiguousarray(xt, dtype=np.float32), ivf.nlist, faiss)
        if ivf.metric_type == faiss.METRIC_INNER_PRODUCT:  # unit-length centroids, like the unit-length vectors
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        ivf.quantizer.train(centroids)
        ivf.quantizer.add(centroids)
    index.train(x)


@dataclass(frozen=True)
class SearchParams:
    """Search-time knobs: IVF lists probed, HNSW beam width, re-ranking candidates per result; for the compressed
    (``Refine``) kinds, how many of the re-ranked results per result get the last, finer re-scoring (from the kept
    vectors, or the 8-bit code plus the residual codes; 0 or 1: none)."""

    nprobe: int = 32
    ef_search: int = 128
    k_factor: int = 48  # 10M x 512, the default kind, loaded: recall@10 0.955 at 2,500-3,800 QPS on 2 cores (README)
    fine_factor: int = 2


def _native_ids(spec: str) -> bool:
    return spec.startswith("IDMap") or (spec.startswith("IVF") and "Refine" not in spec and "RFlat" not in spec)


def new_index(spec: str, dim: int, faiss=None):
    """An empty inner-product index for ``spec``, wrapped in ``IDMap2`` unless it stores ids itself (IVF)."""
    faiss = faiss or require_faiss()
    full = spec if _native_ids(spec) else f"IDMap2,{spec}"
    try:
        return faiss.index_factory(dim, full, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise OnlineError(f"index kind {spec!r} is not a valid FAISS index_factory string: "
                          f"{str(exc).strip().splitlines()[-1]}") from None


@contextlib.contextmanager
def adding(index, faiss=None) -> Iterator[None]:
    """While adding: the HNSW coarse quantizer (large IVF kinds) assigns vectors with a beam of ``ADD_EF_SEARCH``
    instead of the search setting (3.4x faster than at 128 for 16,384 centroids, measured; a vector put in its
    second-nearest list is still found, that list being probed too). Restored afterwards. Callers hold the
    database's write lock."""
    faiss = faiss or require_faiss()
    hnsw = None
    with contextlib.suppress(RuntimeError):
        ivf = faiss.try_extract_index_ivf(index)
        q = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
        hnsw = q.hnsw if isinstance(q, faiss.IndexHNSW) else None
    if hnsw is None:
        yield
        return
    before = hnsw.efSearch
    hnsw.efSearch = ADD_EF_SEARCH
    try:
        yield
    finally:
        hnsw.efSearch = before


def apply_search_params(index, params: SearchParams, faiss=None) -> None:
    """Set nprobe / efSearch / k_factor wherever the index (or what it wraps) has them."""
    faiss = faiss or require_faiss()
    ps = faiss.ParameterSpace()
    nprobe = params.nprobe
    with contextlib.suppress(RuntimeError):  # never more lists than there are: FAISS's fast-scan IVF ("fsr")
        ivf = faiss.try_extract_index_ivf(index)  # returns garbage (scores ~1e31) when nprobe > nlist
        if ivf is not None:
            nprobe = max(1, min(nprobe, ivf.nlist))
    for name, value in (("nprobe", nprobe), ("efSearch", params.ef_search)):
        with contextlib.suppress(RuntimeError):
            ps.set_index_parameter(index, name, value)
    node = index
    for _ in range(8):  # walk wrappers down to an IndexRefine, if any
        node = faiss.downcast_index(node)
        if isinstance(node, faiss.IndexRefine):
            node.k_factor = float(params.k_factor)
            return
        inner = getattr(node, "index", None) or getattr(node, "base_index", None)
        if inner is None:
            return
        node = inner


def faiss_device(device: str = "auto", faiss=None) -> str:
    """``gpu`` when asked for (or ``auto``) and FAISS has GPU support and sees a CUDA device, else ``cpu``.
    Asking for ``gpu`` on a machine without one is an error."""
    faiss = faiss or require_faiss()
    if device not in ("auto", "cpu", "gpu"):
        raise OnlineError(f"feature-database device {device!r}: use auto, cpu or gpu")
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device == "gpu" and not has_gpu:
        raise OnlineError("feature-database device gpu: FAISS has no GPU support here (install the [gpu] extra, "
                          "faiss-gpu-cu12, on a machine with CUDA) or use device cpu")
    return "gpu" if has_gpu and device != "cpu" else "cpu"


# ------------------------------------------------------------------------------------------ locking


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ------------------------------------------------------------------------------------------ helpers


def normalize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised float32 copy and the row norms; a zero or non-finite row is an error."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise OnlineError(f"embeddings must be a 2-D array (n, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise OnlineError("embeddings hold NaN or Infinity")
    norms = np.linalg.norm(x, axis=1).astype(np.float32)
    if (norms == 0).any():
        raise OnlineError("an embedding is all zeros (cannot be normalised)")
    return x / norms[:, None], norms


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def is_database(path: str | Path) -> bool:
    """True if ``path`` holds a database (a ``CURRENT`` file); an absent or empty folder is no database."""
    return (Path(path) / CURRENT).exists()


def is_empty_location(path: str | Path) -> bool:
    p = Path(path)
    return not p.exists() or (p.is_dir() and not any(p.iterdir()))


# ------------------------------------------------------------------------------------------ the database


def publish_generation(root: Path, tmp: Path, gen: int) -> Path:
    """Make the fully written folder ``tmp`` the live generation ``gen`` of ``root``: fsync it, rename it to
    ``gen-<gen>``, then point ``CURRENT`` at it with an atomic replace (each step fsynced), so a kill at any
    moment leaves the previous or the new generation live, never a broken one. Returns the final folder."""
    _fsync_dir(tmp)
    final = root / f"gen-{gen:08d}"
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f".{CURRENT}.{uuid.uuid4().hex[:8]}.tmp"
    _write_text(pointer, final.name + "\n")
    os.replace(pointer, root / CURRENT)
    _fsync_dir(root)
    return final


def read_current_manifest(root: Path, what: str) -> tuple[Path, Path, Any]:
    """The generation folder that ``root/CURRENT`` names, its manifest's path and the manifest's parsed JSON
    (not yet checked: the caller checks its format). A missing folder, pointer or manifest, a damaged pointer or
    a manifest that is not JSON is a :class:`FeatureDBError` naming the file; ``what`` names the database kind."""
    if not root.is_dir():
        raise FeatureDBError(f"{root}: {what} folder not found")
    pointer = root / CURRENT
    try:
        gen_name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise FeatureDBError(f"{pointer}: missing: {root} is not a {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatureDBError(f"{pointer}: unreadable ({exc})") from None
    if not _GEN_RE.match(gen_name):
        raise FeatureDBError(f"{pointer}: damaged: names {gen_name[:60]!r}, not a generation folder")
    folder = root / gen_name
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureDBError(f"{mpath}: missing (the generation {CURRENT} names is incomplete)") from None
    except (OSError, ValueError) as exc:
        raise FeatureDBError(f"{mpath}: damaged manifest, not valid JSON ({exc})") from None
    return folder, mpath, manifest


class FeatureDB:
    """Roles, their normalised exemplar embeddings and prototypes, and a FAISS index over the exemplars."""

    def __init__(self, dim: int, model_hash: str, *, index_kind: str = "auto", params: SearchParams | None = None,
                 device: str = "auto", keep_vectors: bool = True, aux_dim: int = 0, fine_bits: int = FINE_BITS):
        self.faiss = require_faiss()
        self.keep_vectors = bool(keep_vectors)
        if not isinstance(fine_bits, int) or isinstance(fine_bits, bool) or not 0 <= fine_bits <= MAX_BITS:
            raise OnlineError(f"fine_bits must be an integer from 0 to {MAX_BITS}, got {fine_bits!r}")
        # residual codes for the last re-ranking of a compressed kind without kept vectors (0: none)
        self.fine_bits = fine_bits
        self._fine_codec: ResidualCodec | None = None  # trained when such a kind is trained
        self._fine = np.zeros((0, 0), np.uint8)  # rows [0, _n): each vector's residual code
        self._on_gpu = False
        if not isinstance(dim, int) or dim < 1:
            raise OnlineError(f"embedding dimension must be a positive integer, got {dim!r}")
        if not isinstance(aux_dim, int) or isinstance(aux_dim, bool) or aux_dim < 0:
            raise OnlineError(f"aux_dim must be an integer >= 0, got {aux_dim!r}")
        self.dim = dim
        self.aux_dim = aux_dim  # per-vector auxiliary features kept beside the index (0: none), see aux_of()
        self.model_hash = model_hash
        self.index_kind = index_kind
        self.params = params or SearchParams()
        self.device = faiss_device(device, self.faiss)
        self.lock = RWLock()
        self.roles: list[dict[str, Any]] = []  # role i = class i of the classifier; {"name": ..., ...metadata}
        self._prototypes = np.zeros((0, dim), np.float32)
        self._fixed = np.zeros(0, bool)  # prototype given (no exemplars) rather than the exemplars' mean
        self._sums = np.zeros((0, dim), np.float64)
        self._counts = np.zeros(0, np.int64)
        self._vec = np.zeros((0, dim), np.float32)  # capacity buffer; rows [0, _n) are used
        self._norm = np.zeros(0, np.float32)
        self._aux = np.zeros((0, aux_dim), np.float32)
        self._role_of = np.zeros(0, np.int32)
        self._n = 0
        self._tombstones = 0  # removed vectors still inside the index (kinds without remove_ids)
        # without kept vectors, a trained kind must not be trained on the first few vectors (its codes would be
        # the only copy, clipped to their ranges): vectors go to an exact index until rebuild() trains the kind
        self.index_spec = choose_index(0, dim, index_kind if keep_vectors else "flat")
        self._index = self._new_index(self.index_spec)
        self._gpu_res = None
        self._index = self._place(self._index)

    # ---------------------------------------------------------------- read-only views

    @property
    def num_roles(self) -> int:
        return len(self.roles)

    @property
    def num_vectors(self) -> int:
        """Live exemplar vectors (removed roles' vectors excluded)."""
        return int((self._role_of[: self._n] >= 0).sum())

    @property
    def num_rows(self) -> int:
        """Vector ids used so far (removed vectors included: ids are never reused); the next id is this."""
        return self._n

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def role_names(self) -> list[str]:
        return [r["name"] for r in self.roles]

    def role_counts(self) -> list[int]:
        return self._counts.tolist()

    def prototypes(self) -> np.ndarray:
        return self._prototypes.copy()

    def vectors_of(self, role: int, sample: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(normalised vectors, norms) of a role's exemplars: ``vectors * norms[:, None]`` are the raw features.
        ``sample``: at most that many of them, a fixed random choice (in id order), read without the others."""
        with self._search_lock():  # reconstruction reads the index: like a search
            rows = np.nonzero(self._role_of[: self._n] == role)[0]
            if sample is not None and len(rows) > sample:
                rows = np.sort(np.random.default_rng(0).choice(rows, sample, replace=False))
            return self._rows(rows), self._norm[rows]  # both fresh arrays (fancy indexing copies)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The normalised vectors of vector ids (as :meth:`search_vectors` returns them), ``(len(ids), dim)``."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        with self._search_lock():
            if len(ids) and (ids.min() < 0 or ids.max() >= self._n or (self._role_of[ids] < 0).any()):
                raise FeatureDBError("vectors: an id is not a live vector of this database")
            return self._rows(ids)

    def aux_of(self, role: int) -> np.ndarray:
        """The auxiliary features (``aux_dim`` wide, as given to :meth:`add`) of a role's exemplars, in the order of
        :meth:`vectors_of`. A database indexes one embedding; ``aux`` keeps another per exemplar, e.g. the
        classifier's own input features when the index holds a retrieval descriptor."""
        with self.lock.read():
            rows = np.nonzero(self._role_of[: self._n] == role)[0]
            return self._aux[rows]

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """The normalised vectors of ``rows`` (ids), a new array: kept, or reconstructed from the index
        (re-normalised)."""
        if self.keep_vectors:
            return self._vec[rows]
        out = np.empty((len(rows), self.dim), np.float32)
        index = self._cpu_index()
        for s in range(0, len(rows), _CHUNK):
            part = rows[s: s + _CHUNK].astype(np.int64)
            out[s: s + len(part)] = self._reconstruct(index, part)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _reconstruct(self, index, ids: np.ndarray) -> np.ndarray:
        """The vectors of ``ids`` from the index's codes, plus their residual codes when the database has them."""
        out = index.reconstruct_batch(ids)
        if self._fine_codec is not None:
            out += self._fine_codec.decode(self._fine[ids])
        return out

    # ---------------------------------------------------------------- residual codes

    def _fine_kind(self, spec: str) -> bool:
        """Whether vectors of this kind get residual codes: a compressed (re-ranking) kind without kept vectors."""
        return self.fine_bits > 0 and not self.keep_vectors and "Refine(" in spec

    def _train_fine(self, index, spec: str, sample: np.ndarray) -> ResidualCodec | None:
        """A residual codec for the trained, empty ``index``: the ranges of what its codes miss on ``sample``
        (normalised), measured on a copy of the index holding a random part of the sample. ``None`` when the kind
        gets none."""
        if not self._fine_kind(spec) or self._refine_parts(index) is None:
            return None
        if len(sample) > _FINE_TRAIN:
            sample = sample[np.sort(np.random.default_rng(1).choice(len(sample), _FINE_TRAIN, replace=False))]
        part = np.ascontiguousarray(sample)
        ids = np.arange(len(part), dtype=np.int64)
        probe = self.faiss.clone_index(index)
        with adding(probe, self.faiss):
            probe.add_with_ids(part, ids)
        codec = ResidualCodec(self.dim, self.fine_bits)
        codec.train(part - probe.reconstruct_batch(ids))
        return codec

    def _fine_codes(self, index, codec: ResidualCodec, normed: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The residual codes of ``normed``, just added to ``index`` under ``ids``."""
        return codec.encode(normed - index.reconstruct_batch(ids))

    def _refine_parts(self, index=None):
        """``(id map, IndexRefine, its refine index)`` when ``index`` (default: the database's) is an ``IDMap2`` over
        an ``IndexRefine`` whose refine index keeps plain codes (``SQ8``, ``Flat``): what the last re-ranking reads
        the 8-bit codes from without a call per vector. ``None`` otherwise."""
        node = self.faiss.downcast_index(index if index is not None else self._index)
        if not isinstance(node, self.faiss.IndexIDMap2):
            return None
        refine = self.faiss.downcast_index(node.index)
        if not isinstance(refine, self.faiss.IndexRefine):
            return None
        codes = self.faiss.downcast_index(refine.refine_index)
        return (node, refine, codes) if isinstance(codes, self.faiss.IndexFlatCodes) else None

    def _fine_ready(self) -> bool:
        """Whether searches end with the finer re-scoring: a compressed kind on the CPU, with kept vectors or residual
        codes, and a ``fine_factor`` above 1."""
        if min(self.params.fine_factor, self.params.k_factor) <= 1 or self._on_gpu or "Refine(" not in self.index_spec:
            return False
        return self.keep_vectors or (self._fine_codec is not None and self._refine_parts() is not None)

    def _fine_search(self, q: np.ndarray, more: int, k_factor: float) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the index's best ``more`` results of each query, re-scored from the kept vectors or
        the 8-bit codes plus the residual codes, best first. The 8-bit codes and the id map are read in place
        (views valid under the search lock: adds, which may move them, take the write lock); the work goes in
        blocks of ``_RESCORE_ROWS`` results, small enough to stay in the CPU's cache. Callers hold the search
        lock."""
        sp = self.faiss.IndexRefineSearchParameters()
        sp.k_factor = k_factor
        labels = None
        if self.keep_vectors:
            ids = self._index.search(q, more, params=sp)[1]
        else:
            node, refine, sq = self._refine_parts()
            labels = refine.search(q, more, params=sp)[1]  # positions inside the refine index
            id_map = self.faiss.rev_swig_ptr(node.id_map.data(), node.id_map.size())
            codes = self.faiss.rev_swig_ptr(sq.codes.data(), sq.codes.size()).reshape(-1, sq.code_size)
            ids = np.where(labels >= 0, id_map[np.clip(labels, 0, None)], -1)
        out = np.empty(ids.shape, np.float32)
        per = max(1, _RESCORE_ROWS // more)
        for s in range(0, len(q), per):
            block = ids[s: s + per]
            rows = np.clip(block, 0, None).ravel()
            if labels is None:
                vecs = self._vec[rows]
            else:
                vecs = sq.sa_decode(codes[np.clip(labels[s: s + per], 0, None).ravel()])
                vecs += self._fine_codec.decode(self._fine[rows])
            scores = np.matmul(vecs.reshape(*block.shape, self.dim), q[s: s + per, :, None])[..., 0]
            out[s: s + per] = np.where(block >= 0, scores, -np.inf)
        order = np.argsort(-out, axis=1, kind="stable")
        return np.take_along_axis(out, order, 1), np.take_along_axis(ids, order, 1)

    def _new_index(self, spec: str):
        index = new_index(spec, self.dim, self.faiss)
        if not self.keep_vectors and _native_ids(spec):  # IVF: reconstruction by id needs a direct map
            ivf = self.faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.set_direct_map_type(self.faiss.DirectMap.Hashtable)
        return index

    # ---------------------------------------------------------------- index placement

    def _place(self, index):
        self._on_gpu = False
        if self.device != "gpu":
            apply_search_params(index, self.params, self.faiss)
            return index
        try:
            if self._gpu_res is None:
                self._gpu_res = self.faiss.StandardGpuResources()
            index = self.faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            self._on_gpu = True
        except RuntimeError as exc:  # a kind FAISS has no GPU version of (HNSW, refine): stay on the CPU
            warnings.warn(f"index kind {self.index_spec} stays on the CPU: {str(exc).strip().splitlines()[-1]}",
                          stacklevel=3)
        apply_search_params(index, self.params, self.faiss)
        return index

    def _cpu_index(self):
        if self.device == "gpu" and hasattr(self.faiss, "index_gpu_to_cpu"):
            with contextlib.suppress(RuntimeError):  # already a CPU index (kind without a GPU version)
                return self.faiss.index_gpu_to_cpu(self._index)
        return self._index

    @contextlib.contextmanager
    def _search_lock(self) -> Iterator[None]:
        ctx = self.lock.write() if self.device == "gpu" else self.lock.read()
        with ctx:
            yield

    # ---------------------------------------------------------------- changes

    def _grow(self, extra: int) -> None:
        need = self._n + extra
        if need <= len(self._norm):
            return
        cap = max(need, 2 * len(self._norm), 64)
        vec = np.zeros((cap if self.keep_vectors else 0, self.dim), np.float32)
        if self.keep_vectors:
            vec[: self._n] = self._vec[: self._n]
        norm = np.zeros(cap, np.float32)
        norm[: self._n] = self._norm[: self._n]
        role_of = np.full(cap, -1, np.int32)
        role_of[: self._n] = self._role_of[: self._n]
        aux = np.zeros((cap if self.aux_dim else 0, self.aux_dim), np.float32)
        if self.aux_dim:
            aux[: self._n] = self._aux[: self._n]
        if self._fine_codec is not None:
            fine = np.zeros((cap, self._fine_codec.code_size), np.uint8)
            fine[: self._n] = self._fine[: self._n]
            self._fine = fine
        self._vec, self._norm, self._role_of, self._aux = vec, norm, role_of, aux

    def check_name_free(self, name: str) -> None:
        if name in self.role_names():
            raise OnlineError(f"role {name!r} already exists (id {self.role_names().index(name)})")

    def add_role(self, name: str, embeddings: np.ndarray | None = None, *, prototype: np.ndarray | None = None,
                 metadata: dict[str, Any] | None = None, aux: np.ndarray | None = None,
                 name_only: bool = False) -> int:
        """A new role (id = the next class id) with raw ``embeddings`` as exemplars (and their ``aux`` rows when the
        database keeps auxiliary features), or only a ``prototype``, or (``name_only``) neither: a role known by
        name, with a zero prototype, until exemplars are added."""
        self.check_name_free(name)
        if embeddings is None and prototype is None and not name_only:
            raise OnlineError(f"role {name!r}: give exemplar embeddings or a prototype")
        normed = norms = aux_rows = None
        if embeddings is not None:
            normed, norms = self._check(embeddings)
            if len(normed) == 0:
                raise OnlineError(f"role {name!r}: no embeddings")
            aux_rows = self._check_aux(aux, len(normed))
        proto = None
        if prototype is not None:
            proto = self._check(np.asarray(prototype, np.float32).reshape(1, -1))[0][0]
        entry = {"name": name, **(metadata or {})}
        entry["name"] = name
        with self.lock.write():
            role = len(self.roles)
            self.roles.append(entry)
            self._prototypes = np.vstack([self._prototypes, np.zeros((1, self.dim), np.float32)])
            self._sums = np.vstack([self._sums, np.zeros((1, self.dim), np.float64)])
            self._counts = np.append(self._counts, 0)
            self._fixed = np.append(self._fixed, normed is None)
            if proto is not None:
                self._prototypes[role] = proto
            if normed is not None:
                self._add_rows(role, normed, norms, aux_rows)
        return role

    def _check(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise OnlineError(f"embeddings of shape {tuple(x.shape)} do not fit this database (dimension {self.dim})")
        return normalize(x)

    def _check_aux(self, aux: np.ndarray | None, n: int) -> np.ndarray | None:
        if not self.aux_dim:
            if aux is not None:
                raise OnlineError("this database keeps no auxiliary features (aux_dim 0): give no aux")
            return None
        if aux is None:
            raise OnlineError(f"this database keeps {self.aux_dim}-d auxiliary features per exemplar: give aux")
        a = np.ascontiguousarray(aux, dtype=np.float32)
        if a.shape != (n, self.aux_dim):
            raise OnlineError(f"aux of shape {tuple(a.shape)} does not fit {n} embeddings (expected "
                              f"({n}, {self.aux_dim}))")
        if not np.isfinite(a).all():
            raise OnlineError("aux holds NaN or Infinity")
        return a

    def add(self, role: int, embeddings: np.ndarray, aux: np.ndarray | None = None) -> np.ndarray:
        """Add raw ``embeddings`` as exemplars of ``role`` (with their ``aux`` rows when the database keeps
        auxiliary features); returns their vector ids."""
        normed, norms = self._check(embeddings)
        aux_rows = self._check_aux(aux, len(normed))
        with self.lock.write():
            if not 0 <= role < len(self.roles):
                raise OnlineError(f"unknown role id {role} (the database has {len(self.roles)} roles)")
            return self._add_rows(role, normed, norms, aux_rows)

    def _add_rows(self, role: int, normed: np.ndarray, norms: np.ndarray,
                  aux: np.ndarray | None = None) -> np.ndarray:
        n = len(normed)
        self._grow(n)
        ids = np.arange(self._n, self._n + n, dtype=np.int64)
        if not self._index.is_trained:  # a trained kind loaded empty, or built before any vector: train now
            train_index(self._index, normed, self.faiss)
        with adding(self._index, self.faiss):
            self._index.add_with_ids(normed, ids)
        if self._fine_codec is not None:
            self._fine[ids] = self._fine_codes(self._index, self._fine_codec, normed, ids)
        if self.keep_vectors:
            self._vec[self._n: self._n + n] = normed
        self._norm[self._n: self._n + n] = norms
        if self.aux_dim:
            self._aux[self._n: self._n + n] = aux
        self._role_of[self._n: self._n + n] = role
        self._n += n
        self._sums[role] += normed.sum(axis=0, dtype=np.float64)
        self._counts[role] += n
        self._fixed[role] = False
        self._refresh_prototype(role)
        return ids

    def _refresh_prototype(self, role: int) -> None:
        if self._fixed[role] or self._counts[role] == 0:
            return
        s = self._sums[role]
        self._prototypes[role] = (s / max(np.linalg.norm(s), 1e-12)).astype(np.float32)

    def remove_role(self, role: int) -> None:
        """Remove a role and its vectors; later roles move down by one id (as the classifier's rows do)."""
        with self.lock.write():
            if not 0 <= role < len(self.roles):
                raise OnlineError(f"unknown role id {role} (the database has {len(self.roles)} roles)")
            used = self._role_of[: self._n]
            rows = np.nonzero(used == role)[0].astype(np.int64)
            if len(rows):
                try:  # a hash-table direct map (keep_vectors=False) only takes an IDSelectorArray
                    sel = (self.faiss.IDSelectorBatch if self.keep_vectors else self.faiss.IDSelectorArray)(rows)
                    removed = self._index.remove_ids(sel)
                    self._tombstones += len(rows) - int(removed)
                except RuntimeError:  # this kind cannot remove: searches skip the rows until a rebuild
                    self._tombstones += len(rows)
            used[used == role] = -1
            used[used > role] -= 1
            del self.roles[role]
            keep = np.arange(len(self._counts)) != role
            self._prototypes, self._sums = self._prototypes[keep], self._sums[keep]
            self._counts, self._fixed = self._counts[keep], self._fixed[keep]

    def prepare(self, sample: np.ndarray, expected_vectors: int) -> str:
        """Choose the index for a database that will hold about ``expected_vectors`` and train it on ``sample`` (raw
        embeddings like those to come) before any vector is added: the bulk-load path of a large database, above
        all with ``keep_vectors=False`` (no exact copy of everything first). Returns the factory string."""
        normed, _ = self._check(sample)
        if not isinstance(expected_vectors, int) or expected_vectors < 1:
            raise OnlineError(f"expected_vectors must be a positive integer, got {expected_vectors!r}")
        with self.lock.write():
            if self._index.ntotal:
                raise OnlineError(f"prepare() is for an empty database; this one holds {self._index.ntotal} vectors "
                                  "(use rebuild())")
            spec = choose_index(expected_vectors, self.dim, self.index_kind)
            index = self._new_index(spec)
            if not index.is_trained:
                train_index(index, normed, self.faiss)
            self._fine_codec = self._train_fine(index, spec, normed)
            self._fine = self._empty_fine(self._fine_codec)
            self.index_spec, self._index = spec, self._place(index)
            return spec

    def _empty_fine(self, codec: ResidualCodec | None) -> np.ndarray:
        """Zeroed residual codes for every row of the current capacity (none without a codec)."""
        return np.zeros((len(self._norm), codec.code_size) if codec else (0, 0), np.uint8)

    def rebuild(self, kind: str | None = None) -> str:
        """Build a fresh index of ``kind`` (default: this database's kind, re-chosen for the current size) from the
        live vectors, training it when the kind needs training; drops tombstones. Returns the factory string."""
        with self.lock.write():
            if kind is not None:
                self.index_kind = kind
            live = np.nonzero(self._role_of[: self._n] >= 0)[0].astype(np.int64)
            spec = choose_index(len(live), self.dim, self.index_kind)
            index = self._new_index(spec)
            codec = None
            if not index.is_trained and len(live):  # a random sample is enough to train (FAISS samples too)
                sample = live if len(live) <= _TRAIN_MAX else np.sort(
                    np.random.default_rng(0).choice(live, _TRAIN_MAX, replace=False))
                normed = np.ascontiguousarray(self._rows(sample))
                train_index(index, normed, self.faiss)
                codec = self._train_fine(index, spec, normed)
                del normed
            codes = self._empty_fine(codec)
            for s in range(0, len(live), _CHUNK):  # never a copy of every vector at once
                part = live[s: s + _CHUNK]
                normed = np.ascontiguousarray(self._rows(part))  # from the old index (and codes)
                with adding(index, self.faiss):
                    index.add_with_ids(normed, part)
                if codec is not None:
                    codes[part] = self._fine_codes(index, codec, normed, part)
            self._fine_codec, self._fine = codec, codes
            self.index_spec, self._tombstones = spec, 0
            self._index = self._place(index)
            return spec

    # ---------------------------------------------------------------- search

    def set_params(self, params: SearchParams) -> None:
        """Change the search-time knobs (applied to the index; kept in the next save)."""
        with self.lock.write():
            self.params = params
            apply_search_params(self._index, params, self.faiss)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, roles)`` of the ``k`` nearest exemplars of each query (cosine; queries need not be normalised).
        Missing results (fewer than ``k`` live vectors) have role ``-1`` and score ``-inf``."""
        scores, _, roles = self.search_vectors(queries, k)
        return scores, roles

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, vector ids, roles)`` of the ``k`` nearest exemplars of each query: :meth:`search` with the
        ids of the vectors found (missing results: id ``-1``, role ``-1``, score ``-inf``)."""
        q = self._check(queries)[0]
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        out_r = np.full((len(q), k), -1, np.int64)
        with self._search_lock():
            total = int(self._index.ntotal)
            fetch = min(total, k + self._tombstones)
            if fetch == 0:
                return out_s, out_i, out_r
            if self._fine_ready():  # more results from the index, re-scored finer; as many candidates as without
                # (never more results than candidates: with k_factor below fine_factor, k_factor results a result)
                more = min(total, min(self.params.fine_factor, self.params.k_factor) * k + self._tombstones)
                scores, ids = self._fine_search(q, more, max(1.0, self.params.k_factor * fetch / more))
                scores, ids = scores[:, :fetch], ids[:, :fetch]
            else:
                scores, ids = self._index.search(q, fetch)
            roles = np.where(ids >= 0, self._role_of[np.clip(ids, 0, None)], -1)
        if fetch == k and not self._tombstones:  # nothing to skip: the common case without a per-row loop
            ok = roles >= 0
            return np.where(ok, scores, -np.inf).astype(np.float32), np.where(ok, ids, -1), roles
        for i in range(len(q)):
            ok = roles[i] >= 0
            s, v, r = scores[i][ok][:k], ids[i][ok][:k], roles[i][ok][:k]
            out_s[i, : len(s)], out_i[i, : len(v)], out_r[i, : len(r)] = s, v, r
        return out_s, out_i, out_r

    def role_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(sums, counts, fixed, prototypes)`` per role: the sum of its normalised exemplars (float64), their
        number, whether its prototype was given rather than computed, and the prototypes. Databases holding
        slices of one collection (shards) combine these into the whole collection's prototypes."""
        with self.lock.read():
            return self._sums.copy(), self._counts.copy(), self._fixed.copy(), self._prototypes.copy()

    def prototype_scores(self, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of each query with each role's prototype, ``(n, num_roles)``."""
        q = self._check(queries)[0]
        with self.lock.read():
            return q @ self._prototypes.T

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """Write a new generation into ``path`` atomically (see the module docstring); returns its folder."""
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise FeatureDBError(f"{root}: not a folder")
        if root.exists() and not is_database(root) and not is_empty_location(root):
            raise FeatureDBError(f"{root}: the folder holds other files and no feature database ({CURRENT} is "
                                 "missing); choose an empty or new folder")
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "a") as lock_fh:
            fcntl.flock(lock_fh, fcntl.LOCK_EX)  # one saver at a time, across processes
            gens = sorted(int(m.group(1)) for p in root.iterdir() if (m := _GEN_RE.match(p.name)))
            gen = (gens[-1] + 1) if gens else 1
            tmp = root / f".tmp-gen-{gen:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                with self.lock.read():  # a consistent snapshot: no add/remove while writing
                    self._write_generation(tmp)
                final = publish_generation(root, tmp, gen)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            self._clean(root, keep={final.name, f"gen-{gens[-1]:08d}" if gens else ""})
        return final

    @staticmethod
    def _clean(root: Path, keep: set[str]) -> None:
        """Remove generations older than the previous one and temporary folders/files left by killed saves."""
        for p in root.iterdir():
            stale_gen = _GEN_RE.match(p.name) and p.name not in keep
            if stale_gen or p.name.startswith(".tmp-gen-") or (p.name.startswith(f".{CURRENT}.")
                                                                and p.name.endswith(".tmp")):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()

    def _write_generation(self, folder: Path) -> None:
        n = self._n
        self.faiss.write_index(self._cpu_index(), str(folder / "index.faiss"))
        _fsync_file(folder / "index.faiss")
        _write_npy(folder / "vectors.npy", self._vec[:n] if self.keep_vectors else self._vec[:0])
        _write_npy(folder / "norms.npy", self._norm[:n])
        _write_npy(folder / "vec_role.npy", self._role_of[:n])
        _write_npy(folder / "prototypes.npy", self._prototypes)
        files = list(_FILES)
        if self.aux_dim:
            _write_npy(folder / _AUX_FILE, self._aux[:n])
            files.append(_AUX_FILE)
        if self._fine_codec is not None:
            _write_npy(folder / _FINE_FILES[0], self._fine[:n])
            _write_npy(folder / _FINE_FILES[1], self._fine_codec.ranges())
            files.extend(_FINE_FILES)
        roles = [{**r, "fixed_prototype": bool(f)} for r, f in zip(self.roles, self._fixed)]
        _write_text(folder / "roles.json", json.dumps(roles, ensure_ascii=False, indent=1) + "\n")
        from animeai import __version__

        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dim": self.dim, "model_hash": self.model_hash,
            "metric": "inner_product", "index_kind": self.index_kind, "index_spec": self.index_spec,
            "num_roles": len(self.roles), "num_rows": n, "num_vectors": self.num_vectors,
            "keep_vectors": self.keep_vectors, "aux_dim": self.aux_dim,
            "fine_bits": self.fine_bits, "fine_codes": self._fine_codec is not None,
            "tombstones": self._tombstones, "index_ntotal": int(self._index.ntotal),
            "search_params": asdict(self.params),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "library_version": __version__,
            "files": {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
                      for name in files},
        }
        _write_text(folder / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, expect_dim: int | None = None, expect_model_hash: str | None = None,
             device: str = "auto", verify: bool = True) -> FeatureDB:
        """Read the live generation of ``path``. Every problem is a :class:`FeatureDBError` naming the file and the
        reason: no database, a bad manifest, another format version, a missing or damaged file (size/SHA-256,
        checked with ``verify``), a file that is not a FAISS index, or a dimension / model hash other than the
        expected ones (a database built by another model)."""
        root = Path(path)
        folder, mpath, manifest = read_current_manifest(root, "feature database")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise FeatureDBError(f"{mpath}: not an animeai feature database manifest (format is "
                                 f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r})")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise FeatureDBError(f"{mpath}: feature database format version {manifest.get('format_version')!r} is "
                                 f"not supported (this animeai reads version {FORMAT_VERSION})")
        for key, typ in (("dim", int), ("model_hash", str), ("index_kind", str), ("index_spec", str),
                         ("num_rows", int), ("num_roles", int), ("tombstones", int), ("files", dict)):
            if not isinstance(manifest.get(key), typ):
                raise FeatureDBError(f"{mpath}: damaged manifest: field {key!r} is missing or not a {typ.__name__}")
        dim = manifest["dim"]
        if expect_dim is not None and dim != expect_dim:
            raise FeatureDBError(f"{mpath}: the database holds {dim}-d embeddings but the model gives {expect_dim}-d: "
                                 "it was built by another model (rebuild it with animeai enroll)")
        if expect_model_hash is not None and manifest["model_hash"] != expect_model_hash:
            raise FeatureDBError(f"{mpath}: built by another model (model hash {manifest['model_hash'][:12]}..., "
                                 f"this model's is {expect_model_hash[:12]}...): its embeddings do not match; "
                                 "rebuild it with animeai enroll")
        aux_dim = manifest.get("aux_dim", 0)  # absent: a database from before auxiliary features
        if not isinstance(aux_dim, int) or isinstance(aux_dim, bool) or aux_dim < 0:
            raise FeatureDBError(f"{mpath}: damaged manifest: field 'aux_dim' is not an integer >= 0")
        fine_bits = manifest.get("fine_bits", FINE_BITS)  # absent: a database from before residual codes
        fine_codes = manifest.get("fine_codes", False)
        if (not isinstance(fine_bits, int) or isinstance(fine_bits, bool) or not 0 <= fine_bits <= MAX_BITS
                or not isinstance(fine_codes, bool) or (fine_codes and not fine_bits)):
            raise FeatureDBError(f"{mpath}: damaged manifest: fields 'fine_bits' / 'fine_codes' are not an integer "
                                 f"from 0 to {MAX_BITS} / true or false (true only with bits)")
        for name in (*_FILES, *((_AUX_FILE,) if aux_dim else ()), *(_FINE_FILES if fine_codes else ())):
            f = folder / name
            info = manifest["files"].get(name)
            if not f.is_file():
                raise FeatureDBError(f"{f}: missing")
            if not isinstance(info, dict):
                raise FeatureDBError(f"{mpath}: damaged manifest: no entry for {name}")
            if f.stat().st_size != info.get("size"):
                raise FeatureDBError(f"{f}: damaged: {f.stat().st_size} bytes, the manifest says {info.get('size')}")
            if verify and _sha256(f) != info.get("sha256"):
                raise FeatureDBError(f"{f}: damaged: its SHA-256 differs from the manifest's")
        params = SearchParams(**{k: int(v) for k, v in manifest.get("search_params", {}).items()
                                 if k in {f.name for f in fields(SearchParams)}})
        keep = manifest.get("keep_vectors", True)
        if not isinstance(keep, bool):
            raise FeatureDBError(f"{mpath}: damaged manifest: field 'keep_vectors' is not true/false")
        db = cls(dim, manifest["model_hash"], index_kind=manifest["index_kind"], params=params, device=device,
                 keep_vectors=keep, aux_dim=aux_dim, fine_bits=fine_bits)
        n = manifest["num_rows"]
        vec = _read_npy(folder / "vectors.npy", np.float32, (n if keep else 0, dim))
        norm = _read_npy(folder / "norms.npy", np.float32, (n,))
        role_of = _read_npy(folder / "vec_role.npy", np.int32, (n,))
        aux = _read_npy(folder / _AUX_FILE, np.float32, (n, aux_dim)) if aux_dim else np.zeros((0, 0), np.float32)
        protos = _read_npy(folder / "prototypes.npy", np.float32, (manifest["num_roles"], dim))
        codec = None
        if fine_codes:
            ranges = _read_npy(folder / _FINE_FILES[1], np.float32, (2, dim))
            try:
                codec = ResidualCodec(dim, fine_bits, ranges)
            except FeatureDBError as exc:
                raise FeatureDBError(f"{folder / _FINE_FILES[1]}: damaged: {exc}") from None
            fine = _read_npy(folder / _FINE_FILES[0], np.uint8, (n, codec.code_size))
        try:
            roles = json.loads((folder / "roles.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FeatureDBError(f"{folder / 'roles.json'}: damaged ({exc})") from None
        if (not isinstance(roles, list) or len(roles) != manifest["num_roles"]
                or not all(isinstance(r, dict) and isinstance(r.get("name"), str) and r["name"] for r in roles)):
            raise FeatureDBError(f"{folder / 'roles.json'}: damaged: must list {manifest['num_roles']} named roles")
        if len({r["name"] for r in roles}) != len(roles):
            raise FeatureDBError(f"{folder / 'roles.json'}: damaged: role names repeat")
        if n and (role_of.min() < -1 or role_of.max() >= len(roles)):
            raise FeatureDBError(f"{folder / 'vec_role.npy'}: damaged: role ids out of range")
        ipath = folder / "index.faiss"
        try:
            index = db.faiss.read_index(str(ipath))
        except RuntimeError as exc:
            raise FeatureDBError(f"{ipath}: not a FAISS index ({str(exc).strip().splitlines()[-1][:200]})") from None
        if index.d != dim:
            raise FeatureDBError(f"{ipath}: the index is {index.d}-d but the manifest says {dim}")
        if index.metric_type != db.faiss.METRIC_INNER_PRODUCT:
            raise FeatureDBError(f"{ipath}: the index does not use inner-product (cosine) similarity")
        expected = int((role_of >= 0).sum()) + manifest["tombstones"]
        if index.ntotal != expected:
            raise FeatureDBError(f"{ipath}: holds {index.ntotal} vectors, the database expects {expected}")
        db.roles = [{k: v for k, v in r.items() if k != "fixed_prototype"} for r in roles]
        db._fixed = np.array([bool(r.get("fixed_prototype", False)) for r in roles], bool)
        db._vec, db._norm, db._role_of, db._aux, db._n = vec, norm, role_of, aux, n
        if codec is not None:
            db._fine_codec, db._fine = codec, fine
        db._prototypes = protos
        db._counts = np.bincount(role_of[role_of >= 0], minlength=len(roles)).astype(np.int64)
        db._sums = np.zeros((len(roles), dim), np.float64)
        db._tombstones = manifest["tombstones"]
        db.index_spec = manifest["index_spec"]
        db._index = index
        live = np.nonzero(role_of >= 0)[0]
        for s in range(0, len(live), _CHUNK):  # per-role sums of the live vectors (kept, or from the index)
            part = live[s: s + _CHUNK]
            order = np.argsort(role_of[part], kind="stable")
            which, starts = np.unique(role_of[part][order], return_index=True)
            db._sums[which] += np.add.reduceat(db._rows(part[order]).astype(np.float64), starts, axis=0)
        db._index = db._place(index)
        db.generation = folder
        return db


def _read_npy(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise FeatureDBError(f"{path}: damaged: not a readable .npy array ({exc})") from None
    if arr.dtype != dtype or arr.shape != shape:
        raise FeatureDBError(f"{path}: damaged: holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}")
    return arr if arr.flags.writeable and arr.flags.owndata else np.array(arr)  # writable and owned (no second copy)


def stored_files(path: str | Path) -> Sequence[str]:
    """The file names of one generation (for tools and tests)."""
    return (*_FILES, MANIFEST)
