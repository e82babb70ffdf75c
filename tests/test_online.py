"""Online learning: OnlineLearningSystem end to end, the FAISS feature database (persistence, kill safety, threads),
bad input leaving everything unchanged, and the CLI commands.
Tiny Lite0 (offline weights) at 64 px on synthetic data."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)  # tiny indexes; avoids OpenMP spinning on a shared 2-core machine

from animeai.checkpoint import save_model_file  # noqa: E402
from animeai.online import FeatureDBError, OnlineError, OnlineLearningSystem  # noqa: E402
from animeai.online.feature_db import FeatureDB, choose_index, faiss_device  # noqa: E402

OLD, NEW = 4, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic characters (4 known to the model, 2 new), and a Lite0 model file whose head was fitted on the 4."""
    from animeai.data.synthetic import make_synthetic_dataset
    from animeai.inference import Classifier
    from animeai.models import create_model, get_model_spec

    base = tmp_path_factory.mktemp("online")
    data = base / "data"
    names = make_synthetic_dataset(data, num_classes=OLD + NEW, images_per_class=12, image_size=64, seed=0,
                                   val_fraction=0.5)
    old, new = names[:OLD], names[OLD:]
    old_train = base / "old_train"
    old_train.mkdir()
    for c in old:
        (old_train / c).symlink_to(data / "train" / c)
    spec = get_model_spec("efficientnet_lite0")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=OLD, pretrained="package")
    meta = {"kind": "classifier", "arch": "efficientnet_lite0", "num_classes": OLD, "class_names": old,
            "image_size": 64, "mean": list(spec.mean), "std": list(spec.std), "config": {}, "metrics": {}}
    clf = Classifier(model, meta, torch.device("cpu"))
    paths = [p for c in old for p in sorted((data / "train" / c).iterdir())]
    y = torch.tensor([i for i, c in enumerate(old) for _ in sorted((data / "train" / c).iterdir())])
    x = clf.embed_paths(paths)
    opt = torch.optim.Adam(model.classifier.parameters(), lr=1e-2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(model.classifier(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model_path = base / "base.pth"
    save_model_file(model_path, model.state_dict(), meta)
    return {"base": base, "data": data, "old": old, "new": new, "old_train": old_train, "model": model_path}


def imgs(world, name, split="train", n=None):
    return sorted((world["data"] / split / name).iterdir())[:n]


def snapshot(ol, db_path: Path, probe, extra_files=()):
    """Everything a failed call must leave unchanged: roles, answers, and every byte on disk."""
    files = {str(p.relative_to(db_path)): p.read_bytes() for p in sorted(db_path.rglob("*")) if p.is_file()}
    files.update({str(f): Path(f).read_bytes() for f in extra_files})
    return ol.list_roles(), ol.identify(probe, k=3), files


# ------------------------------------------------------------------------------------------ end to end


def test_original_snippet_end_to_end(world, tmp_path, capsys):
    from animeai.cli import main

    model_path, db_path = tmp_path / "character_classifier.pth", tmp_path / "feature_db"
    model_path.write_bytes(world["model"].read_bytes())
    ol = OnlineLearningSystem(model_path=str(model_path), feature_db_path=str(db_path))
    assert "weight rows" in ol.notes[0]
    new_id = ol.add_new_role("新角色", [str(p) for p in imgs(world, world["new"][0], n=4)])
    assert new_id == OLD
    assert [r["name"] for r in ol.list_roles()][-1] == "新角色"
    out = tmp_path / "updated_model.pth"
    ol.save_model(str(out))
    # a normal model file: info / predict / evaluate load it unchanged
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["class_names"] == world["old"] + ["新角色"] and info["kind"] == "classifier"
    probe = imgs(world, world["new"][0], "val", 2)
    assert main(["predict", "--model", str(out), *map(str, probe), "--top-k", "2"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert len(pred) == 2 and all(len(r["top_k"]) == 2 for r in pred)
    val = tmp_path / "val"
    val.mkdir()
    for c in world["old"]:
        (val / c).symlink_to(world["data"] / "val" / c)
    (val / "新角色").symlink_to(world["data"] / "val" / world["new"][0])
    assert main(["evaluate", "--model", str(out), "--data", str(val)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 5 * 6 and "新角色" in report["per_class"]


def test_enroll_then_identify_finds_new_roles(world, tmp_path):
    ol = OnlineLearningSystem(world["model"], tmp_path / "db", data_root=world["old_train"])
    assert [r["exemplars"] for r in ol.list_roles()] == [6] * OLD
    for name in world["new"]:
        ol.add_new_role(name, imgs(world, name, n=4))
    hits = 0
    for name in world["new"]:
        answers = ol.identify(imgs(world, name, "val"), k=3)
        hits += sum(a[0]["role"] == name for a in answers)
        assert sum(name in {x["role"] for x in a} for a in answers) >= 5  # in the top 3 for 5 of 6 images
        assert all(a[0]["score"] >= a[1]["score"] >= a[2]["score"] for a in answers)
    assert hits >= 8, hits  # top-1 for 8 of the 12 held-out images of the new roles (chance: 2)
    # old roles are still recognised
    old_hits = [a[0]["role"] == c for c in world["old"] for a in ol.identify(imgs(world, c, "val"), k=1)]
    assert np.mean(old_hits) >= 0.75


def test_save_reopen_gives_identical_answers(world, tmp_path):
    db_path = tmp_path / "db"
    ol = OnlineLearningSystem(world["model"], db_path, data_root=world["old_train"])
    for name in world["new"]:
        ol.add_new_role(name, imgs(world, name, n=4))
    probe = [p for c in world["old"] + world["new"] for p in imgs(world, c, "val", 2)]
    before = ol.identify(probe, k=3)
    saved = ol.save_model(tmp_path / "updated.pth")
    again = OnlineLearningSystem(saved, db_path)
    assert again.list_roles() == ol.list_roles()  # the saved model lists its imprinted rows: they stay imprinted
    assert again.identify(probe, k=3) == before
    # the original model file + the saved database: the added roles are imprinted again, same answers
    reopened = OnlineLearningSystem(world["model"], db_path)
    assert any("imprinted" in n for n in reopened.notes)
    assert reopened.identify(probe, k=3) == before


def test_combination_beats_each_alone(world, tmp_path):
    """Top-1 over all 6 roles (4 trained + 2 added from 4 images): classifier+database > each alone."""
    ol = OnlineLearningSystem(world["model"], tmp_path / "db", data_root=world["old_train"])
    for name in world["new"]:
        ol.add_new_role(name, imgs(world, name, n=4))
    names = world["old"] + world["new"]
    paths = [p for c in names for p in imgs(world, c, "val")]
    y = np.array([i for i, c in enumerate(names) for _ in imgs(world, c, "val")])
    feats = ol.embed(paths)
    comb, p_clf, p_db = ol.scores(feats)
    acc = {k: float(np.mean(v.argmax(1) == y)) for k, v in (("combined", comb), ("classifier", p_clf),
                                                             ("database", ol.scores(feats, classifier_weight=0)[0]))}
    print(acc)
    assert acc["combined"] >= max(acc["classifier"], acc["database"])
    assert acc["combined"] > min(acc["classifier"], acc["database"])


def test_prototype_only_database_evidence(world, tmp_path):
    """knn=0: the database evidence is the softmax of the prototype cosines alone (no exemplar search), so a role's
    score does not grow with its number of exemplars."""
    ol = OnlineLearningSystem(world["model"], tmp_path / "db", data_root=world["old_train"], knn=0, whiten=False)
    assert ol.score_rule == {"whitened": False, "temperature": 0.04, "trained_margin": 0.0}  # the plain rule
    ol.add_new_role(world["new"][0], imgs(world, world["new"][0], n=4))
    feats = ol.embed(imgs(world, world["new"][0], "val", 3))
    _, p_clf, p_db = ol.scores(feats)
    protos = ol.db.prototypes()
    emb = ol.embedder.split(feats)[1]  # the database's part of the raw features
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        protos / np.linalg.norm(protos, axis=1, keepdims=True)).T
    z = np.exp((cos - cos.max(axis=1, keepdims=True)) / 0.04)
    np.testing.assert_allclose(p_db, z / z.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)
    with_knn = OnlineLearningSystem(world["model"], tmp_path / "db", whiten=False)  # the default exemplar search
    assert not np.allclose(with_knn.scores(feats)[2], p_db)
    for bad in (-1, 1.5, True):
        with pytest.raises(OnlineError, match="knn"):
            OnlineLearningSystem(world["model"], tmp_path / "db", knn=bad)


@pytest.mark.parametrize("keep_vectors", [True, False])
def test_incremental_update_replays_old_roles(world, tmp_path, keep_vectors):
    """Also without kept vectors: the replayed exemplars then come back from the index."""
    ol = OnlineLearningSystem(world["model"], tmp_path / "db", data_root=world["old_train"], keep_vectors=keep_vectors)
    assert ol.db.keep_vectors is keep_vectors
    for name in world["new"]:
        ol.add_new_role(name, imgs(world, name, n=3))
    names = world["old"] + world["new"]
    val = [p for c in names for p in imgs(world, c, "val")]
    y = np.array([i for i, c in enumerate(names) for _ in imgs(world, c, "val")])

    def acc(part):
        p = ol.scores(ol.embed(val), classifier_weight=1.0)[1].argmax(1)
        mask = y < OLD if part == "old" else y >= OLD
        return float(np.mean(p[mask] == y[mask]))

    old_before, new_before = acc("old"), acc("new")
    extra = [p for c in world["new"] for p in imgs(world, c)[3:]]
    labels = [c for c in world["new"] for _ in imgs(world, c)[3:]]
    report = ol.incremental_update(extra, labels)
    assert report["replayed"] > 0 and report["loss_after"] < report["loss_before"]
    assert acc("old") >= old_before - 1 / 24  # at most one of 24 old-role images lost
    assert acc("new") >= new_before
    assert [r["exemplars"] for r in ol.list_roles()][OLD:] == [6, 6]


def test_remove_role_and_add_images(world, tmp_path):
    db_path = tmp_path / "db"
    ol = OnlineLearningSystem(world["model"], db_path, data_root=world["old_train"])
    a, b = world["new"]
    ol.add_new_role(a, imgs(world, a, n=3))
    ol.add_new_role(b, imgs(world, b, n=3))
    assert ol.add_images(a, imgs(world, a)[3:5]) == 5
    ol.remove_role(world["old"][0])
    roles = ol.list_roles()
    assert [r["name"] for r in roles] == world["old"][1:] + [a, b] and [r["id"] for r in roles] == list(range(5))
    answers = ol.identify(imgs(world, world["old"][0], "val"), k=5)
    assert all(world["old"][0] not in {x["role"] for x in ans} for ans in answers)
    saved = ol.save_model(tmp_path / "m.pth")
    assert OnlineLearningSystem(saved, db_path).list_roles()[3]["exemplars"] == 5
    with pytest.raises(OnlineError, match="unknown role"):
        ol.remove_role(world["old"][0])  # removed already


def test_cli_enroll_and_add_role(world, tmp_path, capsys):
    from animeai.cli import main

    db = tmp_path / "db"
    assert main(["enroll", "--model", str(world["model"]), "--db", str(db), "--data", str(world["old_train"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["exemplars"] for r in out["roles"]] == [6] * OLD
    name = world["new"][0]
    folder = world["data"] / "train" / name
    assert main(["add-role", "--model", str(world["model"]), "--db", str(db), "--name", "Ünïcødé 角色", str(folder),
                 "--save-model", str(tmp_path / "out.pth")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["id"] == OLD and out["roles"][-1]["exemplars"] == 6
    assert main(["add-role", "--model", str(tmp_path / "out.pth"), "--db", str(db), "--name", "Ünïcødé 角色",
                 str(folder)]) == 2
    assert "already exists" in capsys.readouterr().err
    # re-enrolling with --no-keep-vectors makes the database lean (no float32 copy), with the same roles
    assert main(["enroll", "--model", str(tmp_path / "out.pth"), "--db", str(db), "--data", str(world["old_train"]),
                 "--no-keep-vectors"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["exemplars"] for r in out["roles"]] == [6] * OLD + [6]
    from animeai.online.feature_db import FeatureDB

    lean = FeatureDB.load(db)
    assert lean.keep_vectors is False and lean._vec.nbytes == 0 and lean.num_vectors == 6 * (OLD + 1)
    assert lean.aux_dim == 1280 and len(lean.aux_of(OLD)) == 6  # the head features survive the re-enrolment
    # --embedding penultimate: a database of the head features themselves; naming another for it is refused
    pen = tmp_path / "pen"
    assert main(["enroll", "--model", str(world["model"]), "--db", str(pen), "--data", str(world["old_train"]),
                 "--embedding", "penultimate"]) == 0
    capsys.readouterr()
    assert FeatureDB.load(pen).dim == 1280 and FeatureDB.load(pen).aux_dim == 0
    assert main(["enroll", "--model", str(world["model"]), "--db", str(pen), "--data", str(world["old_train"]),
                 "--embedding", "multiscale"]) == 2
    assert "built with embedding 'penultimate'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_leaves_model_and_database_unchanged(world, tmp_path):
    db_path = tmp_path / "db"
    model_path = tmp_path / "model.pth"
    model_path.write_bytes(world["model"].read_bytes())
    ol = OnlineLearningSystem(model_path, db_path, data_root=world["old_train"])
    ol.add_new_role("Café", imgs(world, world["new"][0], n=3))
    probe = imgs(world, world["new"][1], "val", 2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    good = imgs(world, world["new"][1], n=2)
    before = snapshot(ol, db_path, probe, [model_path])
    cases = [
        (lambda: ol.add_new_role(world["old"][0], good), "already exists"),
        (lambda: ol.add_new_role("Cafe\u0301", good), "already exists"),  # the same name, decomposed
        (lambda: ol.add_new_role("x", []), "empty"),
        (lambda: ol.add_new_role("x", str(good[0])), "list"),
        (lambda: ol.add_new_role("", good), "empty"),
        (lambda: ol.add_new_role(" padded", good), "white space"),
        (lambda: ol.add_new_role("a\x00b", good), "control"),
        (lambda: ol.add_new_role("x", [bad / "empty.jpg", bad / "text.png"]), "all image"),
        (lambda: ol.add_new_role("x", [good[0], bad / "text.png", bad / "missing.jpg"]), "2 of 3"),
        (lambda: ol.add_images("nobody", good), "unknown role"),
        (lambda: ol.add_images("Café", [bad / "empty.jpg"]), "unreadable"),
        (lambda: ol.remove_role("nobody"), "unknown role"),
        (lambda: ol.incremental_update(good, ["Café"]), "one label per image"),
        (lambda: ol.incremental_update(good, ["Café", "nobody"]), "unknown role"),
        (lambda: ol.identify([bad / "text.png"]), "unreadable"),
    ]
    for call, message in cases:
        with pytest.raises(OnlineError, match=message) as info:
            call()
        if message in ("all image", "2 of 3", "unreadable"):
            assert "text.png" in str(info.value) or "empty.jpg" in str(info.value)
        assert snapshot(ol, db_path, probe, [model_path]) == before, message
    with pytest.raises(OnlineError) as info:
        ol.add_new_role("x", [good[0], bad / "text.png", bad / "missing.jpg"])
    assert "text.png: not a recognised image format" in str(info.value) and "missing.jpg: file not found" in str(
        info.value)
    # skip_bad: a partial success that reports what it skipped
    with pytest.warns(UserWarning, match="skipped 1"):
        new_id = ol.add_new_role("x", [good[0], bad / "text.png"], skip_bad=True)
    assert ol.list_roles()[new_id]["exemplars"] == 1 and [e.path.name for e in ol.last_skipped] == ["text.png"]
    assert ol.identify([good[0], bad / "text.png"], skip_bad=True)[1] == []


def test_bad_model_files(world, tmp_path):
    db = tmp_path / "db"
    pickle = tmp_path / "pickle.pth"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(OnlineError, match="pickle"):
        OnlineLearningSystem(pickle, db)
    other_kind = tmp_path / "judge.pth"
    save_model_file(other_kind, {"w": torch.zeros(1)}, {"kind": "judge"})
    with pytest.raises(OnlineError, match="not a classifier"):
        OnlineLearningSystem(other_kind, db)
    assert not db.exists()


def test_database_of_another_model_or_damaged(world, tmp_path):
    from animeai.checkpoint import read_model_file

    db = tmp_path / "db"
    OnlineLearningSystem(world["model"], db)
    tensors, meta = read_model_file(world["model"])
    tensors["conv_stem.weight"] = tensors["conv_stem.weight"] * 1.01  # another backbone
    other = tmp_path / "other.pth"
    save_model_file(other, tensors, meta)
    files = {p: p.read_bytes() for p in db.rglob("*") if p.is_file()}
    with pytest.raises(FeatureDBError, match="built by another model"):
        OnlineLearningSystem(other, db)
    small = tmp_path / "small"
    FeatureDB(64, "x").save(small)
    with pytest.raises(FeatureDBError, match="64-d"):
        OnlineLearningSystem(world["model"], small)
    assert {p: p.read_bytes() for p in db.rglob("*") if p.is_file()} == files

    gen = db / (db / "CURRENT").read_text().strip()
    manifest = gen / "manifest.json"
    good = manifest.read_bytes()
    vectors = (gen / "vectors.npy").read_bytes()
    for damage, message in [
        (lambda: manifest.write_text("{not json"), "manifest.json: damaged manifest"),
        (lambda: manifest.write_text(good.decode().replace('"format_version": 1', '"format_version": 9')),
         "version 9 is not supported"),
        (lambda: (gen / "index.faiss").rename(gen / "gone"), "index.faiss: missing"),
        (lambda: (gen / "vectors.npy").write_bytes(b"\x93NUMPY" + b"0" * 100), "vectors.npy: damaged"),
    ]:
        damage()
        with pytest.raises(FeatureDBError, match=message):
            FeatureDB.load(db)
        manifest.write_bytes(good)
        (gen / "vectors.npy").write_bytes(vectors)
        if (gen / "gone").exists():
            (gen / "gone").rename(gen / "index.faiss")
    # a file that is not a FAISS index, with a manifest that agrees with it: read_index refuses it
    import hashlib

    junk = b"this is not a faiss index" * 10
    (gen / "index.faiss").write_bytes(junk)
    m = json.loads(good)
    m["files"]["index.faiss"] = {"size": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}
    manifest.write_text(json.dumps(m))
    with pytest.raises(FeatureDBError, match="index.faiss: not a FAISS index"):
        FeatureDB.load(db)
    (db / "CURRENT").unlink()
    (db / "notes.txt").write_text("x")
    with pytest.raises(FeatureDBError, match="no feature database"):
        OnlineLearningSystem(world["model"], db)


# ------------------------------------------------------------------------------------------ the database


def _db(n_roles=3, per_role=20, dim=32, kind="auto", seed=0):
    rng = np.random.default_rng(seed)
    db = FeatureDB(dim, "h", index_kind=kind)
    for r in range(n_roles):
        db.add_role(f"r{r}", rng.normal(size=(per_role, dim)) + 3 * np.eye(dim)[r])
    return db


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_index_kinds_persist_and_skip_removed(kind, tmp_path):
    db = _db(n_roles=4, per_role=100, kind=kind)
    db.rebuild()
    db.remove_role(1)
    q = np.eye(32, dtype=np.float32)[:4] * 3
    s, r = db.search(q, 10)
    assert (r >= 0).all() and (r < 3).all()  # role 1 gone; later roles moved down
    db.save(tmp_path / "db")
    back = FeatureDB.load(tmp_path / "db", expect_dim=32, expect_model_hash="h")
    assert back.role_names() == ["r0", "r2", "r3"] and back.role_counts() == [100] * 3
    s2, r2 = back.search(q, 10)
    np.testing.assert_array_equal(r, r2)
    np.testing.assert_allclose(s, s2, rtol=1e-6)
    np.testing.assert_array_equal(back.prototypes(), db.prototypes())


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_database_without_kept_vectors(kind, tmp_path):
    """keep_vectors=False: the index is the only copy of the vectors. Searches, role vectors (reconstructed:
    exact, or 8-bit for the SQ8 re-ranking kind), removal, save/load and rebuild behave as with kept vectors."""
    rng = np.random.default_rng(0)
    data = [rng.normal(size=(100, 32)) + 8 * np.eye(32)[r] for r in range(4)]
    kept, lean = FeatureDB(32, "h", index_kind=kind), FeatureDB(32, "h", index_kind=kind, keep_vectors=False)
    for db in (kept, lean):
        for r in range(4):
            db.add_role(f"r{r}", data[r])
    assert lean.index_spec == "Flat"  # exact until the first rebuild trains the kind on everything added
    for db in (kept, lean):
        db.rebuild()
    assert lean.index_spec == kept.index_spec == choose_index(400, 32, kind)
    assert lean._vec.nbytes == 0 and kept._vec.nbytes > 0
    lossy = "SQ8" in lean.index_spec
    tol = 0.02 if lossy else 1e-6
    truth = np.array([0, 1, 2, 3] * 5)
    q = np.random.default_rng(5).normal(size=(20, 32)) + 8 * np.eye(32)[truth]

    def agree(db_a, db_b, k):  # identical results; the 8-bit kind: the same role found (for queries of a live role)
        (_, ia, ra), (_, ib, rb) = db_a.search_vectors(q, k), db_b.search_vectors(q, k)
        if lossy:
            live = np.isin(truth, [0, 2, 3]) if db_a.num_roles == 3 else slice(None)
            np.testing.assert_array_equal(ra[live, 0], rb[live, 0])
        else:
            np.testing.assert_array_equal(ia, ib)

    agree(lean, kept, 5)
    assert (lean.search(q, 1)[1][:, 0] == truth).all()
    for r in range(4):
        (v1, n1), (v2, n2) = kept.vectors_of(r), lean.vectors_of(r)
        np.testing.assert_allclose(v2, v1, atol=tol)
        np.testing.assert_allclose(np.linalg.norm(v2, axis=1), 1, rtol=1e-5)
        np.testing.assert_array_equal(n2, n1)
    for db in (kept, lean):
        db.remove_role(1)
    assert lean.role_names() == ["r0", "r2", "r3"] and lean.num_vectors == 300
    agree(lean, kept, 10)
    gen = lean.save(tmp_path / "db")
    assert np.load(gen / "vectors.npy").shape == (0, 32)
    back = FeatureDB.load(tmp_path / "db", expect_dim=32)
    assert back.keep_vectors is False and back._vec.nbytes == 0
    agree(back, lean, 5)
    np.testing.assert_allclose(back.role_sums()[0], kept.role_sums()[0], atol=100 * tol)
    back.rebuild()
    agree(back, kept, 3)
    np.testing.assert_allclose(back.vectors_of(0)[0], kept.vectors_of(0)[0], atol=2 * tol)


def test_prepare_trains_the_kind_before_a_bulk_load():
    rng = np.random.default_rng(3)
    data = [rng.normal(size=(300, 32)) + 8 * np.eye(32)[r] for r in range(4)]
    db = FeatureDB(32, "h", index_kind="ivfpq", keep_vectors=False)
    spec = db.prepare(np.concatenate(data)[::2], expected_vectors=1200)
    assert spec == choose_index(1200, 32, "ivfpq") == db.index_spec and db._index.is_trained
    for r in range(4):
        db.add_role(f"r{r}", data[r][:150])
        db.add(r, data[r][150:])
    assert db.index_spec == spec and db.num_vectors == 1200  # the bulk load kept the prepared kind
    truth = np.arange(20) % 4
    q = rng.normal(size=(20, 32)) + 8 * np.eye(32)[truth]
    assert (db.search(q, 1)[1][:, 0] == truth).all()
    with pytest.raises(OnlineError, match="prepare\\(\\) is for an empty database; this one holds 1200 vectors"):
        db.prepare(data[0], 1200)
    with pytest.raises(OnlineError, match="expected_vectors must be a positive integer"):
        FeatureDB(32, "h").prepare(data[0], 0)


def test_index_choice_and_device_rules():
    assert choose_index(1000, 512) == "Flat"
    assert choose_index(1_000_000, 512).startswith("IVF") and choose_index(1_000_000, 512).endswith(",Flat")
    big = choose_index(10_000_000, 512)
    assert big == "OPQ128_512,IVF16384_HNSW32,PQ128x4fsr,Refine(SQ8)"
    assert choose_index(10_000_000, 512, "ivfpq") == "IVF16384_HNSW32,PQ128x4fsr,Refine(SQ8)"
    # plain PQ needs a divisor of the dimension; OPQ rotates into 4m dimensions and needs none
    assert choose_index(10_000_000, 1000, "ivfpq").startswith("IVF16384_HNSW32,PQ250x4fsr")
    assert choose_index(10_000_000, 1001, "ivfpq").startswith("IVF16384_HNSW32,PQ143x4fsr")  # 1001 = 7 * 143
    assert choose_index(10_000_000, 1001).startswith("OPQ250_1000,")
    assert choose_index(10_000_000, 1792).startswith("OPQ448_1792,")  # the multiscale descriptor's dimension
    assert "HNSW" not in choose_index(1_000_000, 512, "ivfpq")  # below LARGE_NLIST: exact coarse assignment
    assert choose_index(5, 8, "HNSW16,Flat") == "HNSW16,Flat"
    assert faiss_device("auto") == "cpu" and faiss_device("cpu") == "cpu"
    if not hasattr(faiss, "StandardGpuResources"):
        with pytest.raises(OnlineError, match="no GPU support"):
            faiss_device("gpu")
    with pytest.raises(OnlineError, match="not a valid FAISS"):
        FeatureDB(8, "h", index_kind="NoSuchIndex42")


def test_two_level_kmeans_finds_the_clusters():
    from animeai.online.feature_db import two_level_kmeans

    rng = np.random.default_rng(0)
    k, dim = 100, 16
    centres = rng.normal(size=(k, dim)).astype(np.float32) * 10
    x = (centres[rng.integers(0, k, 20_000)] + rng.normal(size=(20_000, dim))).astype(np.float32)
    got = two_level_kmeans(x, k, faiss)
    assert got.shape == (k, dim) and got.dtype == np.float32
    # as good as one-level k-means (FAISS's, same iterations): objective and true clusters found
    one = faiss.Kmeans(dim, k, niter=20, seed=1)
    one.train(x)

    def objective(c):
        return float(faiss.knn(x, np.ascontiguousarray(c), 1)[0].sum())

    def found(c):  # share of the true centres with a centroid within 2 (the noise spreads points ~4 from theirs)
        return float((np.sqrt(((centres[:, None] - c[None]) ** 2).sum(-1)).min(1) < 2).mean())

    assert objective(got) <= 1.25 * objective(one.centroids)
    assert found(got) >= found(one.centroids) - 0.1 and found(got) >= 0.5
    # tiny inputs: exactly k centroids whatever the cluster sizes; too few points is an error naming both counts
    assert two_level_kmeans(x[:150], 100, faiss).shape == (100, dim)
    with pytest.raises(FeatureDBError, match="100 centroids need at least 100 training vectors, got 99"):
        two_level_kmeans(x[:99], 100, faiss)


def test_large_ivf_trains_in_two_levels(monkeypatch):
    """From LARGE_NLIST lists on, the database trains the coarse quantizer with two_level_kmeans and finds the
    same neighbours as exact search."""
    import animeai.online.feature_db as fdb

    calls = []
    real = fdb.two_level_kmeans
    monkeypatch.setattr(fdb, "two_level_kmeans", lambda x, k, f, **kw: calls.append((len(x), k)) or real(x, k, f,
                                                                                                         **kw))
    nlist = fdb.LARGE_NLIST
    rng = np.random.default_rng(1)
    db = FeatureDB(16, "h", index_kind="flat", params=fdb.SearchParams(nprobe=64, ef_search=256))
    centres = rng.normal(size=(50, 16))
    for r in range(50):
        db.add_role(f"r{r}", centres[r] + 0.3 * rng.normal(size=(nlist * 2 // 50, 16)))
    assert db.rebuild(f"IVF{nlist}_HNSW32,Flat") == f"IVF{nlist}_HNSW32,Flat"
    assert calls == [(db.num_vectors, nlist)]
    ivf = faiss.extract_index_ivf(db._cpu_index())
    assert ivf.nlist == nlist and ivf.quantizer.ntotal == nlist and ivf.ntotal == db.num_vectors
    hnsw = faiss.downcast_index(ivf.quantizer).hnsw
    assert hnsw.efSearch == 256  # the search setting; adds assign with a narrower beam, restored afterwards
    with fdb.adding(db._index):
        assert hnsw.efSearch == fdb.ADD_EF_SEARCH
    assert hnsw.efSearch == 256
    q = centres[:20] + 0.3 * rng.normal(size=(20, 16))
    _, ids, _ = db.search_vectors(q, 5)
    exact = FeatureDB(16, "h", index_kind="flat")
    for r in range(50):
        exact.add_role(f"r{r}", db.vectors_of(r)[0])
    _, ids_exact, _ = exact.search_vectors(q, 5)
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, ids_exact)])
    assert overlap >= 0.9


def test_concurrent_add_and_search(tmp_path):
    db = _db(n_roles=4, per_role=50, dim=32)
    errors, adds, per_add = [], 40, 5
    stop = threading.Event()
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(per_add, 32)) for _ in range(adds)]

    def searcher():
        q = np.random.default_rng(2).normal(size=(8, 32))
        try:
            while not stop.is_set():
                s, r = db.search(q, 5)
                assert ((r >= 0) & (r < 4)).all() and np.isfinite(s).all()
                assert db.prototype_scores(q).shape == (8, 4)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def adder(part):
        try:
            for i in part:
                db.add(i % 4, batches[i])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    searchers = [threading.Thread(target=searcher) for _ in range(3)]
    adders = [threading.Thread(target=adder, args=(range(k, adds, 2),)) for k in range(2)]
    for t in searchers + adders:
        t.start()
    for t in adders:
        t.join()
    db.save(tmp_path / "db")  # a save during searches
    stop.set()
    for t in searchers:
        t.join()
    assert not errors, errors
    assert db.num_vectors == db.ntotal == 4 * 50 + adds * per_add
    assert db.role_counts() == [50 + adds * per_add // 4] * 4
    assert FeatureDB.load(tmp_path / "db").num_vectors == db.num_vectors


SAVER = """
import sys, numpy as np, faiss
faiss.omp_set_num_threads(1)
from animeai.online.feature_db import FeatureDB
path = sys.argv[1]
rng = np.random.default_rng(0)
db = FeatureDB(16, "h")
db.add_role("r0", rng.normal(size=(2000, 16)), metadata={"version": 0})
i = 0
while True:
    i += 1
    db.add(0, rng.normal(size=(50, 16)))
    db.roles[0]["version"] = i
    db.save(path)
    print(i, flush=True)
"""


def test_kill_during_save_leaves_a_loadable_database(tmp_path):
    path = tmp_path / "db"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rnd = random.Random(0)
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, env=env, text=True)
        first = proc.stdout.readline()  # one full save done, the next ones under way
        assert first.strip(), "the saver did not start"
        time.sleep(rnd.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = [int(line) for line in [first, *proc.stdout.read().split()] if str(line).strip()]
        db = FeatureDB.load(path, expect_dim=16, expect_model_hash="h")
        version = db.roles[0]["version"]
        assert version in (done[-1], done[-1] + 1), (attempt, version, done[-1])  # previous or new, never broken
        assert db.num_vectors == 2000 + 50 * version
        assert db.role_counts() == [2000 + 50 * version]


# ------------------------------------------------------------------------------------------ embeddings


def test_multiscale_embedding_parts(world, tmp_path):
    """The default embedding: head features identical to the classifier's penultimate features, then the database
    descriptor of three unit-norm GeM/sqrt parts (unit norm in all); the database keeps the head features as aux."""
    from animeai.online.embedding import Embedder

    ol = OnlineLearningSystem(world["model"], tmp_path / "db", data_root=world["old_train"])
    assert ol.embedding == "multiscale" and ol.db.aux_dim == ol.embedder.head_dim == 1280
    paths = imgs(world, world["old"][0], "val", 3)
    feats = ol.embed(paths)
    head, desc = ol.embedder.split(feats)
    np.testing.assert_allclose(head, ol.clf.embed_paths(paths).numpy(), rtol=1e-4, atol=1e-5)
    assert desc.shape == (3, ol.db.dim) and ol.db.dim == 1280 + 320 + 192
    flipped = ol.embed([Image.open(p).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in paths])
    np.testing.assert_allclose(ol.embedder.split(flipped)[1], desc, atol=1e-4)  # mirror-invariant descriptor
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, rtol=1e-5)
    assert (desc >= 0).all()  # GeM of post-activation maps, square-rooted: never negative
    # aux rows are the stored exemplars' head features, in the order of their vectors
    train = sorted((world["old_train"] / world["old"][0]).iterdir())
    np.testing.assert_allclose(ol.db.aux_of(0), ol.clf.embed_paths(train).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(OnlineError, match="embedding 'nope'"):
        Embedder(ol.clf, "nope")


def test_embedding_kinds_are_kept_per_database(world, tmp_path):
    """A database remembers its embedding (through its model hash): reopening without naming one uses it; naming
    another is a clear error; the penultimate kind indexes the head features themselves (no aux)."""
    pen = OnlineLearningSystem(world["model"], tmp_path / "pen", data_root=world["old_train"], embedding="penultimate")
    assert pen.db.aux_dim == 0 and pen.db.dim == pen.dim == 1280
    multi = OnlineLearningSystem(world["model"], tmp_path / "multi", data_root=world["old_train"])
    assert multi.model_hash != pen.model_hash and pen.model_hash == pen.backbone_hash
    for name in world["new"]:
        pen.add_new_role(name, imgs(world, name, n=4))
        multi.add_new_role(name, imgs(world, name, n=4))
    probe = imgs(world, world["new"][1], "val", 2)
    assert OnlineLearningSystem(world["model"], tmp_path / "pen").embedding == "penultimate"
    again = OnlineLearningSystem(world["model"], tmp_path / "multi")
    assert again.embedding == "multiscale" and again.identify(probe) == multi.identify(probe)
    with pytest.raises(OnlineError, match="built with embedding 'penultimate'"):
        OnlineLearningSystem(world["model"], tmp_path / "pen", embedding="multiscale")
    # the imprinted rows come from the head features either way: the same classifier row in both systems
    np.testing.assert_allclose(pen.head.weight.detach().numpy(), multi.head.weight.detach().numpy(), rtol=1e-3,
                               atol=1e-4)


def test_database_aux_features(tmp_path):
    """aux rows travel with their vectors: add, removal of another role, save/load; wrong or missing aux is an error
    that changes nothing; a name-only role has no exemplars until some are added."""
    rng = np.random.default_rng(0)
    db = FeatureDB(8, "h", aux_dim=3)
    x = [rng.normal(size=(n, 8)) for n in (4, 5)]
    a = [rng.normal(size=(n, 3)).astype(np.float32) for n in (4, 5)]
    db.add_role("a", x[0], aux=a[0])
    db.add_role("b", x[1], aux=a[1])
    for bad, match in ((None, "give aux"), (np.zeros((2, 3)), "does not fit"), (np.full((4, 3), np.nan), "NaN")):
        with pytest.raises(OnlineError, match=match):
            db.add(0, x[0], aux=bad)
    with pytest.raises(OnlineError, match="no auxiliary"):
        FeatureDB(8, "h").add_role("c", x[0], aux=a[0])
    assert db.role_counts() == [4, 5]
    db.add_role("c", name_only=True)
    assert db.role_counts() == [4, 5, 0] and not db.prototypes()[2].any()
    db.add(2, x[0][:2], aux=a[0][:2])
    db.remove_role(0)
    np.testing.assert_array_equal(db.aux_of(0), a[1])
    np.testing.assert_array_equal(db.aux_of(1), a[0][:2])
    db.save(tmp_path / "db")
    back = FeatureDB.load(tmp_path / "db", expect_dim=8)
    assert back.aux_dim == 3 and back.role_names() == ["b", "c"]
    np.testing.assert_array_equal(back.aux_of(0), a[1])
    np.testing.assert_array_equal(back.aux_of(1), a[0][:2])
    gen = next(p for p in (tmp_path / "db").iterdir() if p.name.startswith("gen-"))
    np.save(gen / "aux.npy", np.zeros((3, 3), np.float32))  # damaged: a file the manifest did not record
    with pytest.raises(FeatureDBError, match="aux.npy"):
        FeatureDB.load(tmp_path / "db")


def test_trained_rows_split_the_trained_roles_share(world, tmp_path):
    """split_trained (the multiscale default): among trained roles identify ranks as the trained rows' softmax;
    the database decides how much goes to the roles added online, and ranks those. Without any added role the
    ranking is the classifier's."""
    ol = OnlineLearningSystem(world["model"], tmp_path / "db", data_root=world["old_train"])
    assert ol.split_trained and ol.classifier_weight == 0.0
    feats = ol.embed([p for c in world["old"] + world["new"] for p in imgs(world, c, "val", 2)])
    comb, p_clf, p_db = ol.scores(feats)
    np.testing.assert_allclose(comb, p_clf, rtol=1e-5, atol=1e-7)  # only trained roles: the classifier's ranking
    ol.add_new_role(world["new"][0], imgs(world, world["new"][0], n=4))
    comb, p_clf, p_db = ol.scores(feats)
    trained = slice(0, OLD)
    np.testing.assert_allclose(comb[:, trained].sum(1), p_db[:, trained].sum(1), rtol=1e-5)  # the database's share
    within = p_clf[:, trained] / p_clf[:, trained].sum(1, keepdims=True)  # split as the trained rows split it
    np.testing.assert_allclose(comb[:, trained] / comb[:, trained].sum(1, keepdims=True), within, rtol=1e-4)
    np.testing.assert_allclose(comb[:, OLD], p_db[:, OLD], rtol=1e-6)  # the added role: the database's evidence
    plain = OnlineLearningSystem(world["model"], tmp_path / "db", split_trained=False)
    np.testing.assert_allclose(plain.scores(feats)[0], p_db, rtol=1e-6)  # w = 0 without the split: the database


# ------------------------------------------------------------------------------------------ whitened database evidence


def test_learnt_whitening_separates_unseen_classes():
    """Classes whose members vary most along a few shared directions (pose, colour ...): a whitening learnt on some
    classes damps those directions, so nearest-prototype top-1 on *other* classes (5 shots) rises; it maps the
    learning classes' within-class covariance close to isotropic."""
    from animeai.online.embedding import learn_whitening

    rng = np.random.default_rng(0)
    d, nuisance = 64, 6
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    scales = np.full(d, 0.05)
    scales[:nuisance] = 1.0  # a few strong directions of within-class variation, shared by every class

    def classes(k, n):
        centres = rng.normal(size=(k, d)) * 0.15
        return [c + (rng.normal(size=(n, d)) * scales) @ basis.T for c in centres]

    def l2(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    learn = classes(10, 100)
    white = learn_whitening(learn)
    assert white is not None
    def spread(x):  # largest over smallest variance of the within-class covariance
        ev = np.linalg.eigvalsh(x.T @ x / len(x))
        return ev.max() / ev.min()

    within = np.concatenate([g - g.mean(0) for g in learn])
    assert spread(within @ white.proj) < spread(within) / 8  # ~400 before (halfway shrunk: not to 1)

    def top1(transform):
        hits = []
        for _ in range(5):
            unseen = classes(5, 45)
            shots = [transform(g[:5]) for g in unseen]
            protos = l2(np.stack([s.sum(0) for s in shots]))
            for i, g in enumerate(unseen):
                hits += list((transform(g[5:]) @ protos.T).argmax(1) == i)
        return float(np.mean(hits))

    plain, whitened = top1(l2), top1(white)
    print(plain, whitened)
    assert whitened > plain + 0.1, (plain, whitened)
    # what cannot give a whitening
    assert learn_whitening([learn[0]]) is None  # one class
    assert learn_whitening([g[:1] for g in learn]) is None  # one vector a class
    assert learn_whitening([np.ones((3, d)), np.ones((3, d))]) is None  # no variance


def test_whitened_database_evidence(world, tmp_path, monkeypatch):
    """The default rule: cosines in the whitening learnt from the trained roles' exemplars, the trained roles'
    lowered by the margin, softmax at T; FAISS's candidates re-scored in that space. Learnt again when a trained
    role's exemplars change, not when a role is added online; gone (plain cosines, T 0.04, no margin) when there are
    no trained exemplars to learn it from."""
    from animeai.online import system
    from animeai.online.embedding import learn_whitening

    ol = OnlineLearningSystem(world["model"], tmp_path / "db", data_root=world["old_train"], knn=0)
    assert ol.whitening is None  # 24 trained exemplars: too few for a 1,792-d covariance (plain cosines)
    monkeypatch.setattr(system, "WHITEN_MIN", 0.0)  # this test's world is tiny: learn it anyway
    ol = OnlineLearningSystem(world["model"], tmp_path / "db", knn=0)
    white = ol.whitening
    assert ol.whiten and white is not None and (ol.temperature, ol.trained_margin) == (0.02, 0.05)
    ref = learn_whitening([ol.db.vectors_of(r)[0] for r in range(OLD)])  # every exemplar: fewer than 256 a role
    np.testing.assert_allclose(white.proj, ref.proj, rtol=1e-4, atol=1e-4)
    ol.add_new_role(world["new"][0], imgs(world, world["new"][0], n=4))
    assert ol.whitening is white  # adding a role online keeps it
    feats = ol.embed([p for c in world["old"] + world["new"][:1] for p in imgs(world, c, "val", 2)])
    emb = ol.embedder.split(feats)[1]
    protos = np.stack([ol.db.vectors_of(r)[0].mean(0) for r in range(OLD + 1)])

    def expected(w, margin, temperature):
        cos = w(emb) @ w(protos / np.linalg.norm(protos, axis=1, keepdims=True)).T
        cos[:, :OLD] -= margin
        z = np.exp((cos - cos.max(axis=1, keepdims=True)) / temperature)
        return z / z.sum(axis=1, keepdims=True)

    np.testing.assert_allclose(ol.scores(feats)[2], expected(white, 0.05, 0.02), rtol=1e-3, atol=1e-6)
    # the nearest exemplars FAISS retrieves are re-scored in the whitened space
    knn = OnlineLearningSystem(world["model"], tmp_path / "db", knn=3)
    s, ids, roles = knn.db.search_vectors(emb, 3)
    q = white(emb)
    sim = q @ white(knn.db.prototypes()).T
    best = sim.copy()
    for i in range(len(q)):
        for j, r in zip(ids[i], roles[i]):
            best[i, r] = max(best[i, r], float(white(knn.db.vectors([j]))[0] @ q[i]))
    sim = 0.5 * sim + 0.5 * best
    sim[:, :OLD] -= 0.05
    for bad in ([-1], [knn.db.num_rows]):
        with pytest.raises(FeatureDBError, match="not a live vector"):
            knn.db.vectors(bad)
    z = np.exp((sim - sim.max(axis=1, keepdims=True)) / 0.02)
    np.testing.assert_allclose(knn.scores(feats)[2], z / z.sum(axis=1, keepdims=True), rtol=1e-3, atol=1e-6)
    # more exemplars of a trained role: learnt again
    ol.add_images(world["old"][0], imgs(world, world["old"][0], "val", 2))
    assert ol.whitening is not white
    # a database without trained exemplars: plain cosines with the plain rule
    bare = OnlineLearningSystem(world["model"], tmp_path / "bare")
    bare.add_new_role(world["new"][0], imgs(world, world["new"][0], n=4))
    assert bare.score_rule == {"whitened": False, "temperature": 0.04, "trained_margin": 0.0}
    given = OnlineLearningSystem(world["model"], tmp_path / "bare", temperature=0.1, trained_margin=0.2)
    assert given.score_rule == {"whitened": False, "temperature": 0.1, "trained_margin": 0.2}
    assert ol.score_rule == {"whitened": True, "temperature": 0.02, "trained_margin": 0.05}
    for bad in (-0.1, 3.0):
        with pytest.raises(OnlineError, match="trained_margin"):
            OnlineLearningSystem(world["model"], tmp_path / "db", trained_margin=bad)
