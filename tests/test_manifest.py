"""The data manifest: each image decoded once; reuse, refresh, bad files, damaged manifests, read-only roots,
concurrent processes, files that break after validation, `animeai data check`, and one manifest for Ray workers."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

import animeai.data.manifest as manifest_mod
from animeai.data.folder import DatasetError, ImageFolderDataset, build_splits, scan_folder
from animeai.data.images import ImageError, probe_images
from animeai.data.manifest import MANIFEST_NAME, Manifest, cache_path, open_manifest


def _jpeg(path: Path, color=(200, 80, 40), size=(24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return path


def _tree(root: Path, classes=("akari", "botan"), per_class: int = 3) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _jpeg(root / name / f"{i}.jpg", color=(40 * i, 60 * c, 100), size=(24 + i, 20 + c))
    return root


@pytest.fixture
def decodes(monkeypatch) -> list[Path]:
    """Every path the manifest decodes, in order (the manifest's decode function, counted)."""
    seen: list[Path] = []

    def counting(paths, **kw):
        paths = list(paths)
        seen.extend(Path(p) for p in paths)
        return probe_images(paths, **kw)

    monkeypatch.setattr(manifest_mod, "probe_images", counting)
    return seen


def _records(root: Path) -> dict[str, dict]:
    """The manifest's records by path, as dicts of its columns plus ``ok``."""
    doc = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    recs = [dict(zip(doc["columns"], f)) for f in doc["files"]]
    return {r["path"]: {**r, "ok": r["error"] is None} for r in recs}


# ----------------------------------------------------------------------------------------- built, reused


def test_built_then_reused_without_decoding_again(tmp_path, decodes):
    root = _tree(tmp_path / "chars")
    first = scan_folder(root, manifest=open_manifest(root, "auto"))
    assert len(decodes) == 6
    recs = _records(root)
    assert sorted(recs) == [f"{c}/{i}.jpg" for c in ("akari", "botan") for i in range(3)]
    size = (root / "botan/2.jpg").stat().st_size
    assert recs["botan/2.jpg"] | {"mtime_ns": 0} == {"path": "botan/2.jpg", "size": size, "mtime_ns": 0,
                                                    "label": "botan", "ok": True, "width": 26, "height": 21,
                                                    "mode": "RGB", "error": None}
    decodes.clear()
    again = scan_folder(root, manifest=open_manifest(root, "auto"))  # a new process would do exactly this
    assert decodes == []
    assert again.samples == first.samples == scan_folder(root).samples  # same result as decoding everything
    splits = build_splits(root, val_fraction=0.34, manifest="auto")
    assert decodes == [] and len(splits.train) + len(splits.val) == 6


def test_train_val_layout_shares_one_manifest(tmp_path, decodes):
    _tree(tmp_path / "d" / "train")
    _tree(tmp_path / "d" / "val", per_class=1)
    build_splits(tmp_path / "d", manifest="auto")
    assert len(decodes) == 8
    assert not (tmp_path / "d" / "train" / MANIFEST_NAME).exists()
    assert {r.split("/")[0] for r in _records(tmp_path / "d")} == {"train", "val"}
    decodes.clear()
    build_splits(tmp_path / "d", manifest="auto")
    assert decodes == []


def test_changed_added_and_removed_files_refresh_the_manifest(tmp_path, decodes):
    root = _tree(tmp_path / "chars")
    scan_folder(root, manifest=open_manifest(root, "auto"))
    decodes.clear()
    changed = _jpeg(root / "akari" / "1.jpg", size=(40, 30))  # new size and mtime
    added = _jpeg(root / "botan" / "new.jpg")
    (root / "botan" / "0.jpg").unlink()
    result = scan_folder(root, manifest=open_manifest(root, "auto"))
    assert sorted(decodes) == sorted([changed, added])
    recs = _records(root)
    assert "botan/0.jpg" not in recs and recs["akari/1.jpg"]["width"] == 40 and "botan/new.jpg" in recs
    assert len(result.samples) == 6
    # only the mtime changed (same bytes, touched): decoded again too
    decodes.clear()
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    scan_folder(root, manifest=open_manifest(root, "auto"))
    assert decodes == [changed]
    decodes.clear()
    scan_folder(root, manifest=open_manifest(root, "auto"), refresh=True)
    assert len(decodes) == 6


def test_a_bad_file_is_recorded_with_its_reason_and_reported_without_decoding(tmp_path, decodes, capsys):
    root = _tree(tmp_path / "chars")
    bad = root / "akari" / "cut.jpg"
    good = (root / "akari" / "0.jpg").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    (root / "botan" / "empty.png").write_bytes(b"")
    first = scan_folder(root, manifest=open_manifest(root, "auto"))
    recs = _records(root)
    assert recs["akari/cut.jpg"]["ok"] is False and "runcated" in recs["akari/cut.jpg"]["error"]
    assert recs["botan/empty.png"]["error"] == "empty file (0 bytes)"
    decodes.clear()
    again = scan_folder(root, manifest=open_manifest(root, "auto"))
    assert decodes == []
    assert [str(e) for e in again.errors] == [str(e) for e in first.errors]
    assert {e.path for e in again.errors} == {bad, root / "botan" / "empty.png"}
    with pytest.raises(DatasetError, match="strict.*cut.jpg"):
        scan_folder(root, manifest=open_manifest(root, "auto"), strict=True)
    assert decodes == []


def test_access_problems_are_checked_every_run_never_recorded(tmp_path, decodes):
    root = _tree(tmp_path / "chars")
    (root / "akari" / "link.jpg").symlink_to(tmp_path / "nowhere.jpg")
    result = scan_folder(root, manifest=open_manifest(root, "auto"))
    assert any("broken symbolic link" in str(e) for e in result.errors)
    assert "akari/link.jpg" not in _records(root)
    decodes.clear()
    before = (root / MANIFEST_NAME).stat().st_mtime_ns
    scan_folder(root, manifest=open_manifest(root, "auto"))
    assert decodes == [root / "akari" / "link.jpg"]  # checked again (cheap: it fails before any decoding)
    assert (root / MANIFEST_NAME).stat().st_mtime_ns == before  # and nothing to write back


def test_the_pixel_limit_applies_to_recorded_sizes(tmp_path, decodes):
    root = _tree(tmp_path / "chars")
    files = [(p, p.parent.name) for p in sorted(root.glob("*/*.jpg"))]
    Manifest(root).update(files)
    decodes.clear()
    small = Manifest(root).update(files, max_pixels=24 * 20)
    assert decodes == []  # refused from the recorded width x height
    refused = [r for r in small if isinstance(r, ImageError)]
    assert len(refused) == 5 and all("image too large" in e.reason for e in refused)
    # an image refused as too large is decoded again when the limit is raised
    big = _jpeg(root / "akari" / "big.jpg", size=(64, 64))
    files.append((big, "akari"))
    Manifest(root).update(files, max_pixels=1000)
    assert _records(root)["akari/big.jpg"]["ok"] is False and _records(root)["akari/big.jpg"]["width"] == 64
    decodes.clear()
    Manifest(root).update(files, max_pixels=10_000)
    assert decodes == [big] and _records(root)["akari/big.jpg"]["ok"] is True


# ------------------------------------------------------------------------------- damaged, foreign, located


_HEAD = b'{"format": "animeai-data-manifest", "version": 1, "columns": ' + json.dumps(
    ["path", "size", "mtime_ns", "label", "width", "height", "mode", "error"]).encode()


@pytest.mark.parametrize("content, why", [
    (b"{not json", "cannot be read"),
    (b"\xff\xfe\x00garbage", "cannot be read"),
    (b'{"format": "something-else", "files": []}', "not an animeai data manifest"),
    (b'{"format": "animeai-data-manifest", "version": 99, "files": []}', "format version 99"),
    (b'{"format": "animeai-data-manifest", "version": 1, "columns": ["path"], "files": []}', "columns"),
    (_HEAD + b', "files": {}}', 'no "files" list'),
    (_HEAD + b', "files": [["akari/0.jpg", "x", 1, "akari", 24, 20, "RGB", null]]}', "record 0 is malformed"),
    (_HEAD + b', "files": [["akari/0.jpg", 1, 1, "akari", 0, 20, "RGB", null]]}', "record 0 is malformed"),
    (_HEAD + b', "files": [["akari/0.jpg", 1, 1, "akari", null, null, "RGB", "bad"]]}', "record 0 is malformed"),
    (_HEAD + b', "files": [["../x.jpg", 1, 1, null, null, null, null, "e"]]}', "outside the data root"),
    (b"[]", "not an animeai data manifest"),
])
def test_a_damaged_or_foreign_manifest_is_rebuilt_with_a_message(tmp_path, decodes, capsys, content, why):
    root = _tree(tmp_path / "chars")
    (root / MANIFEST_NAME).write_bytes(content)
    result = scan_folder(root, manifest=open_manifest(root, "auto"))
    err = capsys.readouterr().err
    assert f"{root / MANIFEST_NAME} " in err and why in err and "rebuilding" in err
    assert len(decodes) == 6 and len(result.samples) == 6
    assert len(_records(root)) == 6  # rewritten in the right format


def test_a_lying_manifest_is_not_trusted_for_changed_files(tmp_path, decodes):
    root = _tree(tmp_path / "chars")
    scan_folder(root, manifest=open_manifest(root, "auto"))
    doc = json.loads((root / MANIFEST_NAME).read_text())
    for f in doc["files"]:
        f[1] += 1  # the size: as if every file had changed since
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    decodes.clear()
    scan_folder(root, manifest=open_manifest(root, "auto"))
    assert len(decodes) == 6


def test_read_only_root_uses_the_cache_folder(tmp_path, decodes, monkeypatch, capsys):
    root = _tree(tmp_path / "chars")
    monkeypatch.setenv("ANIMEAI_CACHE", str(tmp_path / "cache"))
    real = manifest_mod._writable_folder
    monkeypatch.setattr(manifest_mod, "_writable_folder", lambda folder: False if folder == root else real(folder))
    m = open_manifest(root, "auto")
    assert m.path == cache_path(root) and m.path.parent == tmp_path / "cache" / "manifests"
    assert "not writable" in capsys.readouterr().err
    scan_folder(root, manifest=m)
    assert m.path.is_file() and not (root / MANIFEST_NAME).exists()
    assert json.loads(m.path.read_text())["root"] == str(root.resolve())
    decodes.clear()
    scan_folder(root, manifest=open_manifest(root, "auto"))
    assert decodes == []
    assert cache_path(tmp_path / "other") != cache_path(root)  # one cache file per data root


def test_read_only_root_with_a_manifest_beside_it_is_reused(tmp_path, decodes, monkeypatch):
    root = _tree(tmp_path / "chars")
    scan_folder(root, manifest=open_manifest(root, "auto"))  # e.g. written by whoever prepared the data
    monkeypatch.setenv("ANIMEAI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(manifest_mod, "_writable_folder", lambda folder: False)
    decodes.clear()
    scan_folder(root, manifest=open_manifest(root, "auto"))
    assert decodes == []


def test_a_folder_whose_mode_grants_no_write_is_left_alone_even_for_root(tmp_path, monkeypatch):
    """Shared datasets are often ``r-x``: root could still write there, but the manifest goes to the cache."""
    root = _tree(tmp_path / "chars")
    monkeypatch.setenv("ANIMEAI_CACHE", str(tmp_path / "cache"))
    root.chmod(0o555)
    try:
        m = open_manifest(root, "auto")
        scan_folder(root, manifest=m)
        assert m.path == cache_path(root) and m.path.is_file()
        assert sorted(p.name for p in root.iterdir()) == ["akari", "botan"]  # nothing written beside the data
    finally:
        root.chmod(0o755)


def test_explicit_manifest_path_and_a_manifest_of_another_root(tmp_path, decodes, capsys):
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b", per_class=1)
    path = tmp_path / "manifests" / "a.json"
    scan_folder(a, manifest=open_manifest(a, str(path)))
    assert path.is_file() and not (a / MANIFEST_NAME).exists()
    decodes.clear()
    scan_folder(b, manifest=open_manifest(b, str(path)))  # same file, another root: not trusted
    assert "belongs to another data root" in capsys.readouterr().err and len(decodes) == 2
    assert open_manifest(a, "off") is None and open_manifest(a, None) is None


def test_an_unwritable_explicit_location_is_a_clear_error(tmp_path):
    root = _tree(tmp_path / "chars")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=f"cannot use the data manifest {blocker / 'm.json'}.*--manifest"):
        scan_folder(root, manifest=open_manifest(root, str(blocker / "m.json")))


def test_two_processes_validate_once_under_the_lock(tmp_path, monkeypatch, capsys):
    root = _tree(tmp_path / "chars")
    started, release, seen = threading.Event(), threading.Event(), []

    def slow(paths, **kw):
        paths = list(paths)
        seen.extend(paths)
        started.set()
        release.wait(10)
        return probe_images(paths, **kw)

    monkeypatch.setattr(manifest_mod, "probe_images", slow)
    first = threading.Thread(target=scan_folder, args=(root,), kwargs={"manifest": Manifest(root)})
    first.start()
    assert started.wait(10)
    results = []
    second = threading.Thread(target=lambda: results.append(scan_folder(root, manifest=Manifest(root))))
    second.start()  # blocks on the lock (flock: per open file, so threads contend like processes)
    second.join(0.5)
    assert second.is_alive()
    release.set()
    first.join(10)
    second.join(10)
    assert len(seen) == 6 and len(results[0].samples) == 6  # the second found everything validated
    assert "waiting for" in capsys.readouterr().err


def test_no_temp_files_are_left_and_writes_are_whole(tmp_path):
    root = _tree(tmp_path / "chars")
    scan_folder(root, manifest=open_manifest(root, "auto"))
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".animeai-")]
    assert sorted(leftovers) == [MANIFEST_NAME, MANIFEST_NAME + ".lock"]


