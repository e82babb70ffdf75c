"""The feature database sharded over Ray actors: 1 vs 2 shard actors vs one in-process database.

The same clustered synthetic vectors as ``bench_feature_db.py`` go into (a) an in-process ``FeatureDB``, (b) a
``ShardedFeatureDB`` with 1 shard actor and (c) one with 2 shard actors, on a local Ray; every database searches
with the same FAISS threads (``--threads``, per shard). Reported per setup: build time, QPS of batched queries
(``--batch`` queries per call), the median latency of one query per call, and whether the top-k ids equal the
in-process database's. The fan-out's cost per call is (b) minus (a): putting the queries into the object store,
one actor call per shard, getting the results back and merging them.

    PYTHONPATH=. python tests/benchmarks/bench_feature_shards.py                   # 200k x 512, Flat
    PYTHONPATH=. python tests/benchmarks/bench_feature_shards.py --quick           # seconds: checks the script
    PYTHONPATH=. python tests/benchmarks/bench_feature_shards.py --kind ivf        # IVF (each shard trains its own)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402
from bench_feature_db import chunks, make_chunk  # noqa: E402


def fill(db, centers, args) -> float:
    """Add ``args.n`` vectors as ``args.roles`` roles (consecutive blocks); seconds taken."""
    t0 = time.perf_counter()
    per_role = -(-args.n // args.roles)
    for role, (start, count) in enumerate(chunks(args.n, per_role)):
        x = make_chunk(centers, start, count, args.seed, args.noise)
        db.add_role(f"role{role}", x)
    if args.kind != "flat":
        db.rebuild()  # train the kind on the collection (a sharded database: each shard on its slice)
    return time.perf_counter() - t0


def measure(db, queries: np.ndarray, k: int, batch: int, singles: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(batched QPS, median single-query latency in ms, top-k ids, top-k scores)."""
    db.search_vectors(queries[:batch], k)  # warm-up
    ids = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        sc, found, _ = db.search_vectors(queries[s: s + batch], k)
        ids[s: s + batch], scores[s: s + batch] = found, sc
    qps = len(queries) / (time.perf_counter() - t0)
    lat = []
    for i in range(singles):
        t = time.perf_counter()
        db.search_vectors(queries[i: i + 1], k)
        lat.append((time.perf_counter() - t) * 1000)
    return qps, statistics.median(lat), ids, scores


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="vectors (default: 200000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kind", default="flat", help="feature_db index kind (default: flat, exact)")
    p.add_argument("--roles", type=int, default=100, help="roles the vectors are split into (default: 100)")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--batch", type=int, default=500, help="queries per search call (default: 500)")
    p.add_argument("--singles", type=int, default=200, help="one-query calls timed for the latency (default: 200)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads per database / shard (default: 1)")
    p.add_argument("--shards", default="1,2", help="shard counts to run (default: 1,2)")
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.04)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script works, numbers mean nothing")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_feature_shards.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.queries, args.batch, args.singles, args.roles = 3000, 64, 200, 50, 20, 10

    import ray

    from animeai.distributed.feature_shards import ShardedFeatureDB
    from animeai.online.feature_db import FeatureDB, require_faiss

    faiss = require_faiss()
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    queries = make_chunk(centers, 10 ** 12, args.queries, args.seed + 2, args.noise)
    counts = [int(c) for c in args.shards.split(",")]
    rows = []

    faiss.omp_set_num_threads(args.threads)
    print(f"load average before: {load_average()}", flush=True)
    local = FeatureDB(args.dim, "bench", index_kind=args.kind, device="cpu")
    build_s = fill(local, centers, args)
    qps, lat, ref_ids, ref_scores = measure(local, queries, args.k, args.batch, args.singles)
    rows.append({"setup": "in-process FeatureDB", "shards": 0, "build_s": round(build_s, 1), "qps": round(qps),
                 "latency_1q_ms": round(lat, 2), "same_ids": "-", "max_score_diff": "-", "load": load_average()})
    print(rows[-1], flush=True)
    del local

    # one CPU per shard, plus room for the driver's calls; a small object store
    ray.init(address="local", num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(256, args.n * args.dim * 4 // 2 ** 20 // 2 + 128) * 2 ** 20)
    try:
        for n in counts:
            db = ShardedFeatureDB.start(n, args.dim, "bench", kind=args.kind, num_cpus=1, threads=args.threads)
            try:
                build_s = fill(db, centers, args)
                qps, lat, ids, scores = measure(db, queries, args.k, args.batch, args.singles)
            finally:
                db.shutdown()
            same = float(np.mean(ids == ref_ids))
            rows.append({"setup": f"sharded, {n} actor{'s' if n > 1 else ''}", "shards": n,
                         "build_s": round(build_s, 1), "qps": round(qps), "latency_1q_ms": round(lat, 2),
                         "same_ids": round(same, 4), "max_score_diff": float(np.max(np.abs(scores - ref_scores))),
                         "load": load_average()})
            print(rows[-1], flush=True)
    finally:
        ray.shutdown()
    base = rows[0]
    for r in rows[1:]:
        r["fanout_ms_per_call"] = round(r["latency_1q_ms"] - base["latency_1q_ms"], 2)
        r["qps_vs_in_process"] = round(r["qps"] / base["qps"], 2)
    cols = ["setup", "build_s", "qps", "latency_1q_ms", "fanout_ms_per_call", "qps_vs_in_process", "same_ids",
            "load"]
    print_table(cols, [[r.get(c, "-") for c in cols] for r in rows],
                title=f"feature_db over Ray shard actors, {args.n:,} x {args.dim} {args.kind}, {args.threads} FAISS "
                      f"thread(s) per shard, batches of {args.batch}")
    write_json(args.out, "feature_shards", {k: str(v) for k, v in vars(args).items()}, {"rows": rows},
               machine_info("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
