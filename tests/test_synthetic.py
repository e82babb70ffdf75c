"""Tests for the procedural anime-character dataset generator."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from animeai.data.folder import scan_folder
from animeai.data.synthetic import (
    ACCESSORIES,
    CHARACTER_NAMES,
    FACE_SHAPES,
    HAIR_STYLES,
    MANIFEST_NAME,
    CharacterSpec,
    character_specs,
    main,
    make_synthetic_dataset,
    render_character,
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _entries(root: Path) -> list[str]:
    """Visible entry names of a folder (the generator's manifest is a hidden file)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def _features(path: Path) -> np.ndarray:
    """16x16 chromaticity pixels (r,g,b / (r+g+b)): colour signal independent of brightness jitter."""
    with Image.open(path) as im:
        x = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.BOX), dtype=np.float64)
    return (x / (x.sum(-1, keepdims=True) + 1.0)).ravel()


# ------------------------------------------------------------------------------------------- specs


def test_character_names_shape() -> None:
    assert len(CHARACTER_NAMES) >= 24
    assert len(set(CHARACTER_NAMES)) == len(CHARACTER_NAMES)
    non_ascii = [i for i, n in enumerate(CHARACTER_NAMES) if not n.isascii()]
    assert len(non_ascii) == 1 and non_ascii[0] > 5
    for n in CHARACTER_NAMES:
        assert n and "/" not in n and "\\" not in n and n == n.strip()


def test_specs_deterministic_valid_and_distinct() -> None:
    specs = character_specs(24)
    assert specs == character_specs(24)
    assert [s.name for s in specs] == list(CHARACTER_NAMES[:24])
    assert character_specs(6) == specs[:6]  # prefix-stable: a class looks the same regardless of num_classes
    for s in specs:
        assert isinstance(s, CharacterSpec)
        assert s.face in FACE_SHAPES and s.hair_style in HAIR_STYLES and s.accessory in ACCESSORIES
        for col in (s.hair, s.eyes, s.skin):
            assert len(col) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in col)
    first12 = specs[:12]
    assert len({s.hair for s in first12}) == 12
    assert len({(s.face, s.hair_style) for s in first12}) == 12
    # hair colours of the first 6 classes are far apart in RGB
    hairs = np.array([s.hair for s in specs[:6]], dtype=float)
    dists = np.linalg.norm(hairs[:, None] - hairs[None], axis=-1)[np.triu_indices(6, 1)]
    assert dists.min() > 60
    # other seeds give another valid, deterministic palette
    assert character_specs(6, seed=1) == character_specs(6, seed=1) != character_specs(6, seed=0)


def test_too_many_classes_raises() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        character_specs(len(CHARACTER_NAMES) + 1)
    with pytest.raises(ValueError):
        character_specs(0)


def test_render_character_size_mode_and_determinism() -> None:
    spec = character_specs(1)[0]
    a = render_character(spec, random.Random(3), image_size=96)
    b = render_character(spec, random.Random(3), image_size=96)
    assert a.mode == "RGB" and a.size == (96, 96)
    assert a.tobytes() == b.tobytes()
    assert np.asarray(a).std() > 20  # a drawing, not a flat image


# ----------------------------------------------------------------------------------------- dataset


