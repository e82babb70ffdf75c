"""The compressed kinds' last re-ranking: residual codes (``animeai.online.residual``) without kept vectors, the
exact vectors with them; their persistence and their bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss")

from animeai.online import FeatureDBError, OnlineError  # noqa: E402
from animeai.online.feature_db import FeatureDB, SearchParams  # noqa: E402
from animeai.online.residual import ResidualCodec  # noqa: E402

KIND = "IVF16,PQ16x4fsr,Refine(SQ8)"
DIM = 64


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_codec_round_trip(bits):
    rng = np.random.default_rng(bits)
    scale = rng.uniform(0.001, 0.01, DIM).astype(np.float32)
    scale[5] = 0  # a dimension without spread
    r = (rng.uniform(-1, 1, (2000, DIM)) * scale).astype(np.float32)
    codec = ResidualCodec(DIM, bits)
    codec.train(r)
    codes = codec.encode(r)
    assert codes.dtype == np.uint8 and codes.shape == (2000, (DIM * bits + 7) // 8) == (2000, codec.code_size)
    back = codec.decode(codes)
    lo, hi = codec.ranges()
    step = (hi - lo) / 2 ** bits
    assert (np.abs(back - r) <= step / 2 + 1e-7).all()  # every coordinate within half a cell
    np.testing.assert_array_equal(back[:, 5], r[:, 5])  # no spread: decoded exactly
    rms = np.sqrt(((back - r) ** 2).mean(axis=0))[scale > 0]
    np.testing.assert_allclose(rms, (step / np.sqrt(12))[scale > 0], rtol=0.15)  # uniform residuals: step/sqrt(12)
    far = codec.decode(codec.encode(r[:10] * 50))  # beyond the trained range: the end cells
    assert (far >= lo - 1e-7).all() and (far <= hi + 1e-7).all()
    again = ResidualCodec(DIM, bits, codec.ranges())  # what a load rebuilds from the saved ranges
    np.testing.assert_array_equal(again.decode(codes), back)


def test_codec_rejects_bad_settings():
    for bits in (0, 9, True, 1.5):
        with pytest.raises(ValueError, match="residual bits must be an integer from 1 to 8"):
            ResidualCodec(DIM, bits)
    good = np.zeros((2, DIM), np.float32)
    for bad, why in ((good[:, :3], "expected float32"), (good.astype(np.float64), "expected float32"),
                     (np.stack([np.ones(DIM), np.zeros(DIM)]).astype(np.float32), "low end at most"),
                     (np.full((2, DIM), np.nan, np.float32), "finite")):
        with pytest.raises(FeatureDBError, match=why):
            ResidualCodec(DIM, 1, bad)


def _clusters(seed=0, roles=12, per_role=400, noise=0.012):
    """Tight clusters: neighbours differ by less than the 8-bit code resolves (as at 10M)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(roles, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = [(c + noise * rng.normal(size=(per_role, DIM))).astype(np.float32) for c in centres]
    queries = (centres[rng.integers(0, roles, 60)] + noise * rng.normal(size=(60, DIM))).astype(np.float32)
    return data, queries


def _build(data, *, fine_bits=1, keep_vectors=False):
    db = FeatureDB(DIM, "h", index_kind=KIND, keep_vectors=keep_vectors, device="cpu", fine_bits=fine_bits)
    db.prepare(np.concatenate(data), sum(map(len, data)))
    for r, x in enumerate(data):
        db.add_role(f"r{r}", x)
    return db


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _errors(db, data, q, fine_factor):
    """Mean |score - exact cosine| of the results, and recall@10 against exact search."""
    db.set_params(SearchParams(nprobe=16, k_factor=40, fine_factor=fine_factor))
    scores, ids, _ = db.search_vectors(q, 10)
    x, qn = _unit(np.concatenate(data)), _unit(q)  # ids are the rows in the order added
    exact = np.einsum("qd,qkd->qk", qn, x[ids])
    truth = np.argsort(-(qn @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    return float(np.abs(scores - exact).mean()), float(recall), ids


def test_residual_codes_make_the_last_ranking_finer():
    data, q = _clusters()
    one, two, none = _build(data, fine_bits=1), _build(data, fine_bits=2), _build(data, fine_bits=0)
    assert one._fine.shape == (len(one._norm), DIM // 8) and two._fine.shape[1] == DIM // 4
    assert none._fine_codec is None
    err_8bit, rec_8bit, _ = _errors(one, data, q, fine_factor=1)  # the 8-bit code alone
    err_1, rec_1, _ = _errors(one, data, q, fine_factor=2)
    err_2, rec_2, _ = _errors(two, data, q, fine_factor=2)
    assert err_1 < 0.7 * err_8bit and err_2 < 0.7 * err_1  # each bit roughly halves the score error
    assert rec_2 >= rec_1 >= rec_8bit and rec_2 > rec_8bit
    # without residual codes the setting changes nothing: the same 8-bit ranking
    e0_a, _, ids_a = _errors(none, data, q, fine_factor=1)
    e0_b, _, ids_b = _errors(none, data, q, fine_factor=2)
    np.testing.assert_array_equal(ids_a, ids_b)
    assert e0_a == e0_b
    # the reconstructed role vectors (replay, rebuild) get the residual too
    exact = _unit(data[0])
    assert (np.abs(one.vectors_of(0)[0] - exact).mean() < 0.7 * np.abs(none.vectors_of(0)[0] - exact).mean())


def test_kept_vectors_give_the_exact_scores():
    data, q = _clusters(seed=1)
    db = _build(data, keep_vectors=True)
    assert db._fine_codec is None  # kept vectors: no residual codes needed
    err_exact, _, _ = _errors(db, data, q, fine_factor=2)
    err_8bit, _, _ = _errors(db, data, q, fine_factor=1)
    assert err_exact < 1e-5 < err_8bit


def test_residual_codes_persist_rebuild_and_refuse_damage(tmp_path):
    data, q = _clusters(seed=2)
    db = _build(data, fine_bits=2)
    db.set_params(SearchParams(nprobe=16, k_factor=8, fine_factor=3))
    before = db.search_vectors(q, 10)
    gen = db.save(tmp_path / "db")
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["fine_bits"] == 2 and manifest["fine_codes"] is True
    assert {"fine.npy", "fine_range.npy"} <= set(manifest["files"])
    assert manifest["search_params"]["fine_factor"] == 3
    back = FeatureDB.load(tmp_path / "db", expect_dim=DIM)
    assert back.fine_bits == 2 and back.params.fine_factor == 3
    after = back.search_vectors(q, 10)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    back.add(0, data[0][:5] + 0.001)  # new vectors get codes too
    assert back._fine[back.num_rows - 5: back.num_rows].any()
    back.remove_role(3)
    back.rebuild()  # a fresh index: codes recomputed against its own 8-bit codes
    assert back._fine_codec is not None and back._fine.shape[0] >= back.num_rows
    rows = [*data, data[0][:5] + 0.001]  # every row in the order added
    err_1, _, _ = _errors(back, rows, q, fine_factor=1)
    err_2, _, ids = _errors(back, rows, q, fine_factor=2)
    assert err_2 < 0.7 * err_1 and not np.isin(ids, np.arange(1200, 1600)).any()  # role 3's rows are gone

    fine = gen / "fine.npy"
    fine.write_bytes(fine.read_bytes()[:-7])
    with pytest.raises(FeatureDBError, match="fine.npy: damaged"):
        FeatureDB.load(tmp_path / "db")
    fine.unlink()
    with pytest.raises(FeatureDBError, match="fine.npy: missing"):
        FeatureDB.load(tmp_path / "db")
    manifest["fine_codes"] = "yes"
    (gen / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FeatureDBError, match="'fine_bits' / 'fine_codes'"):
        FeatureDB.load(tmp_path / "db")


def test_fine_bits_is_checked():
    for bad in (-1, 9, True, "1"):
        with pytest.raises(OnlineError, match="fine_bits must be an integer from 0 to 8"):
            FeatureDB(DIM, "h", fine_bits=bad)


def test_concurrent_add_and_search_with_residual_codes():
    """Adds move the 8-bit codes, the id map and the residual codes (growth) while searches read them in place:
    the database's lock keeps every search consistent."""
    import threading

    data, q = _clusters(seed=3)
    db = _build(data)
    db.set_params(SearchParams(nprobe=16, k_factor=8, fine_factor=2))
    rng = np.random.default_rng(4)
    batches = [(data[i % len(data)][:50] + 0.002 * rng.normal(size=(50, DIM))).astype(np.float32) for i in range(40)]
    probe = np.concatenate([d[:2] for d in data])  # stored vectors: each is its own best match
    errors, stop = [], threading.Event()

    def searcher():
        try:
            while not stop.is_set():
                s, ids, roles = db.search_vectors(probe, 5)
                assert np.isfinite(s).all() and (np.diff(s, axis=1) <= 1e-6).all()  # best first
                assert (ids >= 0).all() and (roles >= 0).all()
                assert (s[:, 0] > 0.98).all()  # a stored vector (or its near twin) comes first
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def adder(part):
        try:
            for i in part:
                db.add(i % len(data), batches[i])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    searchers = [threading.Thread(target=searcher) for _ in range(3)]
    adders = [threading.Thread(target=adder, args=(range(k, 40, 2),)) for k in range(2)]
    for t in searchers + adders:
        t.start()
    for t in adders:
        t.join()
    stop.set()
    for t in searchers:
        t.join()
    assert not errors, errors[:3]
    assert db.num_vectors == db.ntotal == sum(map(len, data)) + 40 * 50
    assert db._fine.shape[0] >= db.num_rows and db._fine[db.num_rows - 50: db.num_rows].any()


def test_database_from_before_residual_codes_loads(tmp_path):
    """A database saved before residual codes existed (no such manifest fields or files) opens as it was: no codes,
    the 8-bit ranking; its next rebuild gives it codes."""
    data, q = _clusters(seed=5)
    db = _build(data, fine_bits=0)
    gen = db.save(tmp_path / "db")
    manifest = json.loads((gen / "manifest.json").read_text())
    for key in ("fine_bits", "fine_codes"):
        del manifest[key]
    del manifest["search_params"]["fine_factor"]
    (gen / "manifest.json").write_text(json.dumps(manifest))
    old = FeatureDB.load(tmp_path / "db")
    assert old._fine_codec is None and old.params.fine_factor == SearchParams.fine_factor
    db.set_params(old.params)
    for a, b in zip(db.search_vectors(q, 10), old.search_vectors(q, 10)):
        np.testing.assert_array_equal(a, b)
    old.rebuild()
    assert old._fine_codec is not None and old._fine.shape[1] == DIM // 8
