"""Feature-database index kinds at scale: build time, memory, QPS (batched queries), recall@10 vs exact search.

Clustered synthetic vectors (``--clusters`` Gaussian clusters on the unit sphere, L2-normalised like role
embeddings), generated and added in chunks so that 10M x 512 never exists as one float32 array. Ground truth is
exact inner-product search (``Flat``); every other kind is built through ``animeai.online.feature_db`` (the same
factory strings, id wrappers and search parameters the database uses).

    python tests/benchmarks/bench_feature_db.py                          # 100k x 512, every kind
    python tests/benchmarks/bench_feature_db.py --n 1000000              # the issue's 1M run
    python tests/benchmarks/bench_feature_db.py --n 10000000 --kinds ivfpq --queries 1000 --index-dir runs/fdb10m

``--index-dir`` keeps each built index (``<kind>.faiss`` + ``<kind>.json`` with its build time and memory): a
later run with the same ``--n/--dim/--seed`` loads it instead of building, so a long build can run while the
machine is busy and the searches be timed later on a quiet one.

For the re-ranking kinds (``...,Refine(SQ8)``) the column ``candidates_recall@10`` is the recall of the first
stage's ``10 * k_factor`` candidates alone (measured after the timing, through the base index): the most an exact
re-ranking could reach. The gap between it and ``recall@10`` is what the 8-bit re-ranking code loses.

Through the database (``--through-db``) the re-ranking kinds end with the database's last, finer re-scoring of
``fine_factor * 10`` results from the 8-bit code plus ``--fine-bits`` residual bits per dimension;
``--fine-factors 1 2`` measures without it (1) and with it (2) side by side on the same database.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (``VmRSS``) or at its peak so far (``VmHWM``), in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Restart this process's peak-memory count (``VmHWM``) from its current size (Linux: ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def make_chunk(centers: np.ndarray, start: int, count: int, seed: int, noise: float | np.ndarray,
               labels: bool = False):
    """Vectors ``start .. start+count`` (deterministic per chunk), normalised (and their clusters, with
    ``labels``). ``noise``: the per-dimension standard deviation of isotropic noise around the centre, or a
    ``(dim, dim)`` matrix ``M`` (noise = ``g @ M``)."""
    rng = np.random.default_rng([seed, start])
    which = rng.integers(0, len(centers), count)
    g = rng.standard_normal((count, centers.shape[1]), dtype=np.float32)
    x = centers[which] + (g @ noise if isinstance(noise, np.ndarray) else g * noise)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x.astype(np.float32), which) if labels else x.astype(np.float32)


def noise_model(dim: int, noise: float, decay: float, seed: int) -> float | np.ndarray:
    """Within-cluster noise of total variance ``noise**2 * dim``: isotropic when ``decay`` is 0, else with a
    power-law spectrum (variance of the i-th direction ~ i**-decay) along random orthonormal directions. Real role
    embeddings are of the second kind: the holo20 detector's features have a within-class spectrum falling as
    i**-0.8 to i**-1.2, half the variance in ~40 of 1280 directions, within-class cosine ~0.8 (README)."""
    if decay == 0:
        return noise
    var = np.arange(1, dim + 1, dtype=np.float64) ** -decay
    var *= noise ** 2 * dim / var.sum()
    basis = np.linalg.qr(np.random.default_rng([seed, 7]).standard_normal((dim, dim)))[0]
    return (np.sqrt(var)[:, None] * basis.T).astype(np.float32)


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(size, n - start)


def exact_topk(centers, args, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by chunked brute force (never more than one chunk of the base in memory)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for start, count in chunks(args.n, args.chunk):
        x = make_chunk(centers, start, count, args.seed, args.noise_model)
        s = queries @ x.T
        part = np.argpartition(-s, min(k, count - 1), axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        all_s = np.concatenate([best_s, ps], 1)
        all_i = np.concatenate([best_i, part + start], 1)
        order = np.argsort(-all_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return best_i


def saved_key(args, spec: str, **extra) -> dict:
    """What a kept index (``--index-dir``) must have been built from to be reused: the data and the factory."""
    return {"n": args.n, "dim": args.dim, "seed": args.seed, "clusters": args.clusters, "noise": args.noise,
            "decay": args.decay, "factory": spec, **extra}


def saved_info(saved: Path, meta: Path, key: dict) -> dict:
    """The build record beside a kept index; refuses one built from other data or as another kind."""
    info = json.loads(meta.read_text())
    if info["key"] != key:
        raise SystemExit(f"{saved} was built for {info['key']}, not {key}: remove it or use another --index-dir")
    return info


def build(kind: str, centers, args, faiss):
    from animeai.online.feature_db import choose_index, new_index, train_index

    spec = choose_index(args.n, args.dim, kind)
    saved = args.index_dir / f"{kind}.faiss" if args.index_dir else None
    key = saved_key(args, spec)
    if saved is not None and saved.exists():
        info = saved_info(saved, saved.with_suffix(".json"), key)
        rss0 = rss_mb()
        index = faiss.read_index(str(saved))
        print(f"{kind}: loaded {saved} (built in {info['build_s']:.0f} s)", flush=True)
        return spec, index, info["build_s"], info["train_s"], rss_mb() - rss0
    rss0 = rss_mb()
    t0 = time.perf_counter()
    index = new_index(spec, args.dim, faiss)
    if not index.is_trained:
        # a sample is enough to train: FAISS itself caps k-means at 256 points per centroid
        ntrain = min(args.n, args.train_size)
        train = make_chunk(centers, 0, ntrain, args.seed + 1, args.noise_model)
        train_index(index, train, faiss)
        del train
    t_train = time.perf_counter() - t0
    print(f"{kind} ({spec}): trained in {t_train:.0f} s", flush=True)
    for start, count in chunks(args.n, args.chunk):
        index.add_with_ids(make_chunk(centers, start, count, args.seed, args.noise_model),
                           np.arange(start, start + count, dtype=np.int64))
        done = start + count
        if done % (args.chunk * 10) == 0 or done == args.n:
            el = time.perf_counter() - t0 - t_train
            print(f"  added {done:,}/{args.n:,} ({done / el:,.0f} vectors/s, {rss_mb() - rss0:,.0f} MB)", flush=True)
    build_s = time.perf_counter() - t0
    mem = rss_mb() - rss0
    if saved is not None:
        args.index_dir.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(saved))
        saved.with_suffix(".json").write_text(json.dumps({"key": key, "build_s": build_s, "train_s": t_train,
                                                          "memory_mb": mem}))
    return spec, index, build_s, t_train, mem


class DBIndex:
    """A :class:`FeatureDB` seen as an index: ``search`` answers with the generator's vector numbers."""

    def __init__(self, db, gen_index: np.ndarray):
        self.db, self.gen_index = db, gen_index

    def search(self, queries: np.ndarray, k: int):
        scores, ids, _ = self.db.search_vectors(queries, k)
        return scores, np.where(ids >= 0, self.gen_index[np.clip(ids, 0, None)], -1)