def test_layout_without_val(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    names = make_synthetic_dataset(out, num_classes=3, images_per_class=5, image_size=48)
    assert names == sorted(CHARACTER_NAMES[:3])
    assert _entries(out) == names
    for n in names:
        files = sorted(p.name for p in (out / n).iterdir())
        assert files == [f"{n}_{i:04d}.jpg" for i in range(1, 6)]
        with Image.open(out / n / files[0]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 48)


def test_layout_with_val(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    names = make_synthetic_dataset(out, num_classes=4, images_per_class=10, image_size=32, val_fraction=0.2)
    assert _entries(out) == ["train", "val"]
    for n in names:
        train = sorted(p.name for p in (out / "train" / n).iterdir())
        val = sorted(p.name for p in (out / "val" / n).iterdir())
        assert len(train) == 8 and len(val) == 2
        assert not set(train) & set(val)  # numbering continues into val
    # tiny fraction still gives at least one validation image per class
    out2 = tmp_path / "ds2"
    make_synthetic_dataset(out2, num_classes=2, images_per_class=4, image_size=32, val_fraction=0.01)
    for n in CHARACTER_NAMES[:2]:
        assert len(list((out2 / "val" / n).iterdir())) == 1
        assert len(list((out2 / "train" / n).iterdir())) == 3


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_dataset(tmp_path / "a", num_classes=len(CHARACTER_NAMES) + 1, images_per_class=1)
    with pytest.raises(ValueError, match="val_fraction"):
        make_synthetic_dataset(tmp_path / "b", num_classes=2, images_per_class=4, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"images_per_class \(--images-per-class\) must be >= 2 with val_fraction"):
        make_synthetic_dataset(tmp_path / "c", num_classes=2, images_per_class=1, val_fraction=0.5)
    with pytest.raises(ValueError, match="must equal"):
        make_synthetic_dataset(tmp_path / "d", num_classes=2, images_per_class=1, names=["x"])
    with pytest.raises(ValueError, match="invalid class name"):
        make_synthetic_dataset(tmp_path / "e", num_classes=2, images_per_class=1, names=["ok", "a/b"])
    assert not any((tmp_path / d).exists() for d in "abcde")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"num_classes": 1}, "--num-classes"),
        ({"num_classes": 0}, "--num-classes"),
        ({"num_classes": len(CHARACTER_NAMES) + 1}, "--num-classes"),
        ({"num_classes": 2.0}, "--num-classes"),
        ({"num_classes": True}, "--num-classes"),
        ({"images_per_class": 0}, "--images-per-class"),
        ({"images_per_class": -3}, "--images-per-class"),
        ({"images_per_class": 1, "val_fraction": 0.2}, "--images-per-class"),
        ({"image_size": 15}, "--image-size"),
        ({"image_size": 4097}, "--image-size"),
        ({"val_fraction": -0.1}, "--val-fraction"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"val_fraction": float("nan")}, "--val-fraction"),
        ({"seed": "0"}, "--seed"),
    ],
)
def test_numeric_limits_name_the_flag(tmp_path: Path, kwargs: dict, flag: str) -> None:
    args = {"num_classes": 2, "images_per_class": 2, "image_size": 16, **kwargs}
    with pytest.raises(ValueError) as info:
        make_synthetic_dataset(tmp_path / "out", **args)
    assert flag in str(info.value)
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_limits_are_inclusive(tmp_path: Path) -> None:
    names = make_synthetic_dataset(tmp_path / "out", num_classes=2, images_per_class=2, image_size=16, val_fraction=0.5)
    assert len(names) == 2
    for n in names:
        assert len(list((tmp_path / "out" / "val" / n).iterdir())) == 1
        with Image.open(tmp_path / "out" / "train" / n / f"{n}_0001.jpg") as im:
            assert im.size == (16, 16)


def test_deterministic_bytes_and_seed_changes_them(tmp_path: Path) -> None:
    kw = dict(num_classes=3, images_per_class=4, image_size=48, val_fraction=0.25)
    make_synthetic_dataset(tmp_path / "a", seed=7, **kw)
    make_synthetic_dataset(tmp_path / "b", seed=7, **kw)
    make_synthetic_dataset(tmp_path / "c", seed=8, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert len(a) == 13 and a == b  # 12 images + the manifest
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) == len(a)


