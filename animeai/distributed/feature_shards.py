"""The role feature database sharded over Ray actors (issue 13, "beyond one machine").

``ShardedFeatureDB.start(num_shards, dim, model_hash, kind=...)`` starts ``num_shards`` actors on the current Ray
connection (a local Ray, or a cluster joined with ``ray.init(address=...)``; when none is connected, the cluster
of ``$RAY_ADDRESS`` or else a new local Ray). Each actor holds a :class:`~animeai.online.feature_db.FeatureDB`
for one slice of the vectors, and the driver-side object offers the database's API: ``search(queries, k) ->
(scores, role ids)``, ``search_vectors`` (with the global vector ids), ``add_role``, ``add``, ``remove_role``,
``rebuild``, ``prototype_scores``, ``save`` and ``load``.

* **Routing: vector id modulo N.** Global vector ids are handed out in order (as in one database); id ``g`` lives
  on shard ``g % N`` as that shard's row ``g // N``. Every add is spread over all shards, so shards stay the same
  size as the collection grows (contiguous ranges would send every new vector to the last shard), and finding a
  vector's shard needs no table. The shard count is fixed when the database is created; another count means a
  rebuild (:meth:`ShardedFeatureDB.from_feature_db` on a merged copy).
* **Search: fan-out + merge.** The query batch is put into the object store once (sent inline when under
  100 KB); every shard searches its slice
  for the top ``k`` at the same time (one ``ray.get`` on all references), and the driver merges the ``N x k``
  candidates per query into the global top ``k`` by score. For exact kinds (``flat``) the result is the same as
  one index over all the vectors: the global top ``k`` are among the union of the per-shard top ``k``.
* **Roles live in every shard; shard 0 is the reference.** Each shard's database holds the whole role table
  (names, metadata, given prototypes) and only its slice of the vectors, so (a) a shard checks that every vector
  it stores belongs to a role, (b) a shard's saved slice is a complete database in the existing format, and
  (c) searches return role ids straight from the shards. Roles are tiny next to the vectors, so the copies cost
  nothing worth measuring. The driver-side object is the one writer: it checks every change before sending it
  (unknown or duplicate role, dimension, NaN, zero vectors), sends role changes to all shards, and keeps a
  read-only copy of the names. It does not hold the role table alone because it is not saved with the shards and
  is gone with the driver; loading compares every shard's role table with shard 0's and refuses a mismatch,
  naming the shard. A role's prototype is combined from all shards (the sum of its exemplars over the shards).
* **Persistence**: ``save(path)`` writes a new generation folder ``gen-<n>/`` holding one folder per shard, each
  written by its own actor with :meth:`FeatureDB.save` (the same atomic, checksummed format), plus
  ``manifest.json`` (format, version, shard count, dimension, model hash, routing, next id, each shard's row
  count and manifest SHA-256); then ``CURRENT`` is replaced atomically. A process killed during a save leaves the
  previous or the new generation. The folder must be on storage every node sees (one machine, or a shared file
  system). Nothing is unpickled when loading: JSON, ``.npy`` without pickle and FAISS files only.
* **Failures**: a dead shard actor is an error naming the shard (its slice is gone until the database is loaded
  again from its last save); no search answers from the surviving shards alone. A change interrupted by a dead
  shard leaves the shards out of step: load the last save.
* **Threads**: each actor runs FAISS with ``threads`` OpenMP threads (default: its CPUs, at least 1) and takes
  up to ``max_concurrency`` calls at once (concurrent searches; the database's lock orders them with writes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from animeai.online.errors import FeatureDBError, OnlineError
from animeai.online.feature_db import (
    _GEN_RE,
    CURRENT,
    MANIFEST,
    FeatureDB,
    SearchParams,
    _write_text,
    is_database,
    is_empty_location,
    normalize,
    publish_generation,
    read_current_manifest,
)

FORMAT = "animeai.feature_shards"
FORMAT_VERSION = 1
ROUTING = "modulo"
INLINE_BYTES = 100_000  # query batches smaller than this are sent inside each shard call, larger ones put once


class ShardError(OnlineError):
    """A shard actor died or failed; the message names the shard."""


def require_ray():
    """Import Ray or explain how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise OnlineError(f'the sharded feature database needs Ray: pip install -e ".[ray,online]" ({exc})') from None
    return ray


