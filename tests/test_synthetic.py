"""Tests for the procedural anime-character dataset generator."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from animeai.data.synthetic import (
    ACCESSORIES,
    CHARACTER_NAMES,
    FACE_SHAPES,
    HAIR_STYLES,
    CharacterSpec,
    character_specs,
    main,
    make_synthetic_dataset,
    render_character,
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
    assert sorted(p.name for p in out.iterdir()) == names
    for n in names:
        files = sorted(p.name for p in (out / n).iterdir())
        assert files == [f"{n}_{i:04d}.jpg" for i in range(1, 6)]
        with Image.open(out / n / files[0]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 48)


def test_layout_with_val(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    names = make_synthetic_dataset(out, num_classes=4, images_per_class=10, image_size=32, val_fraction=0.2)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
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
    with pytest.raises(ValueError, match="no training images"):
        make_synthetic_dataset(tmp_path / "c", num_classes=2, images_per_class=1, val_fraction=0.5)
    with pytest.raises(ValueError, match="must equal"):
        make_synthetic_dataset(tmp_path / "d", num_classes=2, images_per_class=1, names=["x"])
    with pytest.raises(ValueError, match="invalid class name"):
        make_synthetic_dataset(tmp_path / "e", num_classes=1, images_per_class=1, names=["a/b"])
    assert not any((tmp_path / d).exists() for d in "abcde")


def test_deterministic_bytes_and_seed_changes_them(tmp_path: Path) -> None:
    kw = dict(num_classes=3, images_per_class=4, image_size=48, val_fraction=0.25)
    make_synthetic_dataset(tmp_path / "a", seed=7, **kw)
    make_synthetic_dataset(tmp_path / "b", seed=7, **kw)
    make_synthetic_dataset(tmp_path / "c", seed=8, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert len(a) == 12 and a == b
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
    # a second run into an existing dataset is refused too (val layout)
    out2 = tmp_path / "ds2"
    make_synthetic_dataset(out2, num_classes=2, images_per_class=4, image_size=32, val_fraction=0.5)
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(out2, num_classes=2, images_per_class=4, image_size=32, val_fraction=0.5)
    # empty pre-existing class folders are fine
    out3 = tmp_path / "ds3"
    (out3 / "akari").mkdir(parents=True)
    make_synthetic_dataset(out3, num_classes=1, images_per_class=2, image_size=32)
    assert len(list((out3 / "akari").iterdir())) == 2


def test_names_override_sorted_and_unicode(tmp_path: Path) -> None:
    out = tmp_path / "custom"
    names = make_synthetic_dataset(out, num_classes=3, images_per_class=2, image_size=32, names=["zoe", "ゆき", "ann"])
    assert names == ["ann", "zoe", "ゆき"]
    assert sorted(p.name for p in out.iterdir()) == names
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
