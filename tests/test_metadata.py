"""A photo's colour profile and EXIF reach its cleaned output (dereflect.metadata through imageio).

Inputs are made and outputs read back with Pillow, a reader independent of the code under test;
malformed metadata is built by hand. The pixels come from generated arrays (nothing third-party).
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import dereflect.cli
import numpy as np
import pytest
from dereflect.imageio import read_array, write_image
from onnx_fixtures import make_rm2s_export

Image = pytest.importorskip("PIL.Image", reason="Pillow reads the outputs back independently")
ImageCms = pytest.importorskip("PIL.ImageCms", reason="Pillow makes the test's ICC profiles")

ORIENTATION, DATE_TIME, MAKE = 0x0112, 0x0132, 0x010F


def _pixels(height: int = 30, width: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 6 % 256, yy * 8 % 256, (xx + yy) * 3 % 256], axis=2).astype(np.uint8)


def _profile(space: str = "sRGB", pad: int = 0) -> bytes:
    """A whole ICC profile; ``pad`` bytes more (its size field kept true) make one that needs parts."""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile(space)).tobytes()) + bytes(pad)
    struct.pack_into(">I", profile, 0, len(profile))
    return bytes(profile)


def _grey_profile() -> bytes:
    profile = bytearray(_profile())
    profile[16:20] = b"GRAY"
    return bytes(profile)


def _exif(orientation: int = 6):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[DATE_TIME] = "2026:12:07 10:00:00"
    exif[MAKE] = "TestCam"
    return exif


def _round_trip(source: Path, target: Path) -> Path:
    image, info = read_array(source)
    return write_image(target, image, info, colour_order="BGR")


@pytest.mark.parametrize("output", [".jpg", ".png"])
def test_jpeg_profile_and_exif_carried_upright(tmp_path, output):
    profile = _profile(pad=70_000)  # over one JPEG segment: written in two parts, read back whole
    source = tmp_path / "phone.jpg"
    Image.fromarray(_pixels()).save(source, exif=_exif(6), icc_profile=profile)
    out = Image.open(_round_trip(source, tmp_path / f"clean{output}"))
    assert out.size == (30, 40)  # the reader turned the pixels, as orientation 6 asks
    assert out.info["icc_profile"] == profile
    exif = out.getexif()
    assert (exif[ORIENTATION], exif[DATE_TIME], exif[MAKE]) == (1, "2026:12:07 10:00:00", "TestCam")


@pytest.mark.parametrize("output", [".jpg", ".png"])
def test_png_profile_and_exif_carried_with_its_orientation(tmp_path, output):
    profile = _profile()
    source = tmp_path / "scan.png"
    Image.fromarray(_pixels()).save(source, exif=_exif(6), icc_profile=profile)
    out = Image.open(_round_trip(source, tmp_path / f"clean{output}"))
    assert out.size == (40, 30)  # PNG pixels are read as stored, so the orientation still applies
    assert out.info["icc_profile"] == profile
    assert out.getexif()[ORIENTATION] == 6


def test_thumbnail_unlinked(tmp_path):
    source = tmp_path / "thumb.jpg"
    Image.fromarray(_pixels()).save(source, exif=_exif(1))
    data = bytearray(source.read_bytes())
    start = data.index(b"Exif\x00\x00") + 6
    order = "<" if data[start:start + 2] == b"II" else ">"
    (first,) = struct.unpack_from(order + "I", data, start + 4)
    (entries,) = struct.unpack_from(order + "H", data, start + first)
    link = start + first + 2 + 12 * entries
    struct.pack_into(order + "I", data, link, 8)  # a thumbnail directory linked after the first one
    source.write_bytes(bytes(data))
    _, info = read_array(source)
    block = info.metadata.exif
    assert struct.unpack_from(order + "I", block, first + 2 + 12 * entries) == (0,)
    assert block[:first + 2 + 12 * entries] == bytes(data[start:link])


def test_profile_only_to_an_output_of_its_kind(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(_pixels()[:, :, 0]).save(grey, icc_profile=_profile())  # an RGB profile on a grey image
    assert "icc_profile" not in Image.open(_round_trip(grey, tmp_path / "grey_out.png")).info
    Image.fromarray(_pixels()[:, :, 0]).save(grey, icc_profile=_grey_profile())
    assert Image.open(_round_trip(grey, tmp_path / "grey_out2.png")).info["icc_profile"] == _grey_profile()


def test_other_output_formats_written_without(tmp_path):
    source = tmp_path / "phone.jpg"
    Image.fromarray(_pixels()).save(source, exif=_exif(6), icc_profile=_profile())
    out = _round_trip(source, tmp_path / "clean.bmp")
    assert cv2.imread(str(out)).shape == (40, 30, 3)


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def test_malformed_metadata_left_out_and_image_written(tmp_path):
    ok, encoded = cv2.imencode(".jpg", _pixels())
    assert ok
    profile = _profile()
    broken = (
        _segment(0xE1, b"Exif\x00\x00MM\x00*\x7f\xff\xff\xff")  # its first directory far past the end
        + _segment(0xE2, b"ICC_PROFILE\x00\x02\x02" + profile[:200])  # part 2 of 2, part 1 missing
    )
    source = tmp_path / "broken.jpg"
    source.write_bytes(encoded.tobytes()[:2] + broken + encoded.tobytes()[2:])
    image, info = read_array(source)
    assert info.metadata is None
    out = Image.open(write_image(tmp_path / "out.jpg", image, info, colour_order="BGR"))
    assert "icc_profile" not in out.info and not dict(out.getexif())
    np.testing.assert_array_equal(image, cv2.imread(str(source)))


def test_oversized_profile_left_out(tmp_path, monkeypatch):
    import dereflect.metadata

    source = tmp_path / "big.png"
    Image.fromarray(_pixels()).save(source, icc_profile=_profile(pad=5000))
    monkeypatch.setattr(dereflect.metadata, "_ICC_INFLATED_MAX", 4000)
    assert read_array(source)[1].metadata is None


def test_cli_keeps_metadata_unless_stripped(tmp_path, monkeypatch):
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_runtime",))
    model = make_rm2s_export(tmp_path / "rm2s")
    source = tmp_path / "phone.jpg"
    Image.fromarray(_pixels()).save(source, exif=_exif(6), icc_profile=_profile())
    before = source.read_bytes()
    for name, extra in (("kept.jpg", []), ("stripped.jpg", ["--strip-metadata"])):
        code = dereflect.cli.main(["remove", str(source), "-o", str(tmp_path / name), "-q",
                                   "--model", str(model), "--max-side", "32", *extra])
        assert code == 0
    kept, stripped = Image.open(tmp_path / "kept.jpg"), Image.open(tmp_path / "stripped.jpg")
    assert kept.info["icc_profile"] == _profile() and kept.getexif()[MAKE] == "TestCam"
    assert "icc_profile" not in stripped.info and not dict(stripped.getexif())
    assert source.read_bytes() == before


def test_big_endian_exif_set_upright(tmp_path):
    # Hand-built, as cameras writing Motorola order do: IFD0 holds orientation 8 and Make, no thumbnail.
    make = b"BigEndianCam\x00"
    entries = [struct.pack(">HHIHH", ORIENTATION, 3, 1, 8, 0),
               struct.pack(">HHII", MAKE, 2, len(make), 8 + 2 + 12 * 2 + 4)]
    block = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 2) + b"".join(entries) + bytes(4) + make
    ok, encoded = cv2.imencode(".jpg", _pixels())
    assert ok
    source = tmp_path / "mm.jpg"
    source.write_bytes(encoded.tobytes()[:2] + _segment(0xE1, b"Exif\x00\x00" + block) + encoded.tobytes()[2:])
    out = Image.open(_round_trip(source, tmp_path / "out.jpg"))
    assert out.size == (30, 40)  # orientation 8 applied by the reader
    assert (out.getexif()[ORIENTATION], out.getexif()[MAKE]) == (1, "BigEndianCam")
