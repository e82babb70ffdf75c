"""The feature-database benchmark's first-stage diagnosis (``candidates_recall@10``) on a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss")
sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

import bench_feature_db  # noqa: E402


@pytest.mark.parametrize("through_db", [False, True])
def test_candidates_recall_bounds_the_reranked_recall(tmp_path, through_db):
    out = tmp_path / "fdb.json"
    argv = ["--n", "20000", "--dim", "64", "--clusters", "50", "--queries", "100", "--batch", "50",
            "--kinds", "IVF128,PQ8x4fsr,Refine(SQ8)", "--train-size", "10000", "--chunk", "5000",
            "--nprobes", "8", "--k-factors", "1", "4", "32", "--threads", "1", "--out", str(out)]
    fine = ["--fine-factors", "1", "2"] if through_db else []  # the database's last re-ranking: off, on
    assert bench_feature_db.main(argv + (["--through-db", *fine] if through_db else [])) == 0
    rows = json.loads(out.read_text())["results"]["rows"]
    settings = [f"nprobe=8 k_factor={f}" for f in (1, 4, 32)]
    if through_db:
        settings = [f"{s} fine_factor={ff}" for s in settings for ff in (1, 2)]
    assert [r["search"] for r in rows] == settings
    final = [float(r["recall@10"]) for r in rows]
    cand = [float(r["candidates_recall@10"]) for r in rows]
    # the re-ranked top 10 is taken from the candidates: it can hold no exact neighbour they lack (also with the
    # database's last re-ranking, which takes no more candidates)
    assert all(f <= c + 1e-9 for f, c in zip(final, cand))
    # with k_factor 1 there is nothing to re-rank among: the same set of ids
    assert final[0] == pytest.approx(cand[0])
    if through_db:  # the last re-ranking (residual codes) finds more of the neighbours among the same candidates
        assert cand[-2] == cand[-1] and final[-1] > final[-2]
        final, cand = final[::2], cand[::2]
    # more candidates contain more of the exact neighbours, and re-ranking them finds them
    assert cand[0] < cand[1] <= cand[2] and final[0] < final[2]
