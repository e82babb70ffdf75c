"""Feature-database index kinds at scale: build time, memory, QPS (batched queries), recall@10 vs exact search.

Clustered synthetic vectors (``--clusters`` Gaussian clusters on the unit sphere, L2-normalised like role
embeddings), generated and added in chunks so that 10M x 512 never exists as one float32 array. Ground truth is
exact inner-product search (``Flat``); every other kind is built through ``animeai.online.feature_db`` (the same
factory strings, id wrappers and search parameters the database uses).

    python tests/benchmarks/bench_feature_db.py                          # 100k x 512, every kind
    python tests/benchmarks/bench_feature_db.py --n 1000000              # the issue's 1M run
    python tests/benchmarks/bench_feature_db.py --n 10000000 --kinds opq --no-exact   # compressed at 10M
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_chunk(centers: np.ndarray, start: int, count: int, seed: int, noise: float) -> np.ndarray:
    """Vectors ``start .. start+count`` (deterministic per chunk), normalised."""
    rng = np.random.default_rng([seed, start])
    which = rng.integers(0, len(centers), count)
    x = centers[which] + rng.standard_normal((count, centers.shape[1]), dtype=np.float32) * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(size, n - start)


def exact_topk(centers, args, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by chunked brute force (never more than one chunk of the base in memory)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for start, count in chunks(args.n, args.chunk):
        x = make_chunk(centers, start, count, args.seed, args.noise)
        s = queries @ x.T
        part = np.argpartition(-s, min(k, count - 1), axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        all_s = np.concatenate([best_s, ps], 1)
        all_i = np.concatenate([best_i, part + start], 1)
        order = np.argsort(-all_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return best_i


def build(kind: str, centers, args, faiss):
    from animeai.online.feature_db import SearchParams, apply_search_params, choose_index, new_index

    spec = choose_index(args.n, args.dim, kind)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    index = new_index(spec, args.dim, faiss)
    if not index.is_trained:
        # a sample is enough to train: FAISS itself caps k-means at 256 points per centroid
        ntrain = min(args.n, args.train_size)
        train = make_chunk(centers, 0, ntrain, args.seed + 1, args.noise)
        index.train(train)
        del train
    t_train = time.perf_counter() - t0
    for start, count in chunks(args.n, args.chunk):
        index.add_with_ids(make_chunk(centers, start, count, args.seed, args.noise),
                           np.arange(start, start + count, dtype=np.int64))
    build_s = time.perf_counter() - t0
    apply_search_params(index, SearchParams(nprobe=args.nprobe, ef_search=args.ef_search, k_factor=args.k_factor),
                        faiss)
    return spec, index, build_s, t_train, rss_mb() - rss0


# search-time settings tried on each built index (cheap: no rebuild)
SWEEP = {
    "ivf": [("nprobe", 8), ("nprobe", 32), ("nprobe", 128)],
    "hnsw": [("efSearch", 32), ("efSearch", 128), ("efSearch", 512)],
    "ivfpq": [("k_factor", 4), ("k_factor", 16), ("k_factor", 64)],
    "opq": [("k_factor", 4), ("k_factor", 16), ("k_factor", 64)],
}


def set_param(index, name: str, value: int, faiss) -> None:
    from animeai.online.feature_db import SearchParams, apply_search_params

    if name == "k_factor":  # keep nprobe; raise the re-ranking candidates
        apply_search_params(index, SearchParams(nprobe=64, k_factor=value), faiss)
    else:
        faiss.ParameterSpace().set_index_parameter(index, name, value)


def measure(index, queries: np.ndarray, k: int, batch: int) -> tuple[float, np.ndarray]:
    index.search(queries[:batch], k)  # warm-up
    ids = np.empty((len(queries), k), np.int64)
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        ids[s: s + batch] = index.search(queries[s: s + batch], k)[1]
    return len(queries) / (time.perf_counter() - t0), ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="base vectors (default: 100000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--batch", type=int, default=500, help="queries per search call (default: 500)")
    p.add_argument("--clusters", type=int, default=2000, help="Gaussian clusters (characters) (default: 2000)")
    p.add_argument("--noise", type=float, default=0.04, help="per-dimension noise around a cluster centre")
    p.add_argument("--kinds", default="flat,ivf,hnsw,ivfpq,opq", help="comma list of feature_db kinds or factory "
                   "strings (default: flat,ivf,hnsw,ivfpq,opq)")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--k-factor", type=int, default=4)
    p.add_argument("--train-size", type=int, default=200_000, help="training sample for IVF/PQ kinds")
    p.add_argument("--chunk", type=int, default=100_000, help="vectors generated/added at a time")
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: FAISS default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_feature_db.json"))
    args = p.parse_args(argv)

    from animeai.online.feature_db import require_faiss

    faiss = require_faiss()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    queries = make_chunk(centers, 10 ** 12, args.queries, args.seed + 2, args.noise)
    t0 = time.perf_counter()
    truth = exact_topk(centers, args, queries, 10)
    print(f"exact ground truth for {args.queries} queries over {args.n:,} x {args.dim}: "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for kind in args.kinds.split(","):
        spec, index, build_s, train_s, mem = build(kind, centers, args, faiss)
        for name, value in SWEEP.get(kind, [(None, None)]):
            if name is not None:
                set_param(index, name, value, faiss)
            qps, ids = measure(index, queries, 10, args.batch)
            row = {"kind": kind, "factory": spec, "search": f"{name}={value}" if name else "-", "n": args.n,
                   "build_s": round(build_s, 1), "train_s": round(train_s, 1), "memory_mb": round(mem),
                   "qps": round(qps), "recall@10": round(recall(ids, truth), 4)}
            rows.append(row)
            print(row, flush=True)
        del index
    cols = ["kind", "factory", "search", "n", "build_s", "train_s", "memory_mb", "qps", "recall@10"]
    print_table(cols, [[r[c] for c in cols] for r in rows], title=f"feature_db index kinds, {args.n:,} x {args.dim}")
    write_json(args.out, "feature_db", {k: str(v) for k, v in vars(args).items()}, {"rows": rows},
               machine_info("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