def build_db(kind: str, centers, args, faiss):
    """The product path: a ``FeatureDB(keep_vectors=False)`` prepared on a training sample, then bulk-loaded with
    one role per cluster (the vectors of each chunk added role by role, as enrolment does)."""
    from animeai.online.feature_db import FeatureDB, choose_index, is_database

    saved = args.index_dir / f"{kind}-featuredb" if args.index_dir else None
    extra = {"fine_bits": args.fine_bits} if args.fine_bits else {}  # (databases kept before residual codes: 0)
    key = saved_key(args, choose_index(args.n, args.dim, kind), through_db=True, **extra)
    if saved is not None and is_database(saved):
        info = saved_info(saved, saved.parent / f"{saved.name}.json", key)
        rss0 = rss_mb()
        t0 = time.perf_counter()
        db = FeatureDB.load(saved, device="cpu")
        print(f"{kind}: loaded {saved} in {time.perf_counter() - t0:.0f} s (SHA-256 checked; built in "
              f"{info['build_s']:.0f} s, saved in {info['save_s']:.0f} s)", flush=True)
        gen_index = np.load(saved.parent / f"{saved.name}.gen_index.npy", allow_pickle=False)
        return db.index_spec, DBIndex(db, gen_index), info["build_s"], info["train_s"], rss_mb() - rss0
    rss0 = rss_mb()
    t0 = time.perf_counter()
    db = FeatureDB(args.dim, "bench", index_kind=kind, keep_vectors=False, device="cpu", fine_bits=args.fine_bits)
    train = make_chunk(centers, 0, min(args.n, args.train_size), args.seed + 1, args.noise_model)
    spec = db.prepare(train, args.n)
    del train
    t_train = time.perf_counter() - t0
    print(f"{kind} ({spec}) through FeatureDB(keep_vectors=False): prepared in {t_train:.0f} s", flush=True)
    for c in range(len(centers)):
        db.add_role(f"cluster {c}", prototype=centers[c])
    gen_index = np.empty(args.n, np.int64)
    for start, count in chunks(args.n, args.chunk):
        x, which = make_chunk(centers, start, count, args.seed, args.noise_model, labels=True)
        order = np.argsort(which, kind="stable")
        roles, first = np.unique(which[order], return_index=True)
        for role, rows in zip(roles, np.split(order, first[1:])):
            ids = db.add(int(role), x[rows])
            gen_index[ids] = start + rows
        done = start + count
        if done % (args.chunk * 10) == 0 or done == args.n:
            el = time.perf_counter() - t0 - t_train
            print(f"  added {done:,}/{args.n:,} ({done / el:,.0f} vectors/s, {rss_mb() - rss0:,.0f} MB)", flush=True)
    build_s, mem = time.perf_counter() - t0, rss_mb() - rss0
    if saved is not None:
        t1 = time.perf_counter()
        db.save(saved)
        save_s = time.perf_counter() - t1
        print(f"  saved {saved} in {save_s:.0f} s", flush=True)
        np.save(saved.parent / f"{saved.name}.gen_index.npy", gen_index)
        (saved.parent / f"{saved.name}.json").write_text(json.dumps({"key": key, "build_s": build_s,
                                                                     "train_s": t_train, "save_s": save_s}))
    return spec, DBIndex(db, gen_index), build_s, t_train, mem