# ------------------------------------------------------------------------------------------ the shard actor


class FeatureShard:
    """One slice of the vectors in a :class:`FeatureDB` (run as a Ray actor; plain class for in-process tests)."""

    def __init__(self, shard: int, num_shards: int, dim: int, model_hash: str, kind: str,
                 params: dict[str, int] | None, threads: int, load_from: str | None = None,
                 keep_vectors: bool = True):
        from animeai.online.feature_db import require_faiss

        faiss = require_faiss()
        faiss.omp_set_num_threads(max(1, threads))
        self.shard, self.num_shards, self.threads = shard, num_shards, threads
        if load_from is not None:
            self.db = FeatureDB.load(load_from, expect_dim=dim, expect_model_hash=model_hash, device="cpu")
        else:
            self.db = FeatureDB(dim, model_hash, index_kind=kind, params=SearchParams(**(params or {})),
                                device="cpu", keep_vectors=keep_vectors)

    def info(self) -> dict[str, Any]:
        db = self.db
        return {"shard": self.shard, "pid": os.getpid(), "dim": db.dim, "model_hash": db.model_hash,
                "index_kind": db.index_kind, "index_spec": db.index_spec, "num_rows": db.num_rows,
                "num_vectors": db.num_vectors, "ntotal": db.ntotal, "roles": db.roles,
                "threads": self.threads, "keep_vectors": db.keep_vectors, "params": dataclasses.asdict(db.params)}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.db.search_vectors(queries, k)

    def add_role(self, name: str, embeddings: np.ndarray | None, prototype: np.ndarray | None,
                 metadata: dict[str, Any] | None) -> tuple[int, int]:
        first = self.db.num_rows
        return self.db.add_role(name, embeddings, prototype=prototype, metadata=metadata), first

    def add(self, role: int, embeddings: np.ndarray) -> int:
        first = self.db.num_rows
        self.db.add(role, embeddings)
        return first

    def remove_role(self, role: int) -> None:
        self.db.remove_role(role)

    def rebuild(self, kind: str | None) -> str:
        return self.db.rebuild(kind)

    def role_sums(self):
        return self.db.role_sums()

    def set_params(self, params: dict[str, int]) -> None:
        self.db.set_params(SearchParams(**params))

    def save(self, folder: str) -> dict[str, Any]:
        gen = self.db.save(folder)
        manifest = gen / MANIFEST
        return {"generation": gen.name, "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}


# ------------------------------------------------------------------------------------------ the driver side


def _shard_folder(i: int) -> str:
    return f"shard-{i:03d}"


class ShardedFeatureDB:
    """The feature database's API over ``num_shards`` Ray actors (see the module docstring)."""

    def __init__(self, actors: list, *, dim: int, model_hash: str, index_kind: str, params: SearchParams,
                 names: list[str] | None = None):
        self._ray = require_ray()
        self.actors = actors
        self.num_shards = len(actors)
        self.dim, self.model_hash, self.index_kind, self.params = dim, model_hash, index_kind, params
        self.names = names or [f"shard {i}" for i in range(len(actors))]
        self._write = threading.Lock()  # the driver is the one writer: one change at a time
        self._roles: list[dict[str, Any]] = []
        self._next_id = 0
        self._protos: np.ndarray | None = None  # combined prototypes, recomputed after a change

    # ---------------------------------------------------------------- start / stop

    @classmethod
    def start(cls, num_shards: int, dim: int, model_hash: str = "", *, kind: str = "auto",
              params: SearchParams | None = None, num_cpus: float = 1, threads: int | None = None,
              max_concurrency: int = 4, actor_options: dict[str, Any] | None = None, keep_vectors: bool = True,
              _load_from: list[str] | None = None) -> ShardedFeatureDB:
        """Start ``num_shards`` empty shard actors on the current Ray connection (a local Ray is started when none
        is connected) and return the driver-side database. ``num_cpus`` per actor (fractions allowed),
        ``threads`` FAISS threads per actor (default: ``num_cpus`` rounded down, at least 1); ``actor_options``
        are passed to Ray (e.g. ``{"scheduling_strategy": "SPREAD"}`` to place shards on different nodes);
        ``keep_vectors=False``: the shards keep no float32 copy of their vectors (see :class:`FeatureDB`)."""
        ray = require_ray()
        if not isinstance(num_shards, int) or num_shards < 1:
            raise OnlineError(f"number of shards must be a positive integer, got {num_shards!r}")
        if not isinstance(dim, int) or dim < 1:
            raise OnlineError(f"embedding dimension must be a positive integer, got {dim!r}")
        if not num_cpus > 0:
            raise OnlineError(f"CPUs per shard must be > 0, got {num_cpus!r}")
        if not ray.is_initialized():
            # RAY_ADDRESS names a cluster to join; otherwise a new local Ray (never someone's running one by accident)
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
        params = params or SearchParams()
        threads = threads if threads is not None else max(1, int(num_cpus))
        pdict = dataclasses.asdict(params)
        remote = ray.remote(FeatureShard).options(num_cpus=num_cpus, max_concurrency=max_concurrency,
                                                  **(actor_options or {}))
        actors = [remote.remote(i, num_shards, dim, model_hash, kind, pdict, threads,
                                _load_from[i] if _load_from else None, keep_vectors) for i in range(num_shards)]
        db = cls(actors, dim=dim, model_hash=model_hash, index_kind=kind, params=params)
        try:
            db._adopt(db._all([a.info.remote() for a in actors], "load" if _load_from else "start"))
        except BaseException:
            db.shutdown()  # no half-started database left holding CPUs
            raise
        return db

    def shutdown(self) -> None:
        """Kill the shard actors (their slices are lost unless saved)."""
        for a in self.actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - an actor that is already gone is fine here
                pass
        self.actors = []

    def __enter__(self) -> ShardedFeatureDB:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- remote calls

    def _all(self, refs: list, what: str) -> list:
        """``ray.get`` on every shard's reference at once; a failure is a :class:`ShardError` naming the shard."""
        ray = self._ray
        if not self.actors:
            raise ShardError(f"{what}: the sharded database was shut down")
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            pass
        problems = []
        for i, ref in enumerate(refs):  # find which shard(s) failed, and why
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                why = _last_error_line(str(exc))
                problems.append(f"shard {i} of {self.num_shards} died ({type(exc).__name__}{': ' + why if why else ''})"
                                "; its slice of the vectors is gone until the database is loaded again from its last "
                                "save")
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                problems.append(f"shard {i} of {self.num_shards} failed: {type(cause).__name__}: {cause}")
        raise ShardError(f"{what}: " + "; ".join(problems or ["a shard failed"]))

    def _adopt(self, infos: list[dict[str, Any]]) -> None:
        """Take roles and the next id from the shards, checking they agree (shard 0 is the reference)."""
        ref = infos[0]
        for i, info in enumerate(infos):
            if info["dim"] != self.dim:
                raise FeatureDBError(f"shard {i} holds {info['dim']}-d vectors, shard 0 {self.dim}-d")
            if info["model_hash"] != ref["model_hash"]:
                raise FeatureDBError(f"shard {i} was built by another model than shard 0 (model hash differs)")
            if info["roles"] != ref["roles"]:
                raise FeatureDBError(f"shard {i}'s role table differs from shard 0's ({len(info['roles'])} vs "
                                     f"{len(ref['roles'])} roles): the shards are out of step; load the last save")
        rows = [info["num_rows"] for info in infos]
        n = self.num_shards
        next_id = min(r * n + i for i, r in enumerate(rows))
        expect = [len(range(i, next_id, n)) for i in range(n)]
        if rows != expect:
            raise FeatureDBError(f"shard row counts {rows} do not fit modulo routing (expected {expect} for "
                                 f"{next_id} ids): the shards are out of step; load the last save")
        self.model_hash = ref["model_hash"]
        self.index_kind = ref["index_kind"]
        self._roles = [dict(r) for r in ref["roles"]]
        self._next_id = next_id
        self._protos = None

    # ---------------------------------------------------------------- read-only views

    @property
    def num_roles(self) -> int:
        return len(self._roles)

    @property
    def num_rows(self) -> int:
        """Vector ids handed out so far (the next id)."""
        return self._next_id

    def role_names(self) -> list[str]:
        return [r["name"] for r in self._roles]

    @property
    def roles(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._roles]

    def shard_info(self) -> list[dict[str, Any]]:
        """Per shard: row and vector counts, index kind, FAISS threads, process id."""
        infos = self._all([a.info.remote() for a in self.actors], "shard info")
        return [{k: v for k, v in info.items() if k != "roles"} for info in infos]

    @property
    def num_vectors(self) -> int:
        return sum(i["num_vectors"] for i in self.shard_info())

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The shard each global vector id lives on."""
        return np.asarray(ids, np.int64) % self.num_shards

    # ---------------------------------------------------------------- search

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise OnlineError(f"queries of shape {tuple(q.shape)} do not fit this database (dimension {self.dim})")
        return normalize(q)[0]

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, global vector ids, roles)`` of the ``k`` nearest exemplars of each query over all shards."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise OnlineError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        q = self._queries(queries)
        # a large batch goes into the object store once and every shard reads it from there; a small one (below
        # Ray's 100 KB inline limit for arguments) travels inside each call, which is cheaper than a put
        arg = self._ray.put(q) if q.nbytes >= INLINE_BYTES and self.num_shards > 1 else q
        parts = self._all([a.search.remote(arg, k) for a in self.actors], "search")
        return merge_topk(parts, k, self.num_shards)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, roles)``, as :meth:`FeatureDB.search`."""
        scores, _, roles = self.search_vectors(queries, k)
        return scores, roles

    def prototypes(self) -> np.ndarray:
        """Each role's prototype over all shards: the normalised sum of its exemplars, or its given prototype."""
        if self._protos is None:
            parts = self._all([a.role_sums.remote() for a in self.actors], "prototypes")
            sums = sum(p[0] for p in parts)
            counts = sum(p[1] for p in parts)
            protos = parts[0][3].copy()
            has = counts > 0
            if has.any():
                s = sums[has]
                protos[has] = (s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)).astype(np.float32)
            self._protos = protos
        return self._protos.copy()

    def prototype_scores(self, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of each query with each role's prototype, ``(n, num_roles)``."""
        return self._queries(queries) @ self.prototypes().T

    # ---------------------------------------------------------------- changes (the driver is the one writer)

    def _route(self, first: int, count: int) -> list[np.ndarray]:
        """Positions (0..count-1) of new ids ``first ..`` going to each shard."""
        ids = np.arange(first, first + count, dtype=np.int64)
        return [np.nonzero(ids % self.num_shards == s)[0] for s in range(self.num_shards)]

    def _check_rows(self, firsts: list[int], first_id: int, what: str) -> None:
        n = self.num_shards
        expect = [-(-(first_id - s) // n) for s in range(n)]  # rows of shard s before id first_id
        if list(firsts) != expect:
            raise ShardError(f"{what}: the shards' row counts {list(firsts)} are not the expected {expect}: the "
                             "shards are out of step; load the last save")

    def _embeddings(self, embeddings: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise OnlineError(f"{what}: embeddings of shape {tuple(x.shape)} do not fit this database "
                              f"(dimension {self.dim})")
        if len(x) == 0:
            raise OnlineError(f"{what}: no embeddings")
        normed, _ = normalize(x)  # NaN / zero rows are refused here, before any shard changes
        return np.ascontiguousarray(x, np.float32), normed

    def add_role(self, name: str, embeddings: np.ndarray | None = None, *, prototype: np.ndarray | None = None,
                 metadata: dict[str, Any] | None = None) -> int:
        """A new role on every shard, its exemplars routed by id; returns the role id (as :meth:`FeatureDB.add_role`).
        A shard that gets none of the exemplars holds the role with the exemplars' mean (or ``prototype``) as a
        stand-in prototype; :meth:`prototypes` combines the real ones."""
        with self._write:
            if not isinstance(name, str) or not name:
                raise OnlineError(f"role name must be a non-empty string, got {name!r}")
            if name in self.role_names():
                raise OnlineError(f"role {name!r} already exists (id {self.role_names().index(name)})")
            if embeddings is None and prototype is None:
                raise OnlineError(f"role {name!r}: give exemplar embeddings or a prototype")
            proto = None
            if prototype is not None:
                proto = self._queries(np.asarray(prototype, np.float32).reshape(1, -1))[0]
            raw = normed = None
            routes: list[np.ndarray] = [np.zeros(0, np.int64)] * self.num_shards
            if embeddings is not None:
                raw, normed = self._embeddings(embeddings, f"role {name!r}")
                routes = self._route(self._next_id, len(raw))
                if proto is None:
                    s = normed.sum(axis=0)
                    proto = (s / max(float(np.linalg.norm(s)), 1e-12)).astype(np.float32)
            refs = []
            for a, rows in zip(self.actors, routes):
                part = raw[rows] if raw is not None and len(rows) else None
                refs.append(a.add_role.remote(name, part, None if part is not None and prototype is None else proto,
                                              metadata))
            out = self._all(refs, f"add role {name!r}")
            role = len(self._roles)
            if any(r != role for r, _ in out):
                raise ShardError(f"add role {name!r}: the shards gave role ids {[r for r, _ in out]}, expected {role}")
            self._check_rows([f for _, f in out], self._next_id, f"add role {name!r}")
            entry = {"name": name, **(metadata or {})}
            entry["name"] = name
            self._roles.append(entry)
            self._next_id += 0 if raw is None else len(raw)
            self._protos = None
            return role

    def add(self, role: int, embeddings: np.ndarray) -> np.ndarray:
        """Add raw ``embeddings`` as exemplars of ``role``, each to the shard its id routes to; returns the ids."""
        with self._write:
            if not isinstance(role, (int, np.integer)) or not 0 <= role < len(self._roles):
                raise OnlineError(f"unknown role id {role} (the database has {len(self._roles)} roles)")
            raw, _ = self._embeddings(embeddings, f"role {role}")
            first = self._next_id
            routes = self._route(first, len(raw))
            refs, used = [], []
            for s, (a, rows) in enumerate(zip(self.actors, routes)):
                if len(rows):
                    refs.append(a.add.remote(int(role), raw[rows]))
                    used.append(s)
            firsts = self._all(refs, f"add to role {role}")
            n = self.num_shards
            for s, f in zip(used, firsts):
                if f != -(-(first - s) // n):
                    raise ShardError(f"add to role {role}: shard {s} holds {f} rows, expected {-(-(first - s) // n)}:"
                                     " the shards are out of step; load the last save")
            self._next_id += len(raw)
            self._protos = None
            return np.arange(first, first + len(raw), dtype=np.int64)

    def remove_role(self, role: int) -> None:
        """Remove a role and its vectors on every shard; later roles move down by one id."""
        with self._write:
            if not isinstance(role, (int, np.integer)) or not 0 <= role < len(self._roles):
                raise OnlineError(f"unknown role id {role} (the database has {len(self._roles)} roles)")
            self._all([a.remove_role.remote(int(role)) for a in self.actors], f"remove role {role}")
            del self._roles[role]
            self._protos = None

    def rebuild(self, kind: str | None = None) -> list[str]:
        """Rebuild every shard's index (as :meth:`FeatureDB.rebuild`, each on its own slice); the factory strings."""
        with self._write:
            specs = self._all([a.rebuild.remote(kind) for a in self.actors], "rebuild")
            if kind is not None:
                self.index_kind = kind
            return specs

    def set_params(self, params: SearchParams) -> None:
        """Search-time knobs (nprobe, efSearch, re-ranking k_factor, fine_factor) on every shard."""
        self._all([a.set_params.remote(dataclasses.asdict(params)) for a in self.actors], "set search parameters")
        self.params = params

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """Write a new generation (one folder per shard, written by its actor, plus a manifest) and switch
        ``CURRENT`` to it atomically; returns the generation folder."""
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise FeatureDBError(f"{root}: not a folder")
        if root.exists() and not is_database(root) and not is_empty_location(root):
            raise FeatureDBError(f"{root}: the folder holds other files and no sharded feature database "
                                 f"({CURRENT} is missing); choose an empty or new folder")
        root.mkdir(parents=True, exist_ok=True)
        with self._write:
            gens = sorted(int(m.group(1)) for p in root.iterdir() if (m := _GEN_RE.match(p.name)))
            gen = (gens[-1] + 1) if gens else 1
            tmp = root / f".tmp-gen-{gen:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                folders = [str((tmp / _shard_folder(i)).resolve()) for i in range(self.num_shards)]
                saved = self._all([a.save.remote(f) for a, f in zip(self.actors, folders)], f"save to {root}")
                from animeai import __version__

                n = self.num_shards
                manifest = {
                    "format": FORMAT, "format_version": FORMAT_VERSION, "num_shards": n, "routing": ROUTING,
                    "dim": self.dim, "model_hash": self.model_hash, "index_kind": self.index_kind,
                    "num_roles": len(self._roles), "next_id": self._next_id,
                    "shards": [{"folder": _shard_folder(i), "generation": s["generation"],
                                "num_rows": len(range(i, self._next_id, n)), "manifest_sha256": s["manifest_sha256"]}
                               for i, s in enumerate(saved)],
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "library_version": __version__,
                }
                _write_text(tmp / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
                final = publish_generation(root, tmp, gen)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            keep = {final.name, f"gen-{gens[-1]:08d}" if gens else ""}
            for p in root.iterdir():  # generations older than the previous one, leftovers of killed saves
                if (_GEN_RE.match(p.name) and p.name not in keep) or p.name.startswith(".tmp-gen-"):
                    shutil.rmtree(p, ignore_errors=True)
            return final

    @staticmethod
    def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
        """The live generation folder of a saved sharded database and its checked manifest."""
        root = Path(path)
        folder, mpath, m = read_current_manifest(root, "sharded feature database")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            hint = " (a one-process database: open it with FeatureDB.load, or split it with from_feature_db)" \
                if isinstance(m, dict) and m.get("format") == "animeai.feature_db" else ""
            raise FeatureDBError(f"{mpath}: not a sharded feature database manifest{hint}")
        if m.get("format_version") != FORMAT_VERSION:
            raise FeatureDBError(f"{mpath}: sharded database format version {m.get('format_version')!r} is not "
                                 f"supported (this animeai reads version {FORMAT_VERSION})")
        for key, typ in (("num_shards", int), ("dim", int), ("model_hash", str), ("index_kind", str),
                         ("next_id", int), ("shards", list)):
            if not isinstance(m.get(key), typ):
                raise FeatureDBError(f"{mpath}: damaged manifest: field {key!r} is missing or not a {typ.__name__}")
        if m.get("routing") != ROUTING or len(m["shards"]) != m["num_shards"] or m["num_shards"] < 1:
            raise FeatureDBError(f"{mpath}: damaged manifest: routing or shard list")
        for i, s in enumerate(m["shards"]):
            if not isinstance(s, dict) or s.get("folder") != _shard_folder(i):
                raise FeatureDBError(f"{mpath}: damaged manifest: shard {i}'s entry")
            sub = folder / s["folder"]
            try:
                current = (sub / CURRENT).read_text(encoding="utf-8").strip()
            except OSError:
                raise FeatureDBError(f"{sub}: shard {i}'s database is missing") from None
            if current != s.get("generation"):
                raise FeatureDBError(f"{sub}: shard {i} holds {current!r}, the manifest says {s.get('generation')!r}")
            smf = sub / current / MANIFEST
            try:
                digest = hashlib.sha256(smf.read_bytes()).hexdigest()
            except OSError:
                raise FeatureDBError(f"{smf}: shard {i}'s manifest is missing") from None
            if digest != s.get("manifest_sha256"):
                raise FeatureDBError(f"{smf}: shard {i}'s manifest differs from the one saved (SHA-256)")
        return folder, m

    @classmethod
    def load(cls, path: str | Path, *, expect_dim: int | None = None, expect_model_hash: str | None = None,
             num_cpus: float = 1, threads: int | None = None, max_concurrency: int = 4,
             actor_options: dict[str, Any] | None = None) -> ShardedFeatureDB:
        """Start one actor per saved shard, each loading its own slice (checked like :meth:`FeatureDB.load`), and
        check that they fit together (dimension, model hash, role tables, row counts)."""
        folder, m = cls.read_manifest(path)
        mpath = folder / MANIFEST
        if expect_dim is not None and m["dim"] != expect_dim:
            raise FeatureDBError(f"{mpath}: the database holds {m['dim']}-d embeddings, expected {expect_dim}-d")
        if expect_model_hash is not None and m["model_hash"] != expect_model_hash:
            raise FeatureDBError(f"{mpath}: built by another model (model hash differs)")
        subs = [str((folder / s["folder"]).resolve()) for s in m["shards"]]
        db = cls.start(m["num_shards"], m["dim"], m["model_hash"], kind=m["index_kind"], num_cpus=num_cpus,
                       threads=threads, max_concurrency=max_concurrency, actor_options=actor_options,
                       _load_from=subs)
        if db._next_id != m["next_id"] or db.num_roles != m.get("num_roles", db.num_roles):
            db.shutdown()
            raise FeatureDBError(f"{mpath}: the shards hold {db._next_id} ids and {db.num_roles} roles, the manifest "
                                 f"says {m['next_id']} and {m.get('num_roles')}")
        db.generation = folder
        return db

    # ---------------------------------------------------------------- from / to one database

    @classmethod
    def from_feature_db(cls, source: FeatureDB, num_shards: int, *, kind: str | None = None,
                        chunk: int = 100_000, **start_options) -> ShardedFeatureDB:
        """A sharded copy of a one-process database: same roles (names, metadata, prototypes) and live vectors,
        the vectors renumbered ``0..`` in their order; ``kind`` defaults to the source's."""
        db = cls.start(num_shards, source.dim, source.model_hash, kind=kind or source.index_kind,
                       params=source.params, **start_options)
        try:
            sums, counts, fixed, protos = source.role_sums()
            for role, entry in enumerate(source.roles):
                vecs, norms = source.vectors_of(role)
                meta = {k: v for k, v in entry.items() if k != "name"}
                raw = vecs * norms[:, None]
                if len(raw):
                    db.add_role(entry["name"], raw[:chunk], prototype=protos[role] if fixed[role] else None,
                                metadata=meta)
                    for s in range(chunk, len(raw), chunk):
                        db.add(role, raw[s: s + chunk])
                else:
                    db.add_role(entry["name"], prototype=protos[role], metadata=meta)
        except BaseException:
            db.shutdown()
            raise
        return db


def _last_error_line(text: str) -> str:
    """The exception line of a Ray error's text (e.g. why a shard's constructor failed), if there is one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error:" in ln or "Error(" in ln:
            return ln[:300]
    return ""


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int,
               num_shards: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-shard ``(scores, local ids, roles)`` into the global top ``k``; local row ``j`` of shard ``s`` is
    global id ``j * num_shards + s``. Missing results (id ``-1``) stay last."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([np.where(p[1] >= 0, p[1] * num_shards + s, -1) for s, p in enumerate(parts)], axis=1)
    roles = np.concatenate([p[2] for p in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    take = np.take_along_axis
    return take(scores, order, 1), take(ids, order, 1), take(roles, order, 1)