# ------------------------------------------------------------------------ files that break after validation


def test_a_file_truncated_after_the_manifest_is_skipped_or_an_error(tmp_path, capsys):
    root = _tree(tmp_path / "chars")
    samples = scan_folder(root, manifest=open_manifest(root, "auto")).samples
    broken = samples[1][0]
    broken.write_bytes(broken.read_bytes()[:-200])
    ds = ImageFolderDataset(samples, None, on_error="skip")
    img, label = ds[1]  # the next sample takes its place; the epoch keeps its length
    assert img.size == Image.open(samples[2][0]).size and label == samples[2][1]
    err = capsys.readouterr().err
    assert f"skipped {broken}: " in err and "runcated" in err and "since the data was validated" in err
    ds[1]
    assert capsys.readouterr().err == ""  # reported once per file
    with pytest.raises(ImageError, match="runcated") as info:
        ImageFolderDataset(samples, None, on_error="raise")[1]
    assert info.value.path == broken
    # the next run sees the changed size and reports it up front
    result = scan_folder(root, manifest=open_manifest(root, "auto"))
    assert [e.path for e in result.errors] == [broken]


def test_dataset_skip_gives_up_when_nothing_is_readable(tmp_path):
    root = _tree(tmp_path / "chars", per_class=1)
    samples = scan_folder(root).samples
    for p, _ in samples:
        p.unlink()
    with pytest.raises(ImageError, match="not found.*unreadable too"):
        ImageFolderDataset(samples, None, on_error="skip")[0]


