"""Image reading, validation and writing: every bad input is a clear InputError."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from dereflect.errors import InputError
from dereflect.imageio import (
    FLOAT_TOLERANCE,
    as_float_rgb,
    from_float_rgb,
    read_image,
    to_float_rgb,
    write_image,
)


def _rgb8(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_bgr(path, array):
    assert cv2.imwrite(str(path), array)
    return path


def test_read_png_is_rgb_float(tmp_path):
    rgb = _rgb8()
    path = _save_bgr(tmp_path / "a.png", rgb[:, :, ::-1])
    image, info = read_image(path)
    assert image.dtype == np.float32 and image.shape == (24, 32, 3)
    np.testing.assert_allclose(image, rgb / 255.0, atol=1e-6)
    assert info.dtype == np.uint8 and info.channels == 3 and info.alpha is None and info.path == path


def test_grey_png_becomes_three_channels_and_is_written_grey(tmp_path):
    grey = _rgb8()[:, :, 0]
    path = _save_bgr(tmp_path / "g.png", grey)
    image, info = read_image(path)
    assert image.shape == (24, 32, 3) and info.grey
    np.testing.assert_allclose(image[:, :, 0], image[:, :, 2])
    out = write_image(tmp_path / "out.png", image, info)
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert back.ndim == 2
    assert np.abs(back.astype(int) - grey.astype(int)).max() <= 1


def test_rgba_alpha_kept_aside_and_reattached(tmp_path):
    bgra = np.dstack([_rgb8(), np.linspace(0, 255, 24 * 32).reshape(24, 32).astype(np.uint8)])
    path = _save_bgr(tmp_path / "a.png", bgra)
    image, info = read_image(path)
    assert image.shape == (24, 32, 3) and info.channels == 4
    out = cv2.imread(str(write_image(tmp_path / "o.png", image, info)), cv2.IMREAD_UNCHANGED)
    assert out.shape == (24, 32, 4)
    np.testing.assert_array_equal(out[:, :, 3], bgra[:, :, 3])
    # JPEG cannot store alpha: documented to be dropped.
    jpg = cv2.imread(str(write_image(tmp_path / "o.jpg", image, info)), cv2.IMREAD_UNCHANGED)
    assert jpg.shape == (24, 32, 3)


def test_sixteen_bit_round_trip(tmp_path):
    rgb16 = np.random.default_rng(1).integers(0, 65536, (10, 12, 3), dtype=np.uint16)
    path = _save_bgr(tmp_path / "d.png", rgb16[:, :, ::-1])
    image, info = read_image(path)
    assert info.bit_depth == 16
    np.testing.assert_allclose(image, rgb16 / 65535.0, atol=1e-6)
    back = cv2.imread(str(write_image(tmp_path / "o.png", image, info)), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back[:, :, ::-1], rgb16)
    jpg = write_image(tmp_path / "o.jpg", image, info)
    assert cv2.imread(str(jpg), cv2.IMREAD_UNCHANGED).dtype == np.uint8


@pytest.mark.parametrize("fraction", [0.3, 0.8])
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_file_is_an_input_error(tmp_path, ext, fraction):
    ok, data = cv2.imencode(ext, _rgb8(64, 64))
    path = tmp_path / f"cut{ext}"
    path.write_bytes(data.tobytes()[: int(len(data) * fraction)])
    with pytest.raises(InputError, match=str(path.name)):
        read_image(path)


def test_zero_size_missing_and_non_image(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_image(empty)
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(InputError, match="not a readable image"):
        read_image(text)
    with pytest.raises(InputError, match="not a file"):
        read_image(tmp_path)


def test_huge_image_refused_from_header_and_limit_can_be_raised(tmp_path):
    path = _save_bgr(tmp_path / "big.png", np.zeros((300, 400, 3), np.uint8))
    jpg = _save_bgr(tmp_path / "big.jpg", np.zeros((300, 400, 3), np.uint8))
    for p in (path, jpg):
        with pytest.raises(InputError, match=r"300x400|400x300") as err:
            read_image(p, max_pixels=100_000)
        assert "max_pixels" in str(err.value)
        assert read_image(p, max_pixels=200_000)[0].shape == (300, 400, 3)


def test_huge_image_refused_after_decode_when_header_unknown(tmp_path):
    path = _save_bgr(tmp_path / "big.bmp", np.zeros((300, 400, 3), np.uint8))
    with pytest.raises(InputError, match="MP"):
        read_image(path, max_pixels=100_000)


def test_write_is_atomic_and_refuses_input_and_existing(tmp_path):
    path = _save_bgr(tmp_path / "in.png", _rgb8())
    image, info = read_image(path)
    before = path.read_bytes()
    with pytest.raises(InputError, match="input image"):
        write_image(path, image, info, overwrite=True)
    assert path.read_bytes() == before
    out = write_image(tmp_path / "out.png", image * 0.5, info)
    with pytest.raises(InputError, match="exists"):
        write_image(out, image, info)
    write_image(out, image, info, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(InputError, match="format"):
        write_image(tmp_path / "out.xyz", image)


def test_arrays_uint8_float_bgr_and_shapes():
    rgb = _rgb8()
    as_float = as_float_rgb(rgb)
    np.testing.assert_allclose(as_float, rgb / 255.0, atol=1e-6)
    np.testing.assert_allclose(as_float_rgb(rgb[:, :, ::-1].copy(), "BGR"), as_float)
    values, info = to_float_rgb(rgb[:, :, ::-1].copy(), "bgr")
    np.testing.assert_array_equal(from_float_rgb(values, info, "BGR"), rgb[:, :, ::-1])
    grey = rgb[:, :, 0]
    values, info = to_float_rgb(grey)
    assert values.shape == (24, 32, 3) and from_float_rgb(values, info).shape == (24, 32)
    values, info = to_float_rgb(rgb.astype(np.float64) / 255)
    assert from_float_rgb(values, info).dtype == np.float64


@pytest.mark.parametrize(
    "array, match",
    [
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 4, 3), np.inf, np.float32), "NaN or infinite"),
        (np.full((4, 4, 3), 200.0, np.float32), "0-255"),
        (np.full((4, 4, 3), -0.5, np.float32), r"\[0, 1\]"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((4, 4, 3), np.int32), "dtype"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
    ],
)
def test_bad_arrays(array, match):
    with pytest.raises(InputError, match=match):
        as_float_rgb(array)


def test_tiny_float_excursions_are_clipped():
    array = np.array([[[-FLOAT_TOLERANCE / 2, 0.5, 1 + FLOAT_TOLERANCE / 2]]], np.float32)
    out = as_float_rgb(array)
    np.testing.assert_allclose(out, [[[0.0, 0.5, 1.0]]])


def test_bad_colour_order():
    with pytest.raises(InputError, match="colour_order"):
        as_float_rgb(_rgb8(), "RGBA")


def test_written_images_get_the_usual_file_permissions(tmp_path):
    import stat

    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    out = write_image(tmp_path / "out.png", np.zeros((4, 5, 3), np.float32))
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
