"""Image reading, validation and writing: every bad input is a clear InputError."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from dereflect.errors import InputError
from dereflect.imageio import (
    FLOAT_TOLERANCE,
    as_float_rgb,
    check_output_path,
    from_float_rgb,
    is_free_folder,
    output_layout,
    read_array,
    read_header,
    read_image,
    staged_file,
    staged_folder,
    staging_name,
    to_float_rgb,
    write_image,
)
from image_fixtures import declared_only, tiff_bytes


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


@pytest.mark.parametrize("dtype", [">u2", ">f4", "<u2"])
def test_arrays_in_either_byte_order_convert_and_come_back_as_given(dtype):
    """A big-endian uint16 (from a FITS or a network buffer) is a uint16 image, not a refused dtype
    or values read as floats."""
    rgb = np.random.default_rng(2).integers(0, 65536, (6, 8, 3)).astype(np.uint16)
    array = (rgb if "u" in dtype else (rgb / 65535.0)).astype(dtype)
    image, info = to_float_rgb(array)
    np.testing.assert_allclose(image, rgb / 65535.0, atol=1e-6)
    back = from_float_rgb(image, info)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_allclose(back.astype(np.float64), array.astype(np.float64), atol=1e-6 if "f" in dtype else 0)


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
    # A limit that is not a whole number of megapixels is said in pixels, never rounded to "0 MP".
    with pytest.raises(InputError, match=r"400x300 \(120,000 pixels\), over the limit of 1,000 pixels;"):
        read_image(path, max_pixels=1000)
    huge = tmp_path / "huge.png"
    huge.write_bytes(declared_only("png", 24000, 24000))
    with pytest.raises(InputError, match=r"24000x24000 \(576\.0 MP\), over the limit of 100 MP;"):
        read_image(huge)


@pytest.mark.parametrize("ext, params, channels", [
    (".png", [], 3), (".png", [], 4), (".jpg", [], 3), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], 3),
    (".jpg", [cv2.IMWRITE_JPEG_RST_INTERVAL, 2], 1), (".bmp", [], 3), (".bmp", [], 1), (".webp", [], 3),
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], 3), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], 4),
    (".tif", [], 3), (".ppm", [], 3), (".pgm", [], 1), (".pnm", [], 1),
])
def test_header_size_of_every_format_matches_the_decoded_image(tmp_path, ext, params, channels):
    image = np.dstack([_rgb8(37, 53)] * 2)[:, :, :channels]
    path = tmp_path / f"a{ext}"
    assert cv2.imwrite(str(path), image, params)
    kind, width, height = read_header(path.read_bytes())
    assert (width, height) == (53, 37), kind
    assert read_image(path)[0].shape == (37, 53, 3)
    with pytest.raises(InputError, match=r"53x37 .*over the limit"):
        read_image(path, max_pixels=53 * 37 - 1)


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("bigtiff", [False, True])
def test_tiffs_opencv_does_not_write(tmp_path, big_endian, bigtiff):
    rgb = _rgb8(9, 11)
    path = tmp_path / "a.tif"
    path.write_bytes(tiff_bytes(rgb, big_endian=big_endian, bigtiff=bigtiff))
    image, info = read_image(path)
    np.testing.assert_allclose(image, rgb / 255.0, atol=1e-6)
    path.write_bytes(declared_only("bigtiff" if bigtiff else "tif-be" if big_endian else "tif", 24000, 24000))
    with pytest.raises(InputError, match="24000x24000"):
        read_image(path)


def test_float_files_follow_the_array_rule(tmp_path):
    path = tmp_path / "f.tif"
    values = np.random.default_rng(0).random((6, 7, 3)).astype(np.float32)
    path.write_bytes(tiff_bytes(values))
    image, info = read_image(path)
    np.testing.assert_allclose(image, values, atol=1e-7)
    assert info.dtype == np.float32
    values[2, 2, 0] = np.nan
    path.write_bytes(tiff_bytes(values))
    with pytest.raises(InputError, match=r"f\.tif contains 1 NaN or infinite") as err:
        read_image(path)
    with pytest.raises(InputError, match="contains 1 NaN or infinite") as from_api:
        as_float_rgb(values)
    assert str(err.value).split(" contains ")[1] == str(from_api.value).split(" contains ")[1]
    path.write_bytes(tiff_bytes(np.nan_to_num(values) * 255))
    with pytest.raises(InputError, match="0-255"):
        read_image(path)


def test_float_images_are_written_as_float32_where_the_format_stores_floats(tmp_path):
    values = np.random.default_rng(2).random((6, 7, 3)).astype(np.float32)
    path = tmp_path / "f.tif"
    path.write_bytes(tiff_bytes(values))
    image, info = read_image(path)
    for name in ("o.tif", "o.tiff"):
        back = cv2.imread(str(write_image(tmp_path / name, image, info)), cv2.IMREAD_UNCHANGED)
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back[:, :, ::-1], values)
    # Clipped to [0, 1] as every output is; a float64 array is stored as float32.
    over = write_image(tmp_path / "over.tif", (image * 2).astype(np.float64), info)
    assert cv2.imread(str(over), cv2.IMREAD_UNCHANGED).max() == 1.0
    png = cv2.imread(str(write_image(tmp_path / "o.png", image, info)), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint8 and np.abs(png[:, :, ::-1] / 255.0 - values).max() <= 0.5 / 255 + 1e-6
    assert output_layout(tmp_path / "o.tif", info).dtype == np.float32
    assert output_layout(tmp_path / "o.webp", info).dtype == np.uint8


def test_pnm_outputs_hold_what_their_format_holds(tmp_path):
    colour = _save_bgr(tmp_path / "c.png", _rgb8())
    grey = _save_bgr(tmp_path / "g.png", _rgb8()[:, :, 0])
    image, info = read_image(colour)
    with pytest.raises(InputError, match=r"o\.pgm: \.pgm stores grey images only .*\.ppm, \.pnm or \.png"):
        output_layout(tmp_path / "o.pgm", info)
    with pytest.raises(InputError, match="grey images only"):
        write_image(tmp_path / "o.pgm", image, info)
    assert not (tmp_path / "o.pgm").exists()
    assert cv2.imread(str(write_image(tmp_path / "o.pnm", image, info)), cv2.IMREAD_UNCHANGED).shape == (24, 32, 3)
    image, info = read_image(grey)
    for ext, shape in ((".pgm", (24, 32)), (".pnm", (24, 32)), (".ppm", (24, 32, 3))):
        back = cv2.imread(str(write_image(tmp_path / f"g{ext}", image, info)), cv2.IMREAD_UNCHANGED)
        assert back.shape == shape, ext
        np.testing.assert_array_equal(back if back.ndim == 2 else back[:, :, 1], _rgb8()[:, :, 0])


def test_jpeg_end_marker_and_what_follows(tmp_path):
    ok, data = cv2.imencode(".jpg", _rgb8(40, 40), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = data.tobytes()
    path = tmp_path / "a.jpg"
    path.write_bytes(data + b"\x00\x00\x00\x18ftypmp42" + b"\xff\xd9" * 3)  # a motion photo's video
    assert read_image(path)[0].shape == (40, 40, 3)
    for cut in (len(data) - 2, len(data) * 2 // 3, 400):
        path.write_bytes(data[:cut])
        with pytest.raises(InputError, match="truncated"):
            read_image(path)


def test_read_array_keeps_what_the_file_stores(tmp_path):
    bgra = np.dstack([_rgb8(), np.full((24, 32), 9, np.uint8)])
    path = _save_bgr(tmp_path / "a.png", bgra)
    array, info = read_array(path)
    np.testing.assert_array_equal(array, bgra)
    assert info.channels == 4 and info.alpha is None and info.path == path
    out = write_image(tmp_path / "o.png", array, info, colour_order="BGR")
    np.testing.assert_array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), bgra)
    jpg = write_image(tmp_path / "o.bmp", array, info, colour_order="BGR")
    np.testing.assert_array_equal(cv2.imread(str(jpg), cv2.IMREAD_UNCHANGED), bgra[:, :, :3])
    deep = (bgra[:, :, :3].astype(np.uint16) * 257)
    # 16-bit to a format that stores 8 bits: rounded, a strip at a time.
    written = write_image(tmp_path / "d.bmp", deep, read_array(_save_bgr(tmp_path / "d.png", deep))[1],
                          colour_order="BGR")
    np.testing.assert_array_equal(cv2.imread(str(written), cv2.IMREAD_UNCHANGED), bgra[:, :, :3])
    rgb = write_image(tmp_path / "rgb.png", bgra[:, :, 2::-1], colour_order="RGB")
    np.testing.assert_array_equal(cv2.imread(str(rgb)), bgra[:, :, :3])


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


def test_output_paths_are_checked_before_writing(tmp_path):
    image = np.zeros((4, 5, 3), np.float32)
    (tmp_path / "photo.jpg").write_bytes(b"x")
    for path, match in [
        (tmp_path / "photo.jpg" / "x.png", "photo.jpg is a file, not a folder"),
        (tmp_path / "out.xyz", "not an image file name"),
        (tmp_path / "out", "no extension"),
        (tmp_path / ("n" * 252 + ".png"), "the file name is 256 bytes"),
        (tmp_path / ("d" * 300) / "x.png", "the folder name 'dddd.*'... is 300 bytes"),
    ]:
        with pytest.raises(InputError, match=match):
            write_image(path, image)
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_output_path(tmp_path / "photo.jpg", folder=True)
    assert check_output_path(tmp_path / "new" / "deeper", folder=True) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()
    (tmp_path / "out.png").mkdir()
    with pytest.raises(InputError, match=r"out\.png: is a folder; name the output file, e\.g\. .*out\.png/clean\.png"):
        write_image(tmp_path / "out.png", image)
    (tmp_path / "out.png").rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]


def test_a_folder_is_probed_for_writing_once(tmp_path, monkeypatch):
    import dereflect.imageio as imageio

    probes = []
    real_mkstemp = imageio.tempfile.mkstemp

    def counted(*args, **kwargs):
        probes.append(kwargs.get("dir"))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(imageio, "_WRITABLE_FOLDERS", set())
    monkeypatch.setattr(imageio.tempfile, "mkstemp", counted)
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / "out" / name, np.zeros((4, 5, 3), np.float32))
    # The nearest existing folder before out/ existed, then out/ itself: once each.
    assert probes == [tmp_path, tmp_path / "out"]
    check_output_path(tmp_path / "out" / "d.png")
    assert probes == [tmp_path, tmp_path / "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]


def test_the_longest_legal_name_is_written(tmp_path):
    path = tmp_path / ("z" * 251 + ".png")
    assert len(staging_name(path).name.encode()) <= 255
    assert staging_name(path).name.startswith(".z") and staging_name(path).suffix == ".tmp"
    write_image(path, np.zeros((4, 5, 3), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_written_images_get_the_usual_file_permissions(tmp_path):
    import stat

    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    out = write_image(tmp_path / "out.png", np.zeros((4, 5, 3), np.float32))
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_staged_folder_appears_whole_or_not_at_all_and_replaces_only_when_told(tmp_path):
    out = tmp_path / "made"
    with staged_folder(out) as staged:
        (staged / "a.txt").write_text("one")
        assert not out.exists() and staged.parent == tmp_path and staged.name.startswith(".made.")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError, match="half way"):
        with staged_folder(out, replace=True) as staged:
            (staged / "b.txt").write_text("two")
            raise RuntimeError("half way")
    with pytest.raises(InputError, match="exists; nothing was written"):
        with staged_folder(out) as staged:
            (staged / "c.txt").write_text("three")
    assert [p.name for p in out.iterdir()] == ["a.txt"] and [p.name for p in tmp_path.iterdir()] == ["made"]
    with staged_folder(out, replace=True) as staged:
        (staged / "d.txt").write_text("four")
    assert [p.name for p in out.iterdir()] == ["d.txt"] and [p.name for p in tmp_path.iterdir()] == ["made"]
    # A place no folder can go: one line naming why (export onnx -o FILE/sub was an OSError's traceback).
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(InputError, match="afile is a file, not a folder"):
        with staged_folder(tmp_path / "afile" / "sub"):
            pass
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_staged_file_replaces_its_target_whole_or_not_at_all_and_touches_no_other_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    users_file = tmp_path / "report.json.tmp"
    users_file.write_text("the user's")
    with pytest.raises(RuntimeError, match="half way"):
        with staged_file(target) as staged:
            staged.write_text("half")
            raise RuntimeError("half way")
    assert target.read_text() == "old"
    with staged_file(target) as staged:
        assert staged.parent == tmp_path and staged.name.startswith(".report.") and not staged.exists()
        staged.write_text("new")
    assert target.read_text() == "new" and users_file.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.json.tmp"]


def test_a_staged_folder_takes_an_empty_folder_is_an_ordinary_folder_and_keeps_the_old_one_on_failure(
        tmp_path, monkeypatch):
    import os
    import stat

    out, plain = tmp_path / "made", tmp_path / "plain"
    out.mkdir()  # made for the purpose: counts as none
    plain.mkdir()
    with staged_folder(out) as staged:
        (staged / "a.txt").write_text("one")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not mkdtemp's 0700
    real_replace = os.replace

    def full_disk_for_the_new_folder(source, target):
        if str(source).endswith(".partial"):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk_for_the_new_folder)
    with pytest.raises(OSError, match="No space"):
        with staged_folder(out, replace=True) as staged:
            (staged / "b.txt").write_text("two")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made", "plain"]


def test_a_free_folder_is_nothing_or_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    assert is_free_folder(tmp_path / "none") and is_free_folder(tmp_path / "empty")
    assert not any(is_free_folder(tmp_path / name) for name in ("full", "file", "link"))


def test_a_new_output_folder_must_be_free(tmp_path):
    from dereflect.imageio import check_new_folder

    check_new_folder(tmp_path / "new")  # nothing there
    (tmp_path / "empty").mkdir()
    check_new_folder(tmp_path / "empty")  # made for the purpose
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.png").write_bytes(b"mine")
    with pytest.raises(InputError, match="exists and is not an empty folder; choose a new folder"):
        check_new_folder(tmp_path / "full")
    assert (tmp_path / "full" / "keep.png").read_bytes() == b"mine"
