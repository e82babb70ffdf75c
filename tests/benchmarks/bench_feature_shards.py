"""The feature database sharded over Ray actors: 1 vs 2 shard actors vs one in-process database.

The same clustered synthetic vectors as ``bench_feature_db.py`` go into (a) an in-process ``FeatureDB``, (b) a
``ShardedFeatureDB`` with 1 shard actor and (c) one with 2 shard actors, on a local Ray; every database searches
with the same FAISS threads (``--threads``, per shard). Reported per setup: build time, QPS of batched queries
(``--batch`` queries per call), the median latency of one query per call, and whether the top-k ids equal the
in-process database's. All setups are built first and then measured in turn, round after round (medians
reported), so that load from other work falls on all of them alike. The fan-out's fixed cost per call (putting
the queries into the object store, one actor call per shard, getting the results back, merging them) is the
one-query latency of (b) or (c) minus (a), on a small database (``--small-n``) where the search itself is cheap.

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


def batched(db, queries: np.ndarray, k: int, batch: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(QPS over all queries in calls of ``batch``, top-k ids, top-k scores)."""
    ids = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        sc, found, _ = db.search_vectors(queries[s: s + batch], k)
        ids[s: s + batch], scores[s: s + batch] = found, sc
    return len(queries) / (time.perf_counter() - t0), ids, scores