# ------------------------------------------------------------------------------------------ every task


def test_detector_and_generator_scans_reuse_the_manifest(tmp_path, decodes, small_cfg):
    from animeai.config import with_overrides
    from animeai.tasks.detector import DetectorTask
    from animeai.tasks.generator import find_character_images

    root = _tree(tmp_path / "chars", per_class=4)
    cfg = with_overrides(small_cfg(), {"data.root": str(root)})
    DetectorTask.prepare_data(cfg)  # what the Ray driver runs before the workers start
    assert len(decodes) == 8
    decodes.clear()
    build_splits(root, manifest=cfg.data.manifest, val_fraction=cfg.data.val_fraction)
    paths, errors, folder = find_character_images(root, "botan", manifest="auto")
    assert decodes == [] and len(paths) == 4 and folder == root / "botan"
    _jpeg(root / "botan" / "new.jpg")
    paths, _, _ = find_character_images(root, "botan", manifest="auto")
    assert decodes == [root / "botan" / "new.jpg"] and len(paths) == 5
    assert len(_records(root)) == 9  # the generator's update kept the other character's records
    off = with_overrides(cfg, {"data.manifest": "off"})
    decodes.clear()
    DetectorTask.prepare_data(off)
    assert decodes == []


# ----------------------------------------------------------------------------------------------- the CLI