# search-time settings tried on each built index (cheap: no rebuild)
_RERANK = [{"nprobe": p, "k_factor": f} for p in (16, 64) for f in (16, 32, 64, 128)]
SWEEP = {
    "ivf": [{"nprobe": 8}, {"nprobe": 32}, {"nprobe": 128}],
    "hnsw": [{"ef_search": 32}, {"ef_search": 128}, {"ef_search": 512}],
    "ivfpq": _RERANK,
    "opq": _RERANK,
}


def set_params(index, setting: dict, faiss) -> None:
    """Apply one sweep setting through the database's own knob setter (nprobe, efSearch, k_factor; the HNSW
    coarse quantizer of large IVF kinds gets efSearch = 2 * nprobe, at least 64)."""
    from animeai.online.feature_db import SearchParams, apply_search_params

    nprobe = setting.get("nprobe", 32)
    params = SearchParams(nprobe=nprobe, ef_search=setting.get("ef_search", max(64, 2 * nprobe)),
                          k_factor=setting.get("k_factor", SearchParams.k_factor),
                          fine_factor=setting.get("fine_factor", SearchParams.fine_factor))
    if isinstance(index, DBIndex):
        index.db.set_params(params)
    else:
        apply_search_params(index, params, faiss)


def first_stage(index, faiss):
    """``(base index, its row -> generator vector number)`` of a re-ranking index (``IndexRefine``, inside the id
    map the database or :func:`new_index` wraps it in), or ``None``: what the candidates' recall is measured on."""
    gen = None
    if isinstance(index, DBIndex):
        gen, index = index.gen_index, index.db._index
    node = faiss.downcast_index(index)
    if not isinstance(node, faiss.IndexIDMap2):
        return None
    ids = faiss.vector_to_array(node.id_map)
    refine = faiss.downcast_index(node.index)
    if not isinstance(refine, faiss.IndexRefine):
        return None
    return faiss.downcast_index(refine.base_index), (ids if gen is None else gen[ids])