def test_refuses_non_empty_class_folder(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    (out / "botan").mkdir(parents=True)
    (out / "botan" / "other.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="botan"):
        make_synthetic_dataset(out, num_classes=3, images_per_class=2, image_size=32)
    assert sorted(p.name for p in out.iterdir()) == ["botan"]  # nothing written before refusing
    assert [p.name for p in (out / "botan").iterdir()] == ["other.jpg"]
    # empty pre-existing class folders (and hidden debris) are fine
    out3 = tmp_path / "ds3"
    (out3 / "akari").mkdir(parents=True)
    (out3 / ".DS_Store").write_bytes(b"junk")
    make_synthetic_dataset(out3, num_classes=2, images_per_class=2, image_size=32)
    assert len(list((out3 / "akari").iterdir())) == 2


def test_refuses_a_folder_holding_other_data(tmp_path: Path) -> None:
    """Files in folders the generator would not even write (another dataset) are refused too: no mixing."""
    out = tmp_path / "real"
    (out / "zed" / "deep").mkdir(parents=True)
    (out / "zed" / "deep" / "zed1.jpg").write_bytes(b"someone's picture")
    with pytest.raises(FileExistsError) as info:
        make_synthetic_dataset(out, num_classes=2, images_per_class=2, image_size=32)
    assert str(out) in str(info.value) and "zed1.jpg" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["zed"]


def test_same_parameters_rewrite_identically_other_parameters_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    kw = dict(num_classes=2, images_per_class=4, image_size=32, val_fraction=0.5, seed=3)
    make_synthetic_dataset(out, **kw)
    first = _files(out)
    assert MANIFEST_NAME in first
    (out / "train" / CHARACTER_NAMES[0] / "mine.txt").write_text("user file")  # left alone by a rerun
    (out / "val" / CHARACTER_NAMES[1] / f"{CHARACTER_NAMES[1]}_0004.jpg").unlink()  # as if interrupted
    make_synthetic_dataset(out, **kw)  # the same set: accepted, completed, byte-identical
    again = _files(out)
    assert again.pop(f"train/{CHARACTER_NAMES[0]}/mine.txt") == b"user file"
    assert again == first
    for change in ({"seed": 4}, {"images_per_class": 6}, {"image_size": 48}, {"val_fraction": 0.25}):
        with pytest.raises(FileExistsError, match="other parameters") as info:
            make_synthetic_dataset(out, **{**kw, **change})
        assert str(out) in str(info.value) and next(iter(change)) in str(info.value)
    assert _files(out).keys() == {*first, f"train/{CHARACTER_NAMES[0]}/mine.txt"}


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder") as info:
        make_synthetic_dataset(afile, num_classes=2, images_per_class=1, image_size=16)
    assert str(afile) in str(info.value)
    with pytest.raises(FileExistsError, match="not a folder") as info:
        make_synthetic_dataset(afile / "sub", num_classes=2, images_per_class=1, image_size=16)
    assert str(afile / "sub") in str(info.value)
    assert afile.read_text() == "x"


def test_unicode_output_path(tmp_path: Path) -> None:
    out = tmp_path / "データ セット" / "ゆき"
    names = make_synthetic_dataset(out, num_classes=2, images_per_class=2, image_size=16)
    assert _entries(out) == names
    assert scan_folder(out).class_names == names


def test_names_override_sorted_and_unicode(tmp_path: Path) -> None:
    out = tmp_path / "custom"
    names = make_synthetic_dataset(out, num_classes=3, images_per_class=2, image_size=32, names=["zoe", "ゆき", "ann"])
    assert names == ["ann", "zoe", "ゆき"]
    assert _entries(out) == names
    assert (out / "ゆき" / "ゆき_0001.jpg").is_file()


def test_builtin_unicode_class_when_enough_classes(tmp_path: Path) -> None:
    small = make_synthetic_dataset(tmp_path / "small", num_classes=6, images_per_class=1, image_size=32)
    assert all(n.isascii() for n in small)
    uni = next(n for n in CHARACTER_NAMES if not n.isascii())
    k = CHARACTER_NAMES.index(uni) + 1
    names = make_synthetic_dataset(tmp_path / "big", num_classes=k, images_per_class=1, image_size=32)
    assert uni in names and names == sorted(names)
    with Image.open(tmp_path / "big" / uni / f"{uni}_0001.jpg") as im:
        assert im.size == (32, 32)


def test_intra_class_variation(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    make_synthetic_dataset(out, num_classes=2, images_per_class=6, image_size=64)
    for n in CHARACTER_NAMES[:2]:
        imgs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in sorted((out / n).iterdir())]
        diffs = [np.abs(imgs[i] - imgs[j]).mean() for i in range(len(imgs)) for j in range(i + 1, len(imgs))]
        assert min(diffs) > 8.0, "images of one class are (nearly) identical"


def test_classes_are_separable_by_nearest_centroid(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    names = make_synthetic_dataset(out, num_classes=6, images_per_class=30, image_size=64, val_fraction=1 / 3)

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for label, n in enumerate(names):
            for p in sorted((out / split / n).iterdir()):
                xs.append(_features(p))
                ys.append(label)
        return np.stack(xs), np.array(ys)

    x_train, y_train = load("train")
    x_val, y_val = load("val")
    assert len(y_train) == 120 and len(y_val) == 60
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(6)])
    pred = ((x_val[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    acc = float((pred == y_val).mean())
    assert acc > 0.5, f"held-out nearest-centroid accuracy {acc:.2f} (chance 0.17)"
    # sanity: the same classifier on shuffled training labels is near chance, so the signal is in the classes
    y_shuf = np.random.default_rng(0).permutation(y_train)
    cent_shuf = np.stack([x_train[y_shuf == c].mean(0) for c in range(6)])
    acc_shuf = float((((x_val[:, None, :] - cent_shuf[None]) ** 2).sum(-1).argmin(1) == y_val).mean())
    assert acc_shuf < acc - 0.25


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    main([str(out), "--num-classes", "2", "--images-per-class", "3", "--image-size", "32", "--val-fraction", "0.34"])
    line = capsys.readouterr().out.strip()
    assert "2 classes" in line and "6 total" in line and str(out.resolve()) in line
    assert len(list((out / "val" / CHARACTER_NAMES[0]).iterdir())) == 1
    with pytest.raises(SystemExit):
        main([str(out), "--num-classes", "2", "--images-per-class", "3", "--val-fraction", "0.34"])
    assert "refusing" in capsys.readouterr().err


def test_animeai_synth_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from animeai.cli import main as animeai_main

    afile = tmp_path / "existing.txt"
    afile.write_text("x")
    assert animeai_main(["synth", str(afile)]) == 2
    err = capsys.readouterr().err
    assert str(afile) in err and "not a folder" in err and "Traceback" not in err
    for flags, flag in ((["--num-classes", "1"], "--num-classes"), (["--images-per-class", "0"], "--images-per-class"),
                        (["--image-size", "9999"], "--image-size"), (["--val-fraction", "1.5"], "--val-fraction"),
                        (["--images-per-class", "1", "--val-fraction", "0.3"], "--images-per-class")):
        assert animeai_main(["synth", str(tmp_path / "new"), *flags]) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    out = tmp_path / "ゆき"
    assert animeai_main(["synth", str(out), "--num-classes", "2", "--images-per-class", "1", "--image-size", "16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, *CHARACTER_NAMES[:2]]
