"""Folder datasets: class discovery, validation of every file, splits, dataset and sampler."""

from __future__ import annotations

import io
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from animeai.data.folder import (
    DatasetError,
    EpochShuffleSampler,
    ImageFolderDataset,
    build_splits,
    find_classes,
    has_train_val,
    num_batches,
    report_skipped,
    scan_folder,
    stratified_split,
)
from animeai.data.images import ImageError, load_image


def _jpeg_bytes(color=(200, 80, 40), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_bytes(color=(10, 200, 40, 128), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _good(path: Path, i: int = 0) -> Path:
    return _write(path, _jpeg_bytes(color=(40 * i % 256, 100, 200)))


# ------------------------------------------------------------------------------------------ classes


def test_find_classes_sorted_unicode_and_skips_hidden(tmp_path):
    for name in ["ゆき", "émilie", "akari", "Zed", "name with space", ".hidden", "__MACOSX", ".git"]:
        (tmp_path / name).mkdir()
    _write(tmp_path / "stray_file.jpg", _jpeg_bytes())
    _write(tmp_path / ".DS_Store", b"\x00\x01")
    classes = find_classes(tmp_path)
    assert classes == sorted(["ゆき", "émilie", "akari", "Zed", "name with space"])
    assert classes[-1] == "ゆき"  # sorted by code point, stable across machines


def test_find_classes_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        find_classes(tmp_path / "nope")


def test_find_classes_root_is_a_file(tmp_path):
    path = _write(tmp_path / "file.jpg", _jpeg_bytes())
    with pytest.raises(DatasetError, match="not a folder"):
        find_classes(path)


def test_find_classes_no_class_folders(tmp_path):
    _write(tmp_path / "a.jpg", _jpeg_bytes())
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "__MACOSX").mkdir()
    with pytest.raises(DatasetError, match="no character folders"):
        find_classes(tmp_path)


# ------------------------------------------------------------------------------------------ scanning


@pytest.fixture
def messy_root(tmp_path) -> Path:
    """Two classes with good images plus every kind of bad file."""
    root = tmp_path / "messy"
    for i in range(3):
        _good(root / "ゆき" / f"good_{i}.jpg", i)
        _good(root / "émilie" / f"good_{i}.jpeg", i + 3)
    _write(root / "émilie" / "alpha.png", _png_bytes())
    _good(root / "émilie" / "nested" / "deeper.jpg", 9)  # sub-folders of a class count
    jpeg = _jpeg_bytes(size=(64, 64))
    _write(root / "ゆき" / "zero.jpg", b"")
    _write(root / "ゆき" / "truncated.jpg", jpeg[: len(jpeg) // 2])  # cut inside the header tables
    noisy = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(noisy, format="JPEG", quality=95)
    _write(root / "ゆき" / "cut_data.jpg", noisy.getvalue()[:-2000])  # cut inside the entropy-coded data
    _write(root / "émilie" / "text.jpg", b"this is a text file, not an image\n" * 4)
    _write(root / "émilie" / ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(100))  # hidden: not data at all
    _write(root / "émilie" / ".hidden_dir" / "x.jpg", b"junk")
    _write(root / "ゆき" / "__MACOSX" / "._good_0.jpg", b"\x00\x05\x16\x07 mac resource fork")
    return root


def test_scan_reports_bad_files_with_reasons(messy_root):
    result = scan_folder(messy_root)
    assert result.class_names == ["émilie", "ゆき"]
    index = {name: i for i, name in enumerate(result.class_names)}
    good = {(p.relative_to(messy_root).as_posix(), y) for p, y in result.samples}
    assert good == {
        *((f"ゆき/good_{i}.jpg", index["ゆき"]) for i in range(3)),
        *((f"émilie/good_{i}.jpeg", index["émilie"]) for i in range(3)),
        ("émilie/alpha.png", index["émilie"]),
        ("émilie/nested/deeper.jpg", index["émilie"]),
    }
    reasons = {e.path.relative_to(messy_root).as_posix(): e.reason for e in result.errors}
    assert set(reasons) == {"ゆき/zero.jpg", "ゆき/truncated.jpg", "ゆき/cut_data.jpg", "émilie/text.jpg"}
    assert "empty" in reasons["ゆき/zero.jpg"]
    assert "truncated" in reasons["ゆき/truncated.jpg"].lower()
    assert "truncated" in reasons["ゆき/cut_data.jpg"].lower()
    assert "not a recognised image" in reasons["émilie/text.jpg"]
    for e in result.errors:
        assert isinstance(e, ImageError)
        assert str(e.path) in str(e)
    all_paths = [p.name for p, _ in result.samples] + [e.path.name for e in result.errors]
    assert ".DS_Store" not in all_paths and "x.jpg" not in all_paths and "._good_0.jpg" not in all_paths


def test_scan_samples_are_deterministic(messy_root):
    assert scan_folder(messy_root).samples == scan_folder(messy_root).samples


def test_report_skipped(messy_root):
    errors = scan_folder(messy_root).errors
    out = io.StringIO()
    report_skipped(errors, limit=2, stream=out)
    text = out.getvalue()
    assert "skipped 4 unreadable file(s)" in text
    assert "and 2 more" in text
    out = io.StringIO()
    report_skipped([], stream=out)
    assert out.getvalue() == ""


def test_scan_strict_names_the_file(messy_root):
    with pytest.raises(DatasetError, match="strict") as info:
        scan_folder(messy_root, strict=True)
    bad = ["zero.jpg", "truncated.jpg", "cut_data.jpg", "text.jpg"]
    assert any(name in str(info.value) for name in bad)


def test_scan_max_pixels(tmp_path):
    _write(tmp_path / "a" / "big.jpg", _jpeg_bytes(size=(50, 50)))
    _write(tmp_path / "a" / "small.jpg", _jpeg_bytes(size=(10, 10)))
    result = scan_folder(tmp_path, max_pixels=1000)
    assert [p.name for p, _ in result.samples] == ["small.jpg"]
    assert "too large" in result.errors[0].reason


def test_empty_class_folder_is_named(tmp_path):
    _good(tmp_path / "akari" / "1.jpg")
    (tmp_path / "botan").mkdir()
    _write(tmp_path / "botan" / ".DS_Store", b"junk")  # hidden files do not make a class non-empty
    with pytest.raises(DatasetError, match="botan") as info:
        scan_folder(tmp_path)
    assert "no files" in str(info.value)
    assert "akari" not in str(info.value)


def test_class_with_only_unreadable_files(tmp_path):
    _good(tmp_path / "akari" / "1.jpg")
    _write(tmp_path / "botan" / "a.jpg", b"")
    _write(tmp_path / "botan" / "b.jpg", b"not an image")
    with pytest.raises(DatasetError, match="all files unreadable") as info:
        scan_folder(tmp_path)
    assert "botan" in str(info.value)


def test_class_with_only_unreadable_files_in_a_subfolder(tmp_path):
    _good(tmp_path / "akari" / "1.jpg")
    _write(tmp_path / "botan" / "2024" / "a.jpg", b"not an image")
    with pytest.raises(DatasetError, match="all files unreadable") as info:
        scan_folder(tmp_path)
    assert "botan" in str(info.value)


def test_scan_with_known_classes_keeps_their_ids(tmp_path):
    _good(tmp_path / "c" / "1.jpg")
    _good(tmp_path / "a" / "1.jpg")
    result = scan_folder(tmp_path, ["c", "b", "a"], require_all_classes=False)
    assert result.class_names == ["c", "b", "a"]
    assert sorted((p.parent.name, y) for p, y in result.samples) == [("a", 2), ("c", 0)]
    with pytest.raises(DatasetError, match="b"):
        scan_folder(tmp_path, ["c", "b", "a"])  # b required but absent


def test_scan_unknown_class_is_refused(tmp_path):
    _good(tmp_path / "a" / "1.jpg")
    _good(tmp_path / "stranger" / "1.jpg")
    with pytest.raises(DatasetError, match="stranger"):
        scan_folder(tmp_path, ["a", "b"])


# ------------------------------------------------------------------------------------------ splits


def test_flat_split_is_stratified(synth_root):
    splits = build_splits(synth_root, val_fraction=0.25, split_seed=0)
    assert splits.class_names == find_classes(synth_root)
    assert len(splits.class_names) == 6
    assert splits.layout.startswith("stratified split")
    assert splits.skipped == []
    train_counts = Counter(y for _, y in splits.train)
    val_counts = Counter(y for _, y in splits.val)
    for label in range(6):
        assert val_counts[label] == 6  # round(24 * 0.25)
        assert train_counts[label] == 18
    for path, label in splits.train + splits.val:
        assert path.parent.name == splits.class_names[label]


def test_flat_split_partitions_all_images(synth_root):
    splits = build_splits(synth_root, val_fraction=0.2, split_seed=3)
    train, val = {p for p, _ in splits.train}, {p for p, _ in splits.val}
    assert not train & val
    assert train | val == set(synth_root.rglob("*.jpg"))
    assert len(splits.train) == len(train) and len(splits.val) == len(val)  # no duplicates
    assert abs(len(val) / (len(train) + len(val)) - 0.2) < 0.05


def test_flat_split_depends_only_on_the_seed(synth_root):
    a = build_splits(synth_root, val_fraction=0.2, split_seed=7)
    b = build_splits(synth_root, val_fraction=0.2, split_seed=7)
    c = build_splits(synth_root, val_fraction=0.2, split_seed=8)
    assert a.train == b.train and a.val == b.val
    assert {p for p, _ in a.val} != {p for p, _ in c.val}
    assert len(a.val) == len(c.val)


def test_split_keeps_one_image_on_each_side():
    samples = [(Path(f"c{c}/{i}.jpg"), c) for c in range(3) for i in range(2 + c)] + [(Path("solo/0.jpg"), 3)]
    train, val = stratified_split(samples, 0.01, seed=0)
    assert Counter(y for _, y in val) == {0: 1, 1: 1, 2: 1}  # at least one each, though 1 % rounds to 0
    assert Counter(y for _, y in train)[3] == 1  # a single image stays in train
    train, val = stratified_split(samples, 0.99, seed=0)
    assert Counter(y for _, y in train) == {0: 1, 1: 1, 2: 1, 3: 1}
    train, val = stratified_split(samples, 0.0, seed=0)
    assert val == [] and sorted(train) == sorted(samples)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_val_fraction_out_of_range(synth_root, fraction):
    with pytest.raises(DatasetError, match="val_fraction"):
        build_splits(synth_root, val_fraction=fraction)


def test_train_val_folders(synth_split_root):
    assert has_train_val(synth_split_root)
    splits = build_splits(synth_split_root, val_fraction=0.5, split_seed=1)  # fraction ignored
    assert splits.layout == "train/val folders"
    assert splits.class_names == find_classes(synth_split_root / "train")
    assert len(splits.class_names) == 4
    assert all(p.parts[-3] == "train" for p, _ in splits.train)
    assert all(p.parts[-3] == "val" for p, _ in splits.val)
    assert len(splits.train) == 4 * 15 and len(splits.val) == 4 * 5
    for path, label in splits.val:
        assert splits.class_names[label] == path.parent.name


def test_val_ids_follow_train_classes(tmp_path):
    """val/ has only some classes: their ids must be the training ids, not re-numbered from 0."""
    for name in ["akari", "botan", "chiyo"]:
        _good(tmp_path / "train" / name / "1.jpg")
    _good(tmp_path / "val" / "chiyo" / "1.jpg")
    splits = build_splits(tmp_path)
    assert splits.class_names == ["akari", "botan", "chiyo"]
    assert [(p.parent.name, y) for p, y in splits.val] == [("chiyo", 2)]


def test_val_with_unknown_class(synth_split_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth_split_root, root)
    _good(root / "val" / "newcomer" / "1.jpg")
    with pytest.raises(DatasetError, match="newcomer"):
        build_splits(root)


def test_separate_val_root(synth_split_root):
    splits = build_splits(synth_split_root / "train", val_root=synth_split_root / "val")
    assert splits.layout == "separate val folder"
    assert len(splits.val) == 20


def test_skipped_files_are_collected_from_both_folders(tmp_path):
    for split in ("train", "val"):
        _good(tmp_path / split / "a" / "1.jpg")
        _good(tmp_path / split / "b" / "1.jpg", 1)
        _write(tmp_path / split / "a" / "bad.jpg", b"oops")
    splits = build_splits(tmp_path)
    assert sorted(e.path.parts[-3] for e in splits.skipped) == ["train", "val"]
    with pytest.raises(DatasetError, match="bad.jpg"):
        build_splits(tmp_path, strict=True)


# ------------------------------------------------------------------------------------------ dataset / sampler


def test_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and len(sampler) == 50
    assert first != list(range(50))
    assert list(sampler) == first  # same epoch, same order
    again = EpochShuffleSampler(50, seed=3)
    again.set_epoch(0)
    assert list(again) == first  # a new sampler (e.g. after resume or on another process) agrees
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(50))
    other_seed = EpochShuffleSampler(50, seed=4)
    assert list(other_seed) != first


def test_sampler_without_shuffle_and_batches():
    assert list(EpochShuffleSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]
    assert list(EpochShuffleSampler(0, seed=0)) == []
    assert num_batches(10, 4, drop_last=False) == 3
    assert num_batches(10, 4, drop_last=True) == 2


def test_dataset_returns_tensor_and_label(tmp_path):
    from torchvision import transforms as T

    samples = [(_good(tmp_path / "a" / "1.jpg"), 0), (_write(tmp_path / "b" / "2.png", _png_bytes()), 1)]
    ds = ImageFolderDataset(samples, T.Compose([T.Resize((32, 32)), T.ToTensor()]))
    assert len(ds) == 2 and ds.targets == [0, 1]
    x, y = ds[1]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and y == 1
    raw, _ = ImageFolderDataset(samples, None)[0]
    assert isinstance(raw, Image.Image) and raw.mode == "RGB" and raw.size == (24, 20)


def test_dataset_names_a_file_corrupted_after_scanning(tmp_path):
    _good(tmp_path / "a" / "1.jpg")
    _good(tmp_path / "a" / "2.jpg", 1)
    samples = scan_folder(tmp_path).samples
    ds = ImageFolderDataset(samples, None)
    broken = samples[1][0]
    broken.write_bytes(broken.read_bytes()[:40])
    ds[0]
    with pytest.raises(ImageError, match="2.jpg") as info:
        ds[1]
    assert info.value.path == broken
    broken.unlink()
    with pytest.raises(ImageError, match="not found"):
        ds[1]


# ------------------------------------------------------------------------------------------ data that cannot train


def _classes(root: Path, names, per_class: int = 2) -> Path:
    for c, name in enumerate(names):
        for i in range(per_class):
            _good(root / name / f"{i}.jpg", c * 7 + i)
    return root


def test_a_single_class_cannot_train(tmp_path):
    root = _classes(tmp_path / "one", ["akari"], per_class=4)
    with pytest.raises(DatasetError, match="at least 2 classes") as info:
        build_splits(root, val_fraction=0.25)
    assert str(root) in str(info.value) and "akari" in str(info.value) and "found 1" in str(info.value)
    assert len(build_splits(root, val_fraction=0.25, min_classes=1).class_names) == 1  # callers may lower the floor


def test_a_single_class_in_train_val_layout_cannot_train(tmp_path):
    _classes(tmp_path / "train", ["akari"])
    _classes(tmp_path / "val", ["akari"])
    with pytest.raises(DatasetError, match="at least 2 classes") as info:
        build_splits(tmp_path)
    assert str(tmp_path / "train") in str(info.value)


@pytest.mark.parametrize(
    ("folders", "expected"),
    [
        (["train"], "holds train/ but no val/"),
        (["train", "validation"], "holds train/, validation/ but no val/"),
        (["train", "valid"], "but no val/"),
        (["test", "train"], "holds test/, train/ but no val/"),
        (["val"], "holds val/ but no train/"),
        (["test", "validation"], "but no train/"),
        (["Train", "Val"], "rename the folders to train/ and val/"),
    ],
)
def test_split_folders_are_not_classes(tmp_path, folders, expected):
    """A root with only some split folders used to train one class per split folder (top-1 1.0 on "train")."""
    for name in folders:
        _classes(tmp_path / name, ["akari", "botan"])
    with pytest.raises(DatasetError) as info:
        build_splits(tmp_path, val_fraction=0.2)
    message = str(info.value)
    assert expected in message and str(tmp_path) in message
    if "no val/" in expected:  # says how to fix it
        assert f"{tmp_path}/val/" in message and "--val-fraction" in message and "--val-data" in message
        assert str(tmp_path / "train") in message


def test_train_val_root_given_with_val_data(tmp_path, synth_split_root):
    with pytest.raises(DatasetError, match="without --val-data") as info:
        build_splits(synth_split_root, val_root=synth_split_root / "val")
    assert str(synth_split_root) in str(info.value)


def test_every_class_with_one_image_leaves_no_validation(tmp_path):
    root = _classes(tmp_path / "solo", ["akari", "botan", "chiyo"], per_class=1)
    with pytest.raises(DatasetError, match="at least 2 images per class") as info:
        build_splits(root, val_fraction=0.2)
    message = str(info.value)
    assert str(root) in message and "akari, botan, chiyo" in message and "--val-data" in message
    assert "set --val-fraction > 0" not in message  # it already is


def test_zero_val_fraction_without_val_folder(tmp_path):
    root = _classes(tmp_path / "flat", ["akari", "botan"])
    with pytest.raises(DatasetError, match="--val-fraction is 0") as info:
        build_splits(root, val_fraction=0.0)
    assert str(root) in str(info.value)
    splits = build_splits(root, val_fraction=0.0, require_val=False)  # e.g. a task that validates otherwise
    assert splits.val == [] and len(splits.train) == 4


def test_some_single_image_classes_still_split(tmp_path):
    root = _classes(tmp_path / "mixed", ["akari", "botan"], per_class=3)
    _good(root / "chiyo" / "only.jpg", 5)
    splits = build_splits(root, val_fraction=0.34)
    assert Counter(splits.class_names[y] for _, y in splits.val) == {"akari": 1, "botan": 1}


# ----------------------------------------------------------------------------------- links and unreadable entries


def _reasons(errors, root: Path) -> dict[str, str]:
    return {e.path.relative_to(root).as_posix(): e.reason for e in errors}


def test_broken_links_and_link_loops_are_reported(tmp_path):
    root = _classes(tmp_path / "data", ["akari", "botan"])
    outside = _good(tmp_path / "elsewhere" / "pic.jpg", 3)
    (root / "akari" / "linked.jpg").symlink_to(outside)  # a link to a good image is a good image
    (root / "akari" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (root / "akari" / "self.jpg").symlink_to("self.jpg")
    (root / "botan" / "ping.jpg").symlink_to("pong.jpg")
    (root / "botan" / "pong.jpg").symlink_to("ping.jpg")
    (root / "botan" / "sub").mkdir()
    (root / "botan" / "sub" / "up").symlink_to("..")  # a folder loop: must not hang or duplicate images
    (root / "ghost").symlink_to(tmp_path / "no_such_class")  # a class folder that is a broken link
    result = scan_folder(root)
    assert result.class_names == ["akari", "botan"]
    names = sorted(p.relative_to(root).as_posix() for p, _ in result.samples)
    assert names == ["akari/0.jpg", "akari/1.jpg", "akari/linked.jpg", "botan/0.jpg", "botan/1.jpg"]
    reasons = _reasons(result.errors, root)
    assert set(reasons) == {"akari/gone.jpg", "akari/self.jpg", "botan/ping.jpg", "botan/pong.jpg", "botan/sub/up",
                            "ghost"}
    assert reasons["akari/gone.jpg"] == f"broken symbolic link -> {tmp_path / 'deleted.jpg'}"
    assert reasons["ghost"] == f"broken symbolic link -> {tmp_path / 'no_such_class'}"
    for loop in ("akari/self.jpg", "botan/ping.jpg", "botan/pong.jpg", "botan/sub/up"):
        assert reasons[loop].startswith("symbolic link loop"), loop
    with pytest.raises(DatasetError, match="gone.jpg|self.jpg|ping.jpg|pong.jpg|up"):
        scan_folder(root, strict=True)


def test_class_of_only_broken_links_names_each(tmp_path):
    root = _classes(tmp_path / "data", ["akari"])
    (root / "botan").mkdir()
    (root / "botan" / "a.jpg").symlink_to(tmp_path / "missing_a.jpg")
    (root / "botan" / "b.png").symlink_to("b.png")
    (root / "botan" / "nested").mkdir()
    (root / "botan" / "nested" / "c.jpg").symlink_to(tmp_path / "missing_c.jpg")
    with pytest.raises(DatasetError) as info:
        scan_folder(root)
    message = str(info.value)
    assert f"{root / 'botan'}: all files unreadable" in message and "akari" not in message
    for bad in ("botan/a.jpg", "botan/b.png", "botan/nested/c.jpg"):
        assert str(root / bad) in message
    assert message.count("broken symbolic link") == 2 and message.count("symbolic link loop") == 1


def test_class_folder_linking_back_to_the_root(tmp_path):
    root = _classes(tmp_path / "data", ["akari", "botan"])
    (root / "loop").symlink_to(".")
    with pytest.raises(DatasetError, match="all files unreadable") as info:
        scan_folder(root)
    assert f"{root / 'loop'}: symbolic link loop" in str(info.value)


def test_linked_class_folders_and_subfolders_are_followed(tmp_path):
    root = _classes(tmp_path / "data", ["akari"])
    _classes(tmp_path / "store", ["botan_pics", "more"])
    (root / "botan").symlink_to(tmp_path / "store" / "botan_pics")
    (root / "akari" / "extra").symlink_to(tmp_path / "store" / "more")
    result = scan_folder(root)
    assert result.errors == [] and result.class_names == ["akari", "botan"]
    assert Counter(result.class_names[y] for _, y in result.samples) == {"akari": 4, "botan": 2}


def test_unreadable_subfolder_is_reported(tmp_path, monkeypatch):
    root = _classes(tmp_path / "data", ["akari", "botan"])
    locked = root / "botan" / "locked"
    _good(locked / "x.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = scan_folder(root)
    assert _reasons(result.errors, root) == {"botan/locked": "folder not readable: permission denied"}
    assert len(result.samples) == 4


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_and_folder_for_real(tmp_path):
    root = _classes(tmp_path / "data", ["akari", "botan"])
    secret = _good(root / "akari" / "secret.jpg", 9)
    locked = root / "botan" / "locked"
    _good(locked / "x.jpg")
    secret.chmod(0)
    locked.chmod(0)
    try:
        reasons = _reasons(scan_folder(root).errors, root)
    finally:
        secret.chmod(0o644)
        locked.chmod(0o755)
    assert reasons == {"akari/secret.jpg": "permission denied",
                       "botan/locked": "folder not readable: permission denied"}


def test_predict_paths_keep_bad_links_for_reporting(tmp_path):
    from animeai.inference import expand_paths

    folder = tmp_path / "pics"
    good = _good(folder / "a.jpg")
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "notes.txt").write_text("not an image name: ignored")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..")
    paths = expand_paths([folder, tmp_path / "given_broken.jpg"])
    assert paths == [good, folder / "gone.jpg", folder / "loop.png", folder / "sub" / "up",
                     tmp_path / "given_broken.jpg"]
    (tmp_path / "given_broken.jpg").symlink_to("nowhere.jpg")
    reasons = {}
    for p in paths[1:]:
        with pytest.raises(ImageError) as info:
            load_image(p)
        reasons[p.name] = info.value.reason
    assert reasons["gone.jpg"].startswith("broken symbolic link ->")
    assert reasons["given_broken.jpg"] == "broken symbolic link -> nowhere.jpg"
    assert reasons["loop.png"].startswith("symbolic link loop")
    assert reasons["up"].startswith("symbolic link loop")