def candidate_recall(stage, queries: np.ndarray, truth: np.ndarray, k: int, k_factor: int, batch: int) -> float:
    """Recall@k of the first stage's ``k * k_factor`` candidates: the share of the exact top k among them, the
    most an exact re-ranking could reach. Below it, the final recall is lost to the re-ranking code."""
    base, to_gen = stage
    found = np.concatenate([base.search(queries[s: s + batch], k * k_factor)[1]
                            for s in range(0, len(queries), batch)])
    hit = to_gen[np.clip(found, 0, None)]
    hit[found < 0] = -1
    return recall(hit, truth)


def measure(index, queries: np.ndarray, k: int, batch: int) -> tuple[float, np.ndarray]:
    index.search(queries[:batch], k)  # warm-up
    ids = np.empty((len(queries), k), np.int64)
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        ids[s: s + batch] = index.search(queries[s: s + batch], k)[1]
    return len(queries) / (time.perf_counter() - t0), ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """The mean share of each query's exact top k (``truth``) among the ids it found (any number of columns)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="base vectors (default: 100000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--batch", type=int, default=500, help="queries per search call (default: 500)")
    p.add_argument("--clusters", type=int, default=2000, help="Gaussian clusters (characters) (default: 2000)")
    p.add_argument("--noise", type=float, default=0.04,
                   help="per-dimension noise around a cluster centre (RMS; default 0.04: within-cluster cosine ~0.55)")
    p.add_argument("--decay", type=float, default=0.0,
                   help="within-cluster spectrum: 0 = isotropic noise (default; the hardest case for compressed "
                   "codes), 1 = power law like real role embeddings (use with --noise 0.022 for their "
                   "within-class cosine ~0.8)")
    p.add_argument("--kinds", default="flat,ivf,hnsw,ivfpq,opq", help="comma list of feature_db kinds, or FAISS "
                   "factory strings (they contain commas) separated by ';', or one factory string (default: "
                   "flat,ivf,hnsw,ivfpq,opq)")
    p.add_argument("--train-size", type=int, default=200_000, help="training sample for IVF/PQ kinds")
    p.add_argument("--chunk", type=int, default=100_000, help="vectors generated/added at a time")
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: FAISS default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nprobes", type=int, nargs="+", default=None,
                   help="ivfpq/opq (or a Refine factory string): the nprobe values swept (default: 16 64)")
    p.add_argument("--k-factors", type=int, nargs="+", default=None,
                   help="ivfpq/opq: the re-ranking k_factor values swept (default: 16 32 64 128)")
    p.add_argument("--fine-bits", type=int, default=None,
                   help="with --through-db: residual bits per dimension for the last re-ranking (default: the "
                        "database's, FINE_BITS; 0: none)")
    p.add_argument("--fine-factors", type=int, nargs="+", default=None,
                   help="with --through-db, re-ranking kinds: the fine_factor values swept (default: the database's "
                        "default; 1: no last re-scoring)")
    p.add_argument("--through-db", action="store_true",
                   help="build and search through animeai's FeatureDB (keep_vectors=False, prepare() then one role "
                   "per cluster) instead of the bare FAISS index: the product's memory and QPS")
    p.add_argument("--index-dir", type=Path, default=None,
                   help="keep built indexes here and reuse them on the next run (see above)")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_feature_db.json"))
    args = p.parse_args(argv)

    from animeai.online.feature_db import FINE_BITS, SearchParams, require_faiss

    if args.fine_bits is None:
        args.fine_bits = FINE_BITS

    faiss = require_faiss()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    args.noise_model = noise_model(args.dim, args.noise, args.decay, args.seed)
    queries = make_chunk(centers, 10 ** 12, args.queries, args.seed + 2, args.noise_model)
    t0 = time.perf_counter()
    cached = None
    if args.index_dir:  # the exact answers take minutes at 10M: kept with the indexes
        tag = f"truth-n{args.n}-d{args.dim}-s{args.seed}-c{args.clusters}-x{args.noise}-y{args.decay}-q{args.queries}"
        cached = args.index_dir / f"{tag}.npy"
    if cached is not None and cached.exists():
        truth = np.load(cached, allow_pickle=False)
        print(f"exact ground truth: {cached}", flush=True)
    else:
        truth = exact_topk(centers, args, queries, 10)
        print(f"exact ground truth for {args.queries} queries over {args.n:,} x {args.dim}: "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        if cached is not None:
            args.index_dir.mkdir(parents=True, exist_ok=True)
            np.save(cached, truth)

    rows = []
    named = {"auto", "flat", "ivf", "hnsw", "ivfpq", "opq"}
    if ";" in args.kinds:
        kinds = [k for k in args.kinds.split(";") if k.strip()]
    else:  # names by commas; anything else is one factory string (its commas are its own)
        kinds = args.kinds.split(",") if set(args.kinds.split(",")) <= named else [args.kinds]
    for kind in kinds:
        reset_peak_rss()  # the peak below is this kind's build (or load) and searches, not the exact search above
        spec, index, build_s, train_s, mem = (build_db if args.through_db else build)(kind, centers, args, faiss)
        sweep = SWEEP.get(kind, [{}])
        if (kind in ("ivfpq", "opq") or "Refine" in kind) and (args.nprobes or args.k_factors):
            sweep = [{"nprobe": p, "k_factor": f} for p in (args.nprobes or [16, 64])
                     for f in (args.k_factors or [16, 32, 64, 128])]
        if args.through_db and "k_factor" in sweep[0]:
            sweep = [{**s, "fine_factor": ff} for s in sweep
                     for ff in (args.fine_factors or [SearchParams.fine_factor])]
        stage = first_stage(index, faiss)
        for setting in sweep:
            if setting:
                set_params(index, setting, faiss)
            qps, ids = measure(index, queries, 10, args.batch)
            cand = ("" if stage is None or "k_factor" not in setting
                    else f"{candidate_recall(stage, queries, truth, 10, setting['k_factor'], args.batch):.4f}")
            search = " ".join(f"{k}={v}" for k, v in setting.items()) or "-"
            row = {"kind": kind + (" (FeatureDB)" if args.through_db else ""), "factory": spec, "search": search,
                   "n": args.n, "build_s": round(build_s, 1), "train_s": round(train_s, 1), "memory_mb": round(mem),
                   "peak_rss_mb": round(rss_mb("VmHWM")), "qps": round(qps),
                   "recall@10": f"{recall(ids, truth):.4f}", "candidates_recall@10": cand}
            rows.append(row)
            print(row, flush=True)
        del index
    cols = ["kind", "factory", "search", "n", "build_s", "train_s", "memory_mb", "peak_rss_mb", "qps", "recall@10",
            "candidates_recall@10"]
    print_table(cols, [[r[c] for c in cols] for r in rows], title=f"feature_db index kinds, {args.n:,} x {args.dim}")
    write_json(args.out, "feature_db", {k: str(v) for k, v in vars(args).items() if k != "noise_model"}, {"rows": rows},
               machine_info("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
