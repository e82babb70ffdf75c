"""The feature database sharded over Ray actors (animeai.distributed.feature_shards) on a local Ray: the same top-k
as one exact index, adds routed by id, roles consistent on every shard, save -> load, a dead shard named."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import numpy as np
import pytest

pytestmark = pytest.mark.ray

pytest.importorskip("faiss")
ray = pytest.importorskip("ray")

from animeai.distributed.feature_shards import ShardedFeatureDB, ShardError, merge_topk  # noqa: E402
from animeai.online.errors import FeatureDBError, OnlineError  # noqa: E402
from animeai.online.feature_db import FeatureDB, SearchParams  # noqa: E402

DIM = 16


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def pair(local_ray):
    """Three roles (sizes 37, 24, 0 with a prototype) in one Flat database and in 2 shards (0.5 CPU each)."""
    one = FeatureDB(DIM, "h", index_kind="flat", device="cpu")
    sharded = ShardedFeatureDB.start(2, DIM, "h", kind="flat", num_cpus=0.5)
    for db in (one, sharded):
        assert db.add_role("a", vectors(37, 1), metadata={"source": "x"}) == 0
        assert db.add_role("b", vectors(24, 2)) == 1
        assert db.add_role("c", prototype=vectors(1, 3)[0]) == 2
    yield one, sharded
    sharded.shutdown()


def test_same_topk_as_one_flat_index(pair):
    one, sharded = pair
    q = vectors(25, 9)
    s1, i1, r1 = one.search_vectors(q, 10)
    s2, i2, r2 = sharded.search_vectors(q, 10)
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_array_equal(r2, r1)
    np.testing.assert_allclose(s2, s1, rtol=0, atol=1e-6)
    assert np.array_equal(sharded.search(q, 10)[1], one.search(q, 10)[1])
    # more results asked for than vectors exist: the same padding (-1 / -inf) as one database
    s1, i1, _ = one.search_vectors(q[:3], 70)
    s2, i2, _ = sharded.search_vectors(q[:3], 70)
    np.testing.assert_array_equal(i2, i1)
    assert np.isneginf(s2[:, 61:]).all() and (i2[:, 61:] == -1).all()
    np.testing.assert_allclose(sharded.prototypes(), one.prototypes(), atol=1e-6)
    np.testing.assert_allclose(sharded.prototype_scores(q), one.prototype_scores(q), atol=1e-5)
    assert sharded.role_names() == ["a", "b", "c"] and sharded.roles[0] == {"name": "a", "source": "x"}


def test_shards_hold_slices_by_id_modulo(pair):
    _, sharded = pair
    info = sharded.shard_info()
    params = SearchParams(nprobe=7, ef_search=33, k_factor=9, fine_factor=3)  # every knob reaches every shard
    sharded.set_params(params)
    assert [i["params"] for i in sharded.shard_info()] == [dataclasses.asdict(params)] * 2
    assert [i["num_rows"] for i in info] == [31, 30]  # ids 0..60: even on shard 0, odd on shard 1
    assert len({i["pid"] for i in info}) == 2 and sharded.num_vectors == 61 and sharded.num_rows == 61
    assert sharded.shard_of(np.array([0, 1, 60])).tolist() == [0, 1, 0]


@pytest.mark.parametrize("keep_vectors", [True, False])
def test_add_routed_and_searchable_then_remove(local_ray, keep_vectors):
    one = FeatureDB(DIM, "h", index_kind="flat", device="cpu")
    with ShardedFeatureDB.start(2, DIM, "h", kind="flat", num_cpus=0.5, keep_vectors=keep_vectors) as sharded:
        assert [i["keep_vectors"] for i in sharded.shard_info()] == [keep_vectors] * 2
        for db in (one, sharded):
            db.add_role("a", vectors(5, 1))
            db.add_role("b", vectors(4, 2))
        new = vectors(7, 5)
        ids = sharded.add(1, new)
        assert one.add(1, new).tolist() == ids.tolist() == list(range(9, 16))
        assert [i["num_rows"] for i in sharded.shard_info()] == [8, 8]
        s, i, r = sharded.search_vectors(new, 1)  # each new vector finds itself, on the shard its id names
        assert i[:, 0].tolist() == ids.tolist() and (r[:, 0] == 1).all()
        np.testing.assert_allclose(s[:, 0], 1.0, atol=1e-5)
        # bad input is refused on the driver before any shard changes
        with pytest.raises(OnlineError, match="dimension 16"):
            sharded.add(0, np.ones((2, DIM + 1), np.float32))
        with pytest.raises(OnlineError, match="unknown role id 5"):
            sharded.add(5, new)
        with pytest.raises(OnlineError, match="already exists"):
            sharded.add_role("a", new)
        bad = new.copy()
        bad[3, 0] = np.nan
        with pytest.raises(OnlineError, match="NaN"):
            sharded.add(0, bad)
        assert sharded.num_rows == 16 and [i["num_rows"] for i in sharded.shard_info()] == [8, 8]
        for db in (one, sharded):
            db.remove_role(0)
        q = vectors(6, 8)
        np.testing.assert_array_equal(sharded.search_vectors(q, 5)[1], one.search_vectors(q, 5)[1])
        assert sharded.role_names() == ["b"] and set(sharded.search(q, 11)[1].ravel()) == {0}


def test_save_load_same_answers(pair, tmp_path):
    one, sharded = pair
    q = vectors(20, 11)
    before = sharded.search_vectors(q, 8)
    gen = sharded.save(tmp_path / "db")
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["num_shards"] == 2 and manifest["next_id"] == 61 and manifest["routing"] == "modulo"
    # each shard's slice is a complete one-process database in the existing format
    assert FeatureDB.load(gen / "shard-001", device="cpu").num_rows == 30
    loaded = ShardedFeatureDB.load(tmp_path / "db", num_cpus=0.5)
    try:
        after = loaded.search_vectors(q, 8)
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
        assert loaded.role_names() == ["a", "b", "c"] and loaded.roles[0]["source"] == "x"
        assert loaded.add(0, vectors(3, 12)).tolist() == [61, 62, 63]  # routing continues where it was
    finally:
        loaded.shutdown()
    with pytest.raises(FeatureDBError, match="expected 8-d"):
        ShardedFeatureDB.load(tmp_path / "db", expect_dim=8)
    with pytest.raises(FeatureDBError, match="not a sharded feature database"):
        one.save(tmp_path / "single")
        ShardedFeatureDB.load(tmp_path / "single")
    # a shard slice replaced behind the manifest's back is refused, naming the shard
    other = FeatureDB(DIM, "h", index_kind="flat", device="cpu")
    other.add_role("a", vectors(2, 1))
    other.save(gen / "shard-001")
    with pytest.raises(FeatureDBError, match="shard 1 holds 'gen-00000002'"):
        ShardedFeatureDB.load(tmp_path / "db")


def test_dead_shard_is_named(local_ray):
    db = ShardedFeatureDB.start(2, DIM, "h", kind="flat", num_cpus=0.5)
    try:
        db.add_role("a", vectors(6, 1))
        pid = db.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(ShardError, match=r"search: shard 1 of 2 died"):
            db.search(vectors(2, 3), 3)
        with pytest.raises(ShardError, match=r"shard 1 of 2 died"):
            db.add(0, vectors(2, 4))
    finally:
        db.shutdown()
    with pytest.raises(ShardError, match="shut down"):
        db.search(vectors(2, 3), 3)


def test_concurrent_search_and_add(local_ray):
    import threading

    with ShardedFeatureDB.start(2, DIM, "h", kind="flat", num_cpus=0.5) as db:
        db.add_role("a", vectors(10, 1))
        errors, stop = [], threading.Event()

        def searcher():
            try:
                while not stop.is_set():
                    s, i, _ = db.search_vectors(vectors(4, 2), 5)
                    assert (i >= 0).all() and np.isfinite(s).all()
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=searcher) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            added = [db.add(0, vectors(3, 10 + j)) for j in range(10)]
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors
        assert np.concatenate(added).tolist() == list(range(10, 40)) and db.num_vectors == 40


def test_damaged_shard_slice_is_named(pair, tmp_path):
    _, sharded = pair
    gen = sharded.save(tmp_path / "db")
    index = next((gen / "shard-001").glob("gen-*/index.faiss"))
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(ShardError, match=r"load: shard 1 of 2 died .*index.faiss: damaged"):
        ShardedFeatureDB.load(tmp_path / "db", num_cpus=0.5)
    deadline = time.time() + 20  # the other shard is stopped, not left holding its CPU (the pair holds 1 of 2)
    while ray.available_resources().get("CPU", 0) < 1.0 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= 1.0


def test_ray_missing_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(OnlineError, match=r"needs Ray: pip install"):
        ShardedFeatureDB.start(2, DIM)


def test_start_refuses_bad_arguments(local_ray):
    with pytest.raises(OnlineError, match="number of shards"):
        ShardedFeatureDB.start(0, DIM)
    with pytest.raises(OnlineError, match="dimension"):
        ShardedFeatureDB.start(2, 0)


def test_merge_topk_pads_and_renumbers():
    a = (np.array([[0.9, 0.1]], np.float32), np.array([[0, 1]]), np.array([[3, 4]]))
    b = (np.array([[0.5, -np.inf]], np.float32), np.array([[0, -1]]), np.array([[7, -1]]))
    s, i, r = merge_topk([a, b], 4, 2)
    assert i.tolist() == [[0, 1, 2, -1]] and r.tolist() == [[3, 7, 4, -1]]
    assert s[0, :3].tolist() == pytest.approx([0.9, 0.5, 0.1]) and np.isneginf(s[0, 3])


def test_cli_split_info_search(local_ray, tmp_path, capsys):
    from animeai.cli import main

    src = FeatureDB(DIM, "h", index_kind="flat", device="cpu")
    src.add_role("a", vectors(9, 1), metadata={"k": 1})
    src.add_role("b", vectors(6, 2))
    src.add_role("c", prototype=vectors(1, 3)[0])
    src.save(tmp_path / "db")
    out = tmp_path / "sharded"
    assert main(["shards", "split", "--db", str(tmp_path / "db"), "--out", str(out), "--shards", "2",
                 "--cpus-per-shard", "0.5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["vectors"] == 15 and res["roles"] == 3 and [s["num_rows"] for s in res["shards"]] == [8, 7]
    assert main(["shards", "info", "--db", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["num_shards"] == 2
    q = vectors(4, 7)
    np.save(tmp_path / "q.npy", q)
    assert main(["shards", "search", "--db", str(out), "--queries", str(tmp_path / "q.npy"), "--k", "3",
                 "--cpus-per-shard", "0.5"]) == 0
    found = json.loads(capsys.readouterr().out)
    s, i, r = src.search_vectors(q, 3)
    assert [[m["id"] for m in row] for row in found] == i.tolist()
    assert [[m["role"] for m in row] for row in found] == [[src.role_names()[x] for x in row] for row in r]
    assert main(["shards", "search", "--db", str(tmp_path / "db"), "--queries", str(tmp_path / "q.npy")]) == 2
    assert "not a sharded feature database" in capsys.readouterr().err


def test_compressed_shards_end_with_the_finer_reranking(local_ray):
    """Shards of a compressed kind without kept vectors each keep residual codes for their slice; the merged top-k
    is re-scored from them as one database's is (scores closer to the exact cosine with fine_factor 2)."""
    dim, rng = 64, np.random.default_rng(7)
    centres = rng.normal(size=(8, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = [(c + 0.012 * rng.normal(size=(400, dim))).astype(np.float32) for c in centres]
    q = (centres[rng.integers(0, 8, 40)] + 0.012 * rng.normal(size=(40, dim))).astype(np.float32)
    x = np.concatenate(data)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    with ShardedFeatureDB.start(2, dim, "h", kind="IVF16,PQ16x4fsr,Refine(SQ8)", num_cpus=0.5,
                                keep_vectors=False) as db:
        for r, part in enumerate(data):
            db.add_role(f"r{r}", part)
        db.rebuild()
        errors = []
        for fine_factor in (1, 2):
            db.set_params(SearchParams(nprobe=16, k_factor=40, fine_factor=fine_factor))
            s, ids, _ = db.search_vectors(q, 10)
            assert (ids >= 0).all()
            errors.append(np.abs(s - np.einsum("qd,qkd->qk", qn, x[ids])).mean())
        assert errors[1] < 0.7 * errors[0], errors