def one_query_ms(db, queries: np.ndarray, k: int, count: int) -> list[float]:
    out = []
    for i in range(count):
        t = time.perf_counter()
        db.search_vectors(queries[i % len(queries): i % len(queries) + 1], k)
        out.append((time.perf_counter() - t) * 1000)
    return out


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="vectors (default: 200000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kind", default="flat", help="feature_db index kind (default: flat, exact)")
    p.add_argument("--roles", type=int, default=100, help="roles the vectors are split into (default: 100)")
    p.add_argument("--queries", type=int, default=1000, help="queries per round (default: 1000)")
    p.add_argument("--batch", type=int, default=500, help="queries per search call (default: 500)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; every setup is measured once per round, in turn, "
                   "and the medians are reported (default: 3)")
    p.add_argument("--singles", type=int, default=100, help="one-query calls per round and setup on the small "
                   "database, a fifth of that on the large one (default: 100)")
    p.add_argument("--small-n", type=int, default=1000, help="vectors of the small database on which the fan-out's "
                   "fixed cost per call is measured (default: 1000)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads per database / shard (default: 1)")
    p.add_argument("--shards", default="1,2", help="shard counts to run (default: 1,2)")
    p.add_argument("--worker-niceness", type=int, default=0, help="niceness of Ray's worker processes (Ray's "
                   "default is 15; default here: 0, the driver's, so that shards and the in-process database get "
                   "the same share of a busy CPU)")
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.04)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script works, numbers mean nothing")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_feature_shards.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.queries, args.batch, args.singles, args.roles, args.rounds = 3000, 64, 200, 50, 10, 10, 2

    import ray

    from animeai.distributed.feature_shards import ShardedFeatureDB
    from animeai.online.feature_db import FeatureDB, require_faiss

    faiss = require_faiss()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    queries = make_chunk(centers, 10 ** 12, args.queries, args.seed + 2, args.noise)
    counts = [int(c) for c in args.shards.split(",")]
    print(f"load average before: {load_average()}", flush=True)

    # every setup is built first and kept alive, then measured in turn each round, so that the other engineers'
    # load on this shared machine falls on all setups alike
    ray.init(address="local", num_cpus=sum(counts) * 2, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(256, args.n * args.dim * 4 // 2 ** 20 // 2 + 128) * 2 ** 20,
             # a shared 2-core machine under load misses Ray's default health checks (node marked dead after
             # ~15 s without an answer); this benchmark's own node is local, so give it minutes
             # Ray starts its workers at niceness 15: next to other busy processes they get a small share of the
             # CPU while the in-process database runs at 0; --worker-niceness 0 compares like with like
             _system_config={"health_check_failure_threshold": 30, "health_check_timeout_ms": 30000,
                             "worker_niceness": args.worker_niceness})
    setups: dict[str, dict] = {}
    try:
        for label, small in (("", False), (" (small)", True)):
            n = args.small_n if small else args.n
            sub = argparse.Namespace(**{**vars(args), "n": n, "roles": min(args.roles, n)})
            local = FeatureDB(args.dim, "bench", index_kind=args.kind, device="cpu")
            setups["in-process FeatureDB" + label] = {"db": local, "shards": 0, "small": small,
                                                     "build_s": fill(local, centers, sub)}
            for c in counts:
                db = ShardedFeatureDB.start(c, args.dim, "bench", kind=args.kind, num_cpus=1, threads=args.threads)
                setups[f"sharded, {c} actor{'s' if c > 1 else ''}{label}"] = {"db": db, "shards": c, "small": small,
                                                                          "build_s": fill(db, centers, sub)}
            print(f"built{label or ' (large)'}: " + ", ".join(f"{k} {v['build_s']:.1f} s" for k, v in setups.items()
                                                                if v["small"] == small), flush=True)
        for v in setups.values():  # warm-up
            v["db"].search_vectors(queries[: args.batch], args.k)
            v.update(qps=[], lat=[], loads=[])
        ref = {}
        for r in range(args.rounds):
            for v in setups.values():
                if not v["small"]:
                    qps, ids, scores = batched(v["db"], queries, args.k, args.batch)
                    v["qps"].append(qps)
                    if v["shards"] == 0:
                        ref = {"ids": ids, "scores": scores}
                    else:
                        v["same_ids"] = float(np.mean(ids == ref["ids"]))
                        v["max_score_diff"] = float(np.max(np.abs(scores - ref["scores"])))
                # one-query calls: the small database's give the fan-out's fixed cost; fewer on the large one
                v["lat"] += one_query_ms(v["db"], queries, args.k, args.singles if v["small"] else
                                         max(1, args.singles // 5))
                v["loads"].append(os.getloadavg()[0])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k}: {v['qps'][-1]:.0f} QPS" for k, v in setups.items() if v["qps"]) + f"; load {load_average()}",
                flush=True)
    finally:
        for v in setups.values():
            if v["shards"]:
                v["db"].shutdown()
        ray.shutdown()
    rows = []
    for name, v in setups.items():
        rows.append({"setup": name, "n": args.small_n if v["small"] else args.n, "shards": v["shards"],
                     "build_s": round(v["build_s"], 1),
                     "qps": round(statistics.median(v["qps"])) if v["qps"] else "-",
                     "qps_rounds": [round(q) for q in v["qps"]],
                     "latency_1q_ms": round(statistics.median(v["lat"]), 2),
                     "same_ids": v.get("same_ids", "-"), "max_score_diff": v.get("max_score_diff", "-"),
                     "load": round(statistics.median(v["loads"]), 1)})
    for small in (False, True):
        base = next(r for r in rows if r["shards"] == 0 and (r["n"] == args.small_n) == small)
        for r in rows:
            if r["shards"] and (r["n"] == args.small_n) == small:
                r["fanout_ms_per_call"] = round(r["latency_1q_ms"] - base["latency_1q_ms"], 2)
                if r["qps"] != "-":
                    r["qps_vs_in_process"] = round(r["qps"] / base["qps"], 2)
    cols = ["setup", "n", "build_s", "qps", "qps_vs_in_process", "latency_1q_ms", "fanout_ms_per_call", "same_ids",
            "load"]
    print_table(cols, [[r.get(c, "-") for c in cols] for r in rows],
                title=f"feature_db over Ray shard actors, {args.dim}-d {args.kind}, {args.threads} FAISS thread(s) per "
                      f"shard, batches of {args.batch}, medians of {args.rounds} interleaved rounds")
    write_json(args.out, "feature_shards", {k: str(v) for k, v in vars(args).items()}, {"rows": rows},
               machine_info("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