def test_data_check_cli_summary_json_and_strict(tmp_path, capsys, decodes):
    from animeai.cli import main

    root = _tree(tmp_path / "chars", classes=("akari", "botan", "chiyo"), per_class=2)
    _jpeg(root / "akari" / "big.jpg", size=(300, 200))
    (root / "botan" / "bad.png").write_bytes(b"not an image")
    (root / "chiyo" / "empty.jpg").write_bytes(b"")
    assert main(["data", "check", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"manifest: {root / MANIFEST_NAME}" in out
    assert "9 files: 7 usable, 2 skipped; decoded 9" in out
    assert "classes (3)" in out and "akari        3" in out
    assert "1  not a recognised image format" in out and "1  empty file" in out
    assert "<64" in out and "128-255" in out
    hist = {line.split()[0]: int(line.split()[1]) for line in out.split("image sizes")[1].splitlines()[1:]}
    assert hist["<64"] == 6 and hist["128-255"] == 1 and sum(hist.values()) == 7
    decodes.clear()
    assert main(["data", "check", str(root), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert decodes == [] and s["decoded"] == 0 and s["reused_from_manifest"] == 9
    assert s["classes"] == [{"name": "akari", "images": 3}, {"name": "botan", "images": 2},
                            {"name": "chiyo", "images": 2}]
    assert s["skipped_by_reason"] == {"not a recognised image format": 1, "empty file": 1}
    assert main(["data", "check", str(root), "--strict", "--no-progress"]) == 2
    assert "strict" in capsys.readouterr().err
    assert main(["data", "check", str(root), "--refresh", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decoded"] == 9
    for p in (root / "chiyo").iterdir():
        p.unlink()
    _jpeg(root / "chiyo" / "x.jpg").write_bytes(b"")
    assert main(["data", "check", str(root), "--no-progress"]) == 1  # a class training would refuse
    assert "no usable training image" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "missing")]) == 2


def test_data_check_train_val_layout(tmp_path, capsys):
    from animeai.cli import main

    _tree(tmp_path / "d" / "train")
    _tree(tmp_path / "d" / "val", per_class=1)
    assert main(["data", "check", str(tmp_path / "d"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["layout"] == "train/val folders"
    assert s["classes"] == [{"name": "akari", "train": 3, "val": 1}, {"name": "botan", "train": 3, "val": 1}]


# ------------------------------------------------------------------------------------ Ray: one manifest


def counting_train_func(config):
    """Ray Train worker: the library's run_worker, counting the images this worker decodes while scanning (through
    the manifest, or without one)."""
    import ray.train

    import animeai.data.folder as folder_mod
    from animeai.distributed.trainer import run_worker

    seen: list[str] = []

    def counting(paths, **kw):
        paths = list(paths)
        seen.extend(map(str, paths))
        return probe_images(paths, **kw)

    validate = folder_mod.validate_images

    def counting_validate(paths, **kw):
        paths = list(paths)
        seen.extend(map(str, paths))
        return validate(paths, **kw)

    manifest_mod.probe_images = counting  # this worker process only
    folder_mod.validate_images = counting_validate
    run_worker(config)
    out = Path(config["cfg"]["run"]["run_dir"]).parent
    rank = ray.train.get_context().get_world_rank()
    (out / f"decodes-rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.ray
def test_ray_workers_share_the_manifest_the_driver_built(local_ray, tmp_path, decodes):
    pytest.importorskip("ray")
    from conftest import small_overrides

    from animeai.config import DetectorConfig, load_config
    from animeai.distributed.trainer import DistributedOptions, fit

    root = _tree(tmp_path / "chars", per_class=6)
    cfg = load_config(DetectorConfig, None, small_overrides(root, tmp_path, **{
        "optim.batch_size": 4, "run.epochs": 1, "data.val_fraction": 0.34}))
    fit("detector", cfg, DistributedOptions(num_workers=2, storage_path=str(tmp_path / "ray")),
        train_func=counting_train_func, scratch_dir=str(tmp_path / "scratch"))
    assert len(decodes) == 12  # the driver validated every image once
    per_worker = [json.loads((tmp_path / f"decodes-rank{r}.json").read_text()) for r in (0, 1)]
    assert per_worker == [[], []]  # both workers found every image in the driver's manifest
    assert (tmp_path / "model.pth").is_file() and len(_records(root)) == 12


def test_a_strict_loader_error_in_a_worker_process_is_a_clear_cli_error(tmp_path):
    from torch.utils.data import DataLoader

    from animeai.cli import loader_worker_error

    root = _tree(tmp_path / "chars", per_class=2)
    samples = scan_folder(root, manifest=open_manifest(root, "auto")).samples
    samples[0][0].write_bytes(b"")
    loader = DataLoader(ImageFolderDataset(samples, None, on_error="raise"), batch_size=None, num_workers=1)
    with pytest.raises(RuntimeError) as info:
        next(iter(loader))
    assert loader_worker_error(info.value) == f"{samples[0][0]}: empty file (0 bytes) (raised while loading a batch)"
    assert loader_worker_error(RuntimeError("something else")) is None


def test_generator_real_images_skip_a_file_broken_after_validation(tmp_path):
    from animeai.tasks.generator import RealImages, find_character_images

    root = _tree(tmp_path / "chars", per_class=3)
    paths, errors, _ = find_character_images(root, "akari", manifest="auto")
    assert errors == [] and len(paths) == 3
    paths[1].write_bytes(b"")
    ds = RealImages(paths, 16, label=0)
    assert len(ds) == 2 and [e.path for e in ds.skipped] == [paths[1]] and ds.paths == [paths[0], paths[2]]
    with pytest.raises(ImageError, match="empty file"):
        RealImages(paths, 16, label=0, strict=True)


def test_file_names_that_are_not_utf8_round_trip(tmp_path, decodes):
    root = _tree(tmp_path / "chars")
    odd = Path(os.fsdecode(os.fsencode(root / "akari") + b"/caf\xe9.jpg"))  # Latin-1 bytes: not UTF-8
    _jpeg(odd)
    first = scan_folder(root, manifest=open_manifest(root, "auto"))
    assert odd in [p for p, _ in first.samples]
    decodes.clear()
    again = scan_folder(root, manifest=open_manifest(root, "auto"))
    assert decodes == [] and again.samples == first.samples
