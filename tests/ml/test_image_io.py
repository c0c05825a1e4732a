"""load_rgb / image_size / probe_image: every colour mode we convert and every bad input we refuse."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melanoma_ml.images.io import (
    UPLOAD_FORMATS,
    UPLOAD_FORMATS_TEXT,
    ImageDecodeError,
    image_size,
    load_rgb,
    probe_image,
)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient_rgb(height: int = 24, width: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), np.full_like(xx, 90)], -1).astype(
        np.uint8
    )


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header (SOF0) of a baseline JPEG to declare another size."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


# --- colour modes ---------------------------------------------------------------------------------------

half_transparent = np.zeros((8, 8, 4), dtype=np.uint8)
half_transparent[:, :4] = (200, 10, 10, 255)  # opaque red-ish left half; right half fully transparent black

palette_img = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8), (8, 1)), mode="L").convert("P")


@pytest.mark.parametrize(
    ("name", "make", "fmt", "expected_corner", "expected_right"),
    [
        ("rgb png", lambda: Image.fromarray(gradient_rgb(8, 8)), "PNG", (0, 0, 90), None),
        (
            "grey L",
            lambda: Image.fromarray(np.full((8, 8), 77, np.uint8), mode="L"),
            "PNG",
            (77, 77, 77),
            None,
        ),
        ("bilevel 1", lambda: Image.new("1", (8, 8), 1), "PNG", (255, 255, 255), None),
        (
            "LA onto white",
            lambda: Image.fromarray(half_transparent, mode="RGBA").convert("LA"),
            "PNG",
            None,
            (255, 255, 255),
        ),
        (
            "RGBA onto white",
            lambda: Image.fromarray(half_transparent, mode="RGBA"),
            "PNG",
            (200, 10, 10),
            (255, 255, 255),
        ),
        ("palette P", lambda: palette_img, "PNG", (0, 0, 0), None),
        (
            "16-bit max",
            lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)),
            "PNG",
            (255, 255, 255),
            None,
        ),
        (
            "16-bit mid",
            lambda: Image.fromarray(np.full((8, 8), 32896, np.uint16)),
            "PNG",
            (128, 128, 128),
            None,
        ),
        ("CMYK jpeg", lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", (255, 255, 255), None),
    ],
)
def test_modes_convert_to_uint8_rgb(name, make, fmt, expected_corner, expected_right):
    out = load_rgb(encode(make(), fmt))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, name
    assert out.flags.c_contiguous
    if expected_corner is not None:
        np.testing.assert_allclose(out[0, 0], expected_corner, atol=2, err_msg=name)
    if expected_right is not None:
        np.testing.assert_allclose(out[0, -1], expected_right, atol=2, err_msg=name)


def test_palette_with_transparent_index_is_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    img.putpixel((0, 0), 1)
    out = load_rgb(encode(img, "PNG", transparency=0))
    assert tuple(out[0, 0]) == (10, 200, 10)
    assert tuple(out[3, 3]) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 30000, 65535]], dtype=np.uint16)
    out = load_rgb(encode(Image.fromarray(values), "PNG"))[0, :, 0]
    np.testing.assert_array_equal(out, np.round(values[0] / 257).astype(np.uint8))
    assert len(set(out.tolist())) == 5, "clipping would collapse everything above 255 to one value"


@pytest.mark.parametrize(
    ("values", "mode"),
    [
        (np.array([[-100_000, 0, 100_000]], dtype=np.int32), "I"),
        (np.array([[-1.5, 0.0, 2.5]], dtype=np.float32), "F"),
    ],
)
def test_32_bit_and_float_are_stretched_to_full_range(values, mode):
    img = Image.fromarray(values, mode=mode)
    out = load_rgb(encode(img, "TIFF"))[0, :, 0]
    assert out[0] == 0 and out[-1] == 255 and 0 < out[1] < 255


def test_exif_orientation_is_applied_and_reported_by_image_size():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:4, :4] = 255  # white block at the stored top-left corner
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(img, "PNG", exif=exif.tobytes())
    out = load_rgb(data)
    assert out.shape == (40, 20, 3)
    assert out[0, -1].min() > 200, "the stored top-left corner is displayed top-right after a CW turn"
    assert out[-1, 0].max() < 50
    assert image_size(data) == (20, 40)


def test_path_and_bytes_give_the_same_pixels(tmp_path: Path):
    data = encode(Image.fromarray(gradient_rgb()), "JPEG", quality=95)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_rgb(path), load_rgb(data))
    np.testing.assert_array_equal(load_rgb(str(path)), load_rgb(data))
    assert image_size(path) == (40, 24)
    assert probe_image(path) is None


# --- downscaling ----------------------------------------------------------------------------------------


def test_max_side_keeps_aspect_and_decodes_jpeg_at_reduced_scale(monkeypatch):
    data = encode(Image.fromarray(np.full((1500, 2000, 3), 128, np.uint8)), "JPEG")
    decoded_sizes: list[tuple[int, int]] = []
    original_load = Image.Image.load

    def spying_load(self):
        decoded_sizes.append(self.size)
        return original_load(self)

    monkeypatch.setattr(Image.Image, "load", spying_load)
    out = load_rgb(data, max_side=100)
    assert out.shape == (75, 100, 3)
    assert decoded_sizes and max(decoded_sizes[0]) <= 250, "JPEG draft should decode at 1/8 scale"


@pytest.mark.parametrize(("max_side", "shape"), [(1000, (24, 40, 3)), (20, (12, 20, 3)), (40, (24, 40, 3))])
def test_max_side_on_png(max_side, shape):
    assert load_rgb(encode(Image.fromarray(gradient_rgb()), "PNG"), max_side=max_side).shape == shape


def test_max_side_must_be_positive():
    with pytest.raises(ValueError, match="max_side"):
        load_rgb(encode(Image.fromarray(gradient_rgb()), "PNG"), max_side=0)


# --- bad input ------------------------------------------------------------------------------------------

good_jpeg = encode(Image.fromarray(gradient_rgb(64, 64)), "JPEG")
good_png = encode(Image.fromarray(gradient_rgb(64, 64)), "PNG")
huge_jpeg = with_jpeg_size(good_jpeg, 20000, 20000)  # above Pillow's own hard limit
large_jpeg = with_jpeg_size(good_jpeg, 8000, 8000)  # above our default max_pixels only


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.jpg", b"", "empty"),
        ("text.jpg", b"patient_id,age\nP1,45\n", "not a recognised image format"),
        (
            "random.png",
            bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)),
            "not a recognised",
        ),
        ("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "truncated or corrupt"),
        ("truncated.png", good_png[: len(good_png) // 2], "truncated or corrupt"),
        ("bad_header.jpg", good_jpeg[:2] + b"\xff\xc0\x00\x02" + good_jpeg[2:40], "truncated or corrupt"),
        ("huge.jpg", huge_jpeg, "decompression-bomb guard"),
        ("large.jpg", large_jpeg, "8000x8000 = 64,000,000 pixels"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path: Path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=problem) as info:
        load_rgb(path)
    message = str(info.value)
    assert str(path) in message, "the message must name the file"
    assert info.value.fix in message and ("remove" in message or "downscale" in message)
    reason = probe_image(path)
    assert reason is not None and problem in reason and str(path) not in reason
    if content:
        with pytest.raises(ImageDecodeError, match="uploaded bytes"):
            load_rgb(content)


def test_missing_file_and_folder(tmp_path: Path):
    missing = tmp_path / "jpeg" / "ISIC_1.jpg"
    with pytest.raises(ImageDecodeError, match=r"image file missing: .*ISIC_1\.jpg; set data.image_dir"):
        load_rgb(missing)
    assert probe_image(missing).startswith("image file missing")
    with pytest.raises(ImageDecodeError, match="missing"):
        image_size(missing)
    with pytest.raises(ImageDecodeError, match="folder"):
        load_rgb(tmp_path)


def test_empty_upload_names_uploaded_bytes():
    with pytest.raises(
        ImageDecodeError, match=r"^empty image \(0 bytes\): uploaded bytes; upload a JPEG"
    ) as exc:
        load_rgb(b"")
    assert exc.value.fix == f"upload a {UPLOAD_FORMATS_TEXT} image"


@pytest.mark.parametrize("fmt", UPLOAD_FORMATS)
def test_every_format_named_to_uploaders_decodes(fmt: str):
    """The app's upload label and hints name ``UPLOAD_FORMATS``: each of them must really decode."""
    assert fmt in UPLOAD_FORMATS_TEXT
    pixels = gradient_rgb()
    lossless = {"JPEG": {"quality": 100}, "WebP": {"lossless": True}}.get(fmt, {})
    decoded = load_rgb(encode(Image.fromarray(pixels), fmt, **lossless))
    assert decoded.shape == pixels.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - pixels).max() <= (16 if fmt == "JPEG" else 0)


def test_pixel_budget_is_checked_from_the_header_before_decoding(monkeypatch):
    def fail_load(self):
        raise AssertionError("pixels were decoded although the header was over budget")

    monkeypatch.setattr(Image.Image, "load", fail_load)
    with pytest.raises(ImageDecodeError, match="Pillow's hard limit"):
        load_rgb(huge_jpeg)
    with pytest.raises(ImageDecodeError, match="8000x8000"):
        load_rgb(large_jpeg)
    with pytest.raises(ImageDecodeError, match="64x64 = 4,096 pixels"):
        load_rgb(good_jpeg, max_pixels=4000)
    assert image_size(large_jpeg) == (8000, 8000), "image_size reads the header only"


def test_error_survives_pickling_and_can_name_a_row():
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(b"nope")
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value)
    assert str(info.value.with_source("x.jpg (row 17)")).startswith(
        "not a recognised image format: x.jpg (row 17);"
    )
    assert isinstance(info.value, ValueError)
