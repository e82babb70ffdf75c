"""Tests for animeai.data.images: every bad input is a clear ImageError, every odd mode becomes correct RGB."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from animeai.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    _to_rgb,
    load_image,
    validate_images,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


# ----------------------------------------------------------------------------------------------- helpers


def _noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """Incompressible RGB noise, so that cutting a file in half loses real image data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` but whose image data is a few garbage bytes.

    Opening it is instant; decoding it would fail as truncated, so an "image too large" error proves that the
    size is checked from the header before any decoding.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)))
    return path


def _assert_error(path: Path, reason_part: str, **kwargs: object) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    err = info.value
    assert err.path == path
    assert reason_part in err.reason
    assert str(err) == f"{path}: {err.reason}"
    return err


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 0) -> bool:
    return len(actual) == len(expected) and all(abs(a - e) <= tol for a, e in zip(actual, expected))


# ----------------------------------------------------------------------------------------------- API basics


def test_constants() -> None:
    assert DEFAULT_MAX_PIXELS == 50_000_000
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


def test_image_error_attributes_and_pickle(tmp_path: Path) -> None:
    err = ImageError(str(tmp_path / "a.png"), "boom")
    assert isinstance(err, ValueError)
    assert err.path == tmp_path / "a.png" and isinstance(err.path, Path)
    assert err.reason == "boom"
    assert str(err) == f"{tmp_path / 'a.png'}: boom"
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.path, clone.reason, str(clone)) == (err.path, err.reason, str(err))


def test_good_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    src = _noise_rgb(33, 21)
    img = load_image(_save(src, tmp_path / "ok.png"))
    assert img.mode == "RGB" and img.size == (33, 21)
    assert np.array_equal(np.asarray(img), np.asarray(src))


@pytest.mark.parametrize(("kwargs", "message"), [({"max_pixels": 0}, "max_pixels"), ({"draft_size": 0}, "draft")])
def test_bad_arguments_are_value_errors_not_image_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "ok.png")
    with pytest.raises(ValueError, match=message) as info:
        load_image(path, **kwargs)
    assert not isinstance(info.value, ImageError)


# ----------------------------------------------------------------------------------------------- bad files


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    err = _assert_error(path, "empty file (0 bytes)")
    assert err.reason == "empty file (0 bytes)"


def test_missing_file(tmp_path: Path) -> None:
    err = _assert_error(tmp_path / "nope.png", "file not found")
    assert err.reason == "file not found"


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "folder.png"
    path.mkdir()
    _assert_error(path, "not a regular file")


def test_broken_symbolic_link_names_its_target(tmp_path: Path) -> None:
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "deleted.jpg")
    err = _assert_error(link, "broken symbolic link")
    assert err.reason == f"broken symbolic link -> {tmp_path / 'deleted.jpg'}"


def test_symbolic_link_loops(tmp_path: Path) -> None:
    (tmp_path / "self.jpg").symlink_to("self.jpg")
    (tmp_path / "ping.jpg").symlink_to("pong.jpg")
    (tmp_path / "pong.jpg").symlink_to("ping.jpg")
    assert _assert_error(tmp_path / "self.jpg", "symbolic link loop").reason == "symbolic link loop (-> self.jpg)"
    assert _assert_error(tmp_path / "ping.jpg", "symbolic link loop").reason == "symbolic link loop (-> pong.jpg)"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up.png").symlink_to("..")  # a folder link back to its own parent
    _assert_error(tmp_path / "sub" / "up.png", "symbolic link loop")


def test_link_to_a_good_image_loads(tmp_path: Path) -> None:
    target = _save(Image.new("RGB", (5, 4), (1, 2, 3)), tmp_path / "real.png")
    (tmp_path / "alias.png").symlink_to(target)
    assert load_image(tmp_path / "alias.png").getpixel((0, 0)) == (1, 2, 3)


def test_permission_denied_when_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "locked.png")

    def refuse(fp, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(Image, "open", refuse)
    assert _assert_error(path, "permission denied").reason == "permission denied"
    good, errors = validate_images([path])
    assert good == [] and errors[0].reason == "permission denied"


def test_pillow_oserror_without_errno_is_not_an_access_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "odd.png")

    def fail(fp, *args, **kwargs):
        raise OSError("decoder xyz not available")

    monkeypatch.setattr(Image, "open", fail)
    assert _assert_error(path, "decoder xyz").reason == "unexpected OSError: decoder xyz not available"


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = io.BytesIO()
    _noise_rgb(128, 128).save(data, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    err = _assert_error(path, "truncated or corrupt")
    pil_message = err.reason.split("truncated or corrupt image data", 1)[1]
    assert "truncated" in pil_message.lower() or "broken data stream" in pil_message  # Pillow's message is kept


def test_truncated_png(tmp_path: Path) -> None:
    data = io.BytesIO()
    _noise_rgb(128, 128).save(data, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    err = _assert_error(path, "truncated or corrupt")
    assert "image file is truncated" in err.reason  # Pillow's own message is kept


def test_truncation_does_not_enable_load_truncated_images(tmp_path: Path) -> None:
    data = io.BytesIO()
    _noise_rgb(64, 64).save(data, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ImageError):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    _assert_error(path, "not a recognised image format")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_error(path, "not a recognised image format")


def test_pickle_file(tmp_path: Path) -> None:
    path = tmp_path / "model.webp"
    path.write_bytes(pickle.dumps({"weights": list(range(100))}))
    _assert_error(path, "not a recognised image format")


def test_bomb_refused_from_header_before_decoding(tmp_path: Path) -> None:
    # 8000x8000 = 64M pixels: above our default limit, below Pillow's own guard; the data itself is garbage.
    path = _png_header_only(tmp_path / "bomb.png", 8000, 8000)
    err = _assert_error(path, "image too large")
    assert err.reason == (
        "image too large: 8000x8000 = 64,000,000 pixels exceeds the limit of 50,000,000 (raise max_pixels to allow it)"
    )
    # With the limit raised it gets as far as decoding, which fails on the garbage data.
    _assert_error(path, "truncated or corrupt", max_pixels=64_000_000)


def test_bomb_real_one_bit_png(tmp_path: Path) -> None:
    path = _save(Image.new("1", (9000, 9000)), tmp_path / "bomb1.png")  # ~10 KB on disk, 81M pixels
    assert path.stat().st_size < 100_000
    err = _assert_error(path, "9000x9000 = 81,000,000 pixels exceeds the limit of 50,000,000")
    assert err.reason.startswith("image too large")


def test_small_image_over_custom_limit(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (100, 50)), tmp_path / "small.png")
    _assert_error(path, "100x50 = 5,000 pixels exceeds the limit of 4,999", max_pixels=4_999)
    assert load_image(path, max_pixels=5_000).size == (100, 50)


def test_pillow_bomb_error_becomes_image_error(tmp_path: Path) -> None:
    # 20000x20000 is beyond 2 * Image.MAX_IMAGE_PIXELS: Pillow raises DecompressionBombError inside open().
    path = _png_header_only(tmp_path / "huge.png", 20000, 20000)
    err = _assert_error(path, "image too large", max_pixels=10**9)
    assert "400000000" in err.reason


def test_pillow_bomb_warning_becomes_image_error_without_global_changes(tmp_path: Path) -> None:
    # 12000x12000 = 144M pixels: between Image.MAX_IMAGE_PIXELS and twice it, so Pillow only warns.
    path = _png_header_only(tmp_path / "big.png", 12000, 12000)
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    err = _assert_error(path, "image too large", max_pixels=10**9)
    assert "144000000" in err.reason
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert warnings.filters == filters_before


# ----------------------------------------------------------------------------------------------- modes


def test_cmyk_jpeg_pure_cyan(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (16, 12), (255, 0, 0, 0)), tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (16, 12)
    assert _close(img.getpixel((8, 6)), (0, 255, 255), tol=8)


def test_16bit_png_scaled_by_bit_depth(tmp_path: Path) -> None:
    values = np.zeros((10, 20), dtype=np.uint16)
    values[:, :10] = 65535  # white
    values[:, 10:] = 0x8000  # mid grey
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (20, 10)
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((15, 5)) == (128, 128, 128)


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    path = _save(Image.new("I;16B", (6, 4), 0xFF00), tmp_path / "deep_be.tif")
    assert Image.open(path).mode == "I;16B"
    img = load_image(path)
    assert img.size == (6, 4) and img.getpixel((3, 2)) == WHITE


def test_32bit_int_tiff_scaled_by_max(tmp_path: Path) -> None:
    values = np.zeros((4, 8), dtype=np.int32)
    values[:, :4] = 100_000
    values[:, 4:] = 50_000
    path = _save(Image.fromarray(values), tmp_path / "int.tif")
    assert Image.open(path).mode == "I"
    img = load_image(path)
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((6, 1)) == (127, 127, 127)


def test_float_tiff_zero_to_one(tmp_path: Path) -> None:
    values = np.full((4, 8), 0.5, dtype=np.float32)
    values[0, 0] = 1.0
    values[0, 1] = -3.0  # clipped
    path = _save(Image.fromarray(values), tmp_path / "float.tif")
    assert Image.open(path).mode == "F"
    img = load_image(path)
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == (0, 0, 0)
    assert img.getpixel((5, 2)) == (128, 128, 128)


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    for x in range(5):
        for y in range(10):
            pal.putpixel((x, y), 0)
    path = _save(pal, tmp_path / "pal.png", transparency=0)  # index 0 (red) is fully transparent
    assert Image.open(path).mode == "P"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (10, 10)
    assert img.getpixel((1, 1)) == WHITE  # transparent red -> white background, not red or black
    assert img.getpixel((8, 8)) == BLUE


def test_palette_png_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([*RED, *GREEN] + [0, 0, 0] * 254)
    img = load_image(_save(pal, tmp_path / "pal.gif"))
    assert img.getpixel((2, 2)) == GREEN


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    img = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert img.mode == "RGB" and img.size == (3, 1)
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == BLUE
    assert _close(img.getpixel((2, 0)), (127, 127, 127), tol=1)


def test_la_png_composited_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    path = _save(la, tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    img = load_image(path)
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == (0, 0, 0)


def test_rgb_png_with_colour_key_transparency(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (2, 1), GREEN)
    rgb.putpixel((1, 0), RED)
    img = load_image(_save(rgb, tmp_path / "key.png", transparency=GREEN))
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == RED


def test_grayscale_l(tmp_path: Path) -> None:
    path = _save(Image.new("L", (7, 5), 77), tmp_path / "gray.png")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (7, 5)
    assert img.getpixel((3, 3)) == (77, 77, 77)


def test_one_bit(tmp_path: Path) -> None:
    bw = Image.new("1", (6, 6), 1)
    bw.putpixel((0, 0), 0)
    path = _save(bw, tmp_path / "bw.png")
    assert Image.open(path).mode == "1"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (6, 6)
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((5, 5)) == WHITE


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".tif"])
def test_multi_frame_uses_first_frame(tmp_path: Path, suffix: str) -> None:
    frames = [Image.new("RGB", (12, 8), colour) for colour in (RED, GREEN, BLUE)]
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    path = _save(frames[0], tmp_path / f"anim{suffix}", save_all=True, append_images=frames[1:], **kwargs)
    assert getattr(Image.open(path), "n_frames", 1) == 3
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (12, 8)
    assert _close(img.getpixel((6, 4)), RED, tol=2)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise for display
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert Image.open(path).size == (40, 20)
    img = load_image(path)
    assert img.size == (20, 40)
    assert _close(img.getpixel((10, 5)), RED, tol=20)  # the left edge is now on top
    assert _close(img.getpixel((10, 35)), BLUE, tol=20)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("PA", (1, 0), WHITE),
        ("RGBa", (0, 0, 0, 0), WHITE),
        ("YCbCr", (255, 128, 128), WHITE),
        ("HSV", (0, 255, 255), RED),
        ("LAB", (0, 128, 128), (0, 0, 0)),
    ],
)
def test_other_modes_convert_in_memory(tmp_path: Path, mode: str, value: tuple[int, ...], expected: tuple) -> None:
    img = Image.new(mode, (2, 2), value)
    if mode == "PA":
        img.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    out = _to_rgb(img, tmp_path / "x")
    assert out.mode == "RGB"
    assert _close(out.getpixel((1, 1)), expected, tol=2)


def test_returned_image_is_detached_copy(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (5, 5), GREEN), tmp_path / "detached.png")
    img = load_image(path)
    path.unlink()
    assert img.getpixel((2, 2)) == GREEN
    assert getattr(img, "fp", None) is None


# ----------------------------------------------------------------------------------------------- paths, draft


def test_unicode_name_and_spaces(tmp_path: Path) -> None:
    folder = tmp_path / "my pictures"
    folder.mkdir()
    path = _save(Image.new("RGB", (9, 4), BLUE), folder / "キャラ 1.png")
    img = load_image(str(path))
    assert img.size == (9, 4) and img.getpixel((1, 1)) == BLUE
    missing = folder / "キャラ 2.png"
    _assert_error(missing, "file not found")
    assert "キャラ 2.png" in str(ImageError(missing, "x"))


def test_draft_size_decodes_large_jpeg_at_reduced_scale(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (4000, 3000), (200, 100, 50)), tmp_path / "big.jpg")
    img = load_image(path, draft_size=500)
    width, height = img.size
    assert (width, height) != (4000, 3000)
    assert 500 <= width <= 1000 and 500 <= height <= 1000
    assert _close(img.getpixel((width // 2, height // 2)), (200, 100, 50), tol=6)
    assert load_image(path).size == (4000, 3000)


def test_draft_size_never_goes_below_draft_and_ignores_non_jpeg(tmp_path: Path) -> None:
    jpeg = _save(Image.new("RGB", (300, 200)), tmp_path / "small.jpg")
    assert load_image(jpeg, draft_size=256).size == (300, 200)
    png = _save(Image.new("RGB", (1200, 900)), tmp_path / "big.png")
    assert load_image(png, draft_size=100).size == (1200, 900)


# ----------------------------------------------------------------------------------------------- validate_images


def test_validate_images_splits_in_input_order(tmp_path: Path) -> None:
    good_a = _save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    empty = tmp_path / "b.jpg"
    empty.write_bytes(b"")
    good_c = _save(Image.new("L", (4, 4)), tmp_path / "c キャラ.jpg")
    text = tmp_path / "d.png"
    text.write_text("hello")
    missing = tmp_path / "e.png"
    good_f = _save(Image.new("RGBA", (4, 4)), tmp_path / "f.webp")
    bomb = _png_header_only(tmp_path / "g.png", 200, 200)

    paths = [good_a, empty, good_c, text, missing, good_f, bomb]
    good, errors = validate_images((str(p) for p in paths), max_pixels=10_000, num_threads=2)

    assert good == [good_a, good_c, good_f]
    assert all(isinstance(p, Path) for p in good)
    assert [e.path for e in errors] == [empty, text, missing, bomb]
    assert [e.reason.split(":")[0].split(" (")[0] for e in errors] == [
        "empty file",
        "not a recognised image format",
        "file not found",
        "image too large",
    ]


def test_validate_images_catches_decode_errors_and_restores_warning_filters(tmp_path: Path) -> None:
    data = io.BytesIO()
    _noise_rgb(64, 64).save(data, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(data.getvalue()[:1000])
    many = [_save(Image.new("RGB", (3, 3)), tmp_path / f"{i}.png") for i in range(20)]
    filters_before = list(warnings.filters)
    good, errors = validate_images([*many[:10], cut, *many[10:]])
    assert good == many
    assert len(errors) == 1 and errors[0].path == cut and "truncated or corrupt" in errors[0].reason
    assert warnings.filters == filters_before


def test_validate_images_empty_and_bad_thread_count(tmp_path: Path) -> None:
    assert validate_images([]) == ([], [])
    with pytest.raises(ValueError, match="num_threads"):
        validate_images([tmp_path / "x.png"], num_threads=0)
