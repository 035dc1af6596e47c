"""A corpus of generated inputs through ``dereflect remove`` and the Python API, each with its outcome.

Every file is made here (nothing third-party). A case is either *processed*: exit 0 and an output
equal to what the API gives for the same array; or *refused*: the expected exit code and one line
``dereflect: error: ...`` naming the problem, no traceback, no output and no temporary file. In
both, every input file is unchanged (SHA-256 before and after) and nothing is left half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cv2
import dereflect.cli
import numpy as np
import pytest
from dereflect import Remover
from dereflect.errors import InputError, ModelError
from dereflect.imageio import read_array, write_image
from image_fixtures import declared_only, tiff_bytes
from onnx_fixtures import make_crrn_export, make_rm2s_export

MAX_SIDE = 64  # the CLI and the API run with this, so that the larger inputs take the large-image path


def _photo(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth shapes and noise, uint8 BGR: real edges for the toy middle step."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.5 + 0.3 * np.sin(xx / 5.0 + seed)[:, :, None] * np.cos(yy / 7.0)[:, :, None]
    base = base + 0.2 * (((xx // 9 + yy // 11) % 2)[:, :, None] - 0.5) + 0.05 * rng.random((height, width, 3))
    return (np.clip(base, 0, 1) * 255).round().astype(np.uint8)


def _save(path: Path, array: np.ndarray, *params: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array, list(params))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _hashes(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_rm2s_export(tmp_path_factory.mktemp("corpus") / "rm2s")


@pytest.fixture(scope="module")
def api(model_dir) -> Remover:
    return Remover.load(model_dir, max_side=MAX_SIDE)


@pytest.fixture
def cli(monkeypatch):
    # Only the runtime's commands: the others may need extras that a runtime install lacks.
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_runtime",))
    return dereflect.cli.main


@dataclass
class Expect:
    """How a case is run (``args`` after ``remove``; the model options are added) and what it must give."""

    args: List[str]
    code: int = 0
    error: Optional[str] = None  # a regex one "dereflect: error:" line must match
    outputs: Dict[str, str] = field(default_factory=dict)  # output -> input it must be the API's result of
    check: Optional[Callable[[Path, str, str], None]] = None  # (case folder, stdout, stderr)
    options: List[str] = field(default_factory=list)


CASES = []


def case(make: Callable[[Path], Expect]) -> Callable[[Path], Expect]:
    CASES.append(pytest.param(make, id=make.__name__))
    return make


def _same_as_api(api: Remover, source: Path, target: Path, options: List[str]) -> None:
    image, info = read_array(source, max_pixels=None)
    remover = api
    if "--large-image" in options:
        remover = Remover.load(api.manifest.directory, max_side=MAX_SIDE, large_image="tile")
    want = remover.remove(image)
    got = cv2.imread(str(target), cv2.IMREAD_UNCHANGED)
    assert got is not None, target
    want = want if info.channels != 1 else want.reshape(got.shape)
    if want.dtype.kind == "f":
        want = (np.clip(want, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert got.shape == want.shape and got.dtype == want.dtype
    if target.suffix.lower() in (".jpg", ".jpeg"):
        assert np.abs(got.astype(float) - want).mean() < 2.0
    else:
        np.testing.assert_array_equal(got, want)


# -- formats that are processed -----------------------------------------------------------------

def _one(tmp: Path, name: str, data: Optional[bytes] = None, array: Optional[np.ndarray] = None,
         out: str = "out.png", *params: int) -> Expect:
    source = _write(tmp / "in" / name, data) if data is not None else _save(tmp / "in" / name, array, *params)
    return Expect([str(source), "-o", str(tmp / out)], outputs={out: f"in/{name}"})


@case
def png_8_bit(tmp):
    return _one(tmp, "a.png", array=_photo())


@case
def jpeg(tmp):
    return _one(tmp, "a.jpg", None, _photo(), "out.jpg", cv2.IMWRITE_JPEG_QUALITY, 95)


@case
def bmp(tmp):
    return _one(tmp, "a.bmp", array=_photo(), out="out.bmp")


@case
def webp_lossless(tmp):
    return _one(tmp, "a.webp", None, _photo(), "out.webp", cv2.IMWRITE_WEBP_QUALITY, 101)


@case
def ppm(tmp):
    return _one(tmp, "a.ppm", array=_photo(), out="out.ppm")


@case
def pgm_grey_stays_grey(tmp):
    return _one(tmp, "a.pgm", array=_photo()[:, :, 1], out="out.png")


@case
def tiff_little_endian(tmp):
    return _one(tmp, "a.tif", array=_photo(), out="out.tif")


@case
def tiff_big_endian(tmp):
    return _one(tmp, "a.tif", tiff_bytes(_photo()[:, :, ::-1], big_endian=True))


@case
def bigtiff(tmp):
    return _one(tmp, "a.tiff", tiff_bytes(_photo()[:, :, ::-1], bigtiff=True))


@case
def png_16_bit_stays_16_bit(tmp):
    return _one(tmp, "a.png", array=_photo().astype(np.uint16) * 257)


@case
def png_with_alpha_keeps_it(tmp):
    alpha = np.arange(24 * 32, dtype=np.uint8).reshape(24, 32)
    return _one(tmp, "a.png", array=np.dstack([_photo(), alpha]))


@case
def float_tiff_in_range(tmp):
    return _one(tmp, "a.tif", tiff_bytes(_photo()[:, :, ::-1].astype(np.float32) / 255, big_endian=True))


@case
def jpeg_with_motion_photo_trailer(tmp):
    ok, data = cv2.imencode(".jpg", _photo())
    # What a phone appends: an MP4 after the JPEG's end marker (with bytes that look like markers).
    trailer = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8 + b"\xff\xd9\xff\xd8tail"
    return _one(tmp, "motion.jpg", data.tobytes() + trailer, None, "out.jpg")


@case
def large_image_guided(tmp):
    return _one(tmp, "big.png", array=_photo(150, 210, seed=3))


@case
def large_image_tiles(tmp):
    expect = _one(tmp, "big.png", array=_photo(130, 170, seed=4))
    expect.options = ["--large-image", "tile"]
    return expect


@case
def large_grey_16_bit(tmp):
    return _one(tmp, "big.png", array=_photo(100, 140, seed=5)[:, :, 0].astype(np.uint16) * 255)


@case
def no_pixel_limit(tmp):
    expect = _one(tmp, "a.png", array=_photo())
    expect.options = ["--max-pixels", "0"]
    return expect


@case
def output_into_a_new_folder_keeps_the_name(tmp):
    source = _save(tmp / "in" / "a.png", _photo())
    return Expect([str(source), "-o", f"{tmp / 'new' / 'deeper'}/"], outputs={"new/deeper/a.png": "in/a.png"})


@case
def legal_244_byte_file_name(tmp):
    name = "é" * 100 + "x" * 40 + ".png"  # 244 bytes in UTF-8: the hidden temporary name must still fit
    assert len(name.encode()) == 244
    source = _save(tmp / "in" / name, _photo())
    return Expect([str(source), "-o", str(tmp / "out")], outputs={f"out/{name}": f"in/{name}"})


# -- image defects that are refused -------------------------------------------------------------

def _refused(tmp: Path, name: str, data: bytes, error: str, *options: str) -> Expect:
    source = _write(tmp / "in" / name, data)
    return Expect([str(source), "-o", str(tmp / "out.png")], code=2, error=error, options=list(options))


def _float_tiff(values: np.ndarray) -> bytes:
    return tiff_bytes(values.astype(np.float32))


@case
def float_tiff_with_nan(tmp):
    values = _photo().astype(np.float32) / 255
    values[3, 4, 1] = np.nan
    return _refused(tmp, "nan.tif", _float_tiff(values), r"nan\.tif contains 1 NaN or infinite")


@case
def float_tiff_with_infinity(tmp):
    values = _photo().astype(np.float32) / 255
    values[0, 0] = np.inf
    return _refused(tmp, "inf.tif", _float_tiff(values), r"inf\.tif contains 3 NaN or infinite")


@case
def float_tiff_in_0_to_255(tmp):
    return _refused(tmp, "255.tif", _float_tiff(_photo().astype(np.float32)), r"255\.tif has values in .*0-255")


@case
def jpeg_cut_short(tmp):
    ok, data = cv2.imencode(".jpg", _photo(64, 64))
    return _refused(tmp, "cut.jpg", data.tobytes()[: len(data) * 6 // 10], r"cut\.jpg: JPEG file is truncated")


@case
def jpeg_without_image_data(tmp):
    return _refused(tmp, "head.jpg", b"\xff\xd8\xff\xe0 truncated", r"head\.jpg: JPEG file is truncated")


@case
def png_cut_short(tmp):
    ok, data = cv2.imencode(".png", _photo(64, 64, seed=2))
    return _refused(tmp, "cut.png", data.tobytes()[: len(data) // 2], r"cut\.png: not a readable image")


@case
def empty_file(tmp):
    return _refused(tmp, "empty.png", b"", r"empty\.png: file is empty")


@case
def text_named_png(tmp):
    return _refused(tmp, "notes.png", b"this is not an image", r"notes\.png: not a readable image")


@case
def gif_named_png(tmp):
    return _refused(tmp, "anim.png", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", r"anim\.png: not a readable image")


@case
def over_the_pixel_limit(tmp):
    ok, data = cv2.imencode(".png", _photo())
    return _refused(tmp, "a.png", data.tobytes(), r"a\.png: image is 32x24 .*over the limit", "--max-pixels", "500")


def _declares_huge(kind: str, ext: str) -> Callable[[Path], Expect]:
    def make(tmp: Path) -> Expect:
        # A few hundred bytes declaring 24000 x 24000 (576 MP): refused from the header, not decoded.
        return _refused(tmp, f"huge.{ext}", declared_only(kind, 24000, 24000),
                        rf"huge\.{ext}: image is 24000x24000 \(576\.0 MP\), over the limit of 100 MP")
    make.__name__ = f"header_declares_24000x24000_{kind.replace('-', '_')}"
    return make


for _kind, _ext in (("png", "png"), ("jpg", "jpg"), ("tif", "tif"), ("tif-be", "tif"), ("bigtiff", "tiff"),
                    ("bmp", "bmp"), ("webp", "webp"), ("ppm", "ppm")):
    case(_declares_huge(_kind, _ext))


# -- folders ------------------------------------------------------------------------------------

def _folder(tmp: Path) -> Path:
    folder = tmp / "in"
    _save(folder / "a.png", _photo(seed=1))
    _save(folder / "b.jpg", _photo(seed=2))
    _save(folder / "sub" / "c.png", _photo(seed=3))
    _write(folder / "notes.txt", b"not an image")
    _save(folder / ".hidden.png", _photo(seed=4))
    return folder


@case
def folder_skips_subfolders_and_other_files_and_says_so(tmp):
    folder = _folder(tmp)

    def check(root: Path, out: str, err: str) -> None:
        assert sorted(p.name for p in (root / "out").iterdir()) == ["a.png", "b.jpg"]
        note = [line for line in err.splitlines() if "skipped" in line]
        assert len(note) == 1
        assert "1 subfolder(s) (use --recursive)" in note[0] and "1 file(s) that are not images" in note[0]
        assert "1 hidden file(s)" in note[0] and "2 image(s) written" in err

    return Expect([str(folder), "-o", str(tmp / "out")], outputs={"out/a.png": "in/a.png"}, check=check)


@case
def folder_recursive_keeps_the_structure(tmp):
    folder = _folder(tmp)

    def check(root: Path, out: str, err: str) -> None:
        written = sorted(str(p.relative_to(root / "out")) for p in (root / "out").rglob("*") if p.is_file())
        assert written == ["a.png", "b.jpg", "sub/c.png"]
        assert "subfolder" not in err and "not images" in err

    return Expect([str(folder), "-r", "-o", str(tmp / "out")], outputs={"out/sub/c.png": "in/sub/c.png"},
                  check=check)


@case
def recursive_run_skips_its_own_output_folder(tmp):
    folder = tmp / "in"
    _save(folder / "a.png", _photo())
    _save(folder / "clean" / "b.png", _photo(seed=5))  # the output of an earlier run, inside the input

    def check(root: Path, out: str, err: str) -> None:
        assert "1 output folder(s)" in err and not (folder / "clean" / "clean").exists()
        assert sorted(p.name for p in (folder / "clean").iterdir()) == ["a.png", "b.png"]

    return Expect([str(folder), "-r", "-o", str(folder / "clean")], outputs={"in/clean/a.png": "in/a.png"},
                  check=check)


@case
def folder_with_one_bad_image(tmp):
    folder = tmp / "in"
    _save(folder / "a.png", _photo(seed=1))
    _write(folder / "bad.jpg", b"\xff\xd8\xff\xe0 truncated")
    _save(folder / "c.png", _photo(seed=3))

    def check(root: Path, out: str, err: str) -> None:
        assert sorted(p.name for p in (root / "out").iterdir()) == ["a.png", "c.png"]
        assert "1 of 3 image(s) failed; 2 written" in err

    return Expect([str(folder), "-o", str(tmp / "out")], code=1, error=r"bad\.jpg: JPEG file is truncated",
                  outputs={"out/c.png": "in/c.png"}, check=check)


@case
def folder_run_again_does_only_the_rest(tmp):
    # As after an interrupted run: one output exists already; it is kept, the other images are done.
    folder = tmp / "in"
    for seed, name in enumerate(["a.png", "b.png", "c.png"]):
        _save(folder / name, _photo(seed=seed))
    _save(tmp / "out" / "b.png", _photo(seed=9))

    def check(root: Path, out: str, err: str) -> None:
        assert np.array_equal(cv2.imread(str(root / "out" / "b.png")), _photo(seed=9))
        assert "1 output(s) exist already and are kept, their inputs not run" in err and "b.png" in err
        assert "1 not run (output exists); 2 written" in err and "error" not in err

    return Expect([str(folder), "-o", str(tmp / "out")], code=0, outputs={"out/a.png": "in/a.png",
                  "out/c.png": "in/c.png"}, check=check)


@case
def folder_whose_every_output_exists(tmp):
    folder = tmp / "in"
    for seed, name in enumerate(["a.png", "b.png"]):
        _save(folder / name, _photo(seed=seed))
        _save(tmp / "out" / name, _photo(seed=9))

    def check(root: Path, out: str, err: str) -> None:
        assert all(np.array_equal(cv2.imread(str(p)), _photo(seed=9)) for p in (root / "out").iterdir())
        assert re.search(r"nothing to do: all 2 output\(s\) exist already .*; pass --overwrite", err), err

    # Nothing left to do is not a failure: a resumable script reruns the folder and gets 0.
    return Expect([str(folder), "-o", str(tmp / "out")], code=0, check=check)


@case
def folder_where_every_image_fails(tmp):
    folder = tmp / "in"
    _write(folder / "a.png", b"")
    _write(folder / "b.png", b"junk")
    return Expect([str(folder), "-o", str(tmp / "out")], code=2, error=r"b\.png: not a readable image")


@case
def empty_folder(tmp):
    (tmp / "in").mkdir()
    return Expect([str(tmp / "in"), "-o", str(tmp / "out")], code=2, error=r"in: folder holds no images")


@case
def folder_of_subfolders_only(tmp):
    _save(tmp / "in" / "sub" / "a.png", _photo())
    return Expect([str(tmp / "in"), "-o", str(tmp / "out")], code=2, error=r"no images .*use --recursive")


@case
def quiet_prints_nothing_on_success(tmp):
    folder = _folder(tmp)

    def check(root: Path, out: str, err: str) -> None:
        assert out == "" and err == ""

    return Expect([str(folder), "-q", "-o", str(tmp / "out")], outputs={"out/b.jpg": "in/b.jpg"}, check=check)


@case
def quiet_still_prints_errors(tmp):
    folder = tmp / "in"
    _save(folder / "a.png", _photo())
    _write(folder / "b.png", b"junk")

    def check(root: Path, out: str, err: str) -> None:
        assert out == "" and len(err.splitlines()) == 2  # the failure and the summary

    return Expect([str(folder), "--quiet", "-o", str(tmp / "out")], code=1, error=r"b\.png", check=check)


# -- output paths (checked before any work) -----------------------------------------------------

def _out(tmp: Path, output: str, error: str, *more: str) -> Expect:
    source = _save(tmp / "in" / "a.png", _photo())
    return Expect([str(source), *more, "-o", output], code=2, error=error)


@case
def output_under_an_existing_file(tmp):
    _save(tmp / "out" / "photo.jpg", _photo())
    return _out(tmp, str(tmp / "out" / "photo.jpg" / "x.png"), r"photo\.jpg is a file, not a folder")


@case
def output_folder_under_an_existing_file(tmp):
    _save(tmp / "out" / "photo.jpg", _photo())
    return _out(tmp, f"{tmp / 'out' / 'photo.jpg' / 'x'}/", r"photo\.jpg is a file, not a folder")


@case
def output_with_an_unknown_extension(tmp):
    return _out(tmp, str(tmp / "out.xyz"), r"'\.xyz' is not an image format .*end it with /")


@case
def output_named_gif(tmp):
    return _out(tmp, str(tmp / "out.gif"), r"'\.gif' is not an image format")


@case
def output_file_name_for_several_inputs(tmp):
    other = _save(tmp / "in" / "b.png", _photo(seed=1))
    return _out(tmp, str(tmp / "out.png"), r"names one image file", str(other))


@case
def output_name_too_long(tmp):
    return _out(tmp, str(tmp / ("x" * 300 + ".png")), r"is 304 bytes; this file system allows 255")


@case
def intermediate_names_too_long(tmp):
    name = "y" * 240 + ".png"
    source = _save(tmp / "in" / name, _photo())
    return Expect([str(source), "--save-intermediates", "-o", str(tmp / "out")], code=2,
                  error=r"\.mask_background\.png'?.* bytes; this file system allows 255")


@case
def output_through_a_broken_link(tmp):
    (tmp / "gone").symlink_to(tmp / "nowhere")
    return _out(tmp, str(tmp / "gone" / "x.png"), r"gone is a broken symbolic link")


@case
def output_is_the_input(tmp):
    source = _save(tmp / "in" / "a.png", _photo())
    return Expect([str(source), "--overwrite", "-o", str(source)], code=2, error=r"refusing to overwrite the input")


@case
def output_folder_is_the_input_folder(tmp):
    _save(tmp / "in" / "a.png", _photo())
    return Expect([str(tmp / "in"), "--overwrite", "-o", str(tmp / "in")], code=2,
                  error=r"refusing to overwrite the input")


@case
def existing_output_without_overwrite(tmp):
    _save(tmp / "out.png", _photo(seed=9))
    expect = _out(tmp, str(tmp / "out.png"), r"out\.png: file exists; pass --overwrite")
    expect.check = lambda root, out, err: _same_as_api_never(root)
    return expect


def _same_as_api_never(root: Path) -> None:
    # The existing output is untouched.
    assert np.array_equal(cv2.imread(str(root / "out.png")), _photo(seed=9))


@case
def two_inputs_with_one_output_name(tmp):
    first = _save(tmp / "in" / "x" / "a.png", _photo())
    second = _save(tmp / "in" / "y" / "a.png", _photo(seed=1))
    return Expect([str(first), str(second), "-o", str(tmp / "out")], code=2, error=r"would both be written")


@case
def input_not_found(tmp):
    return Expect([str(tmp / "missing.png"), "-o", str(tmp / "out.png")], code=2, error=r"missing\.png: file not found")


@case
def explicit_input_without_an_image_name_into_a_folder(tmp):
    source = _write(tmp / "in" / "notes.txt", b"text")
    return Expect([str(source), "-o", str(tmp / "out")], code=2, error=r"notes\.txt: not an image file name")


@case
def negative_pixel_limit(tmp):
    return _out(tmp, str(tmp / "out.png"), r"--max-pixels must be 0 \(no limit\) or positive", "--max-pixels", "-5")


@pytest.mark.parametrize("make", CASES)
def test_remove_corpus(make, tmp_path, cli, api, model_dir, capsys):
    expect = make(tmp_path)
    inputs = _hashes(tmp_path / "in") if (tmp_path / "in").exists() else {}
    before = set(_hashes(tmp_path))
    code = cli(["remove", *expect.args, "--model", str(model_dir), "--max-side", str(MAX_SIDE), *expect.options])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == expect.code, err
    for line in err.splitlines():
        shown = line.split("\r")[-1].strip()  # what a progress bar's last redraw left on the line
        assert not shown or shown.startswith("dereflect: ") or "image/s" in shown, f"stray output: {line!r}"
    errors = [line for line in err.splitlines() if line.startswith("dereflect: error:")]
    if expect.error:
        assert any(re.search(expect.error, line) for line in errors), err
    elif expect.code == 0:
        assert not errors, err
    after = _hashes(tmp_path / "in") if (tmp_path / "in").exists() else {}
    assert {k: v for k, v in after.items() if k in inputs} == inputs  # inputs unchanged
    assert not [p for p in tmp_path.rglob("*.tmp")], "a temporary file was left behind"
    if expect.code == 2:
        assert set(_hashes(tmp_path)) == before, "nothing may be written when nothing is done"
    for target, source in expect.outputs.items():
        _same_as_api(api, tmp_path / source, tmp_path / target, expect.options)
    if expect.check:
        expect.check(tmp_path, out, err)


def test_an_interrupted_folder_run_is_finished_by_running_it_again(tmp_path, cli, model_dir, monkeypatch, capsys):
    import dereflect.cli_runtime as runtime

    folder = tmp_path / "in"
    for seed, name in enumerate(["a.png", "b.png", "c.png"]):
        _save(folder / name, _photo(seed=seed))
    command = ["remove", str(folder), "-o", str(tmp_path / "out"), "--model", str(model_dir),
               "--max-side", str(MAX_SIDE)]
    real_remove_one = runtime._remove_one

    def ctrl_c_at_the_second_image(remover, source, target, args):
        if source.name == "b.png":
            raise KeyboardInterrupt
        real_remove_one(remover, source, target, args)

    monkeypatch.setattr(runtime, "_remove_one", ctrl_c_at_the_second_image)
    assert cli(command) == 130
    err = capsys.readouterr().err
    assert "1 of 3 image(s) written before the interruption; the same command again does the rest" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]

    monkeypatch.setattr(runtime, "_remove_one", real_remove_one)
    assert cli(command) == 0  # a.png kept as it was, b.png and c.png done: all done
    assert "1 not run (output exists); 2 written" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]


def test_corpus_has_the_cases_the_issue_lists():
    names = {param.id for param in CASES}
    assert len(names) == len(CASES) >= 40
    for wanted in ("float_tiff_with_nan", "float_tiff_in_0_to_255", "jpeg_with_motion_photo_trailer",
                   "output_under_an_existing_file", "legal_244_byte_file_name", "output_with_an_unknown_extension",
                   "output_named_gif", "header_declares_24000x24000_tif"):
        assert wanted in names


# -- a read-only output folder (really unwritable: as root, the check runs as another user) -------

def _unprivileged(function: Callable[[], object]) -> object:
    """``function()`` run without root's power to write anywhere (root ignores folder permissions)."""
    if os.geteuid() != 0:
        return function()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run, report, leave without pytest's clean-up
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            result = json.dumps(function())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            result = json.dumps(f"{type(exc).__name__}: {exc}")
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def shared_folder():
    """A folder another user can reach (pytest's own temporary folders are private to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="dereflect-corpus-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(folder)


def test_read_only_output_folder(shared_folder, monkeypatch):
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_runtime",))
    source = _save(shared_folder / "in" / "a.png", _photo())
    (shared_folder / "in").chmod(0o755)
    locked = shared_folder / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    before = _hashes(shared_folder)

    def run() -> object:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = dereflect.cli.main(["remove", str(source), "-o", str(locked / "sub" / "a.png")])
        try:
            write_image(locked / "b.png", np.zeros((4, 4, 3), np.uint8))
            api_error = ""
        except InputError as exc:
            api_error = str(exc)
        return [code, stderr.getvalue(), api_error]

    code, stderr, api_error = _unprivileged(run)
    assert code == 2 and "Traceback" not in stderr
    assert re.fullmatch(r"dereflect: error: .*a\.png: cannot write in .*locked \(Permission denied\)\n", stderr)
    assert "b.png: cannot write in" in api_error
    assert _hashes(shared_folder) == before and not any(locked.iterdir())


# -- export directories with a tampered manifest, through the CLI and the API ------------------

def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def _set_manifest(directory: Path, data: object) -> None:
    (directory / "manifest.json").write_text(json.dumps(data) if not isinstance(data, str) else data)


def _format_version_text(directory: Path) -> str:
    data = _manifest(directory)
    data["format_version"] = "one"
    _set_manifest(directory, data)
    return r"format_version must be a positive integer, got 'one'"


def _threshold_text(directory: Path) -> str:
    data = _manifest(directory)
    data["middle_step"] = {"c1": "0.5"}
    _set_manifest(directory, data)
    return r"c1 must be a finite number, got '0\.5'"


def _outside(directory: Path) -> Path:
    outside = directory.parent / "outside.onnx"
    shutil.copy(directory / "stage1.onnx", outside)  # the same bytes: the hash would match
    return outside


def _dot_dot_path(directory: Path) -> str:
    _outside(directory)
    data = _manifest(directory)
    data["networks"]["stage1"]["onnx"] = "../outside.onnx"
    _set_manifest(directory, data)
    return r"'\.\./outside\.onnx' is not a plain relative path inside the export directory"


def _absolute_path(directory: Path) -> str:
    outside = _outside(directory)
    data = _manifest(directory)
    data["networks"]["stage1"]["onnx"] = str(outside)
    _set_manifest(directory, data)
    return r"outside\.onnx' is not a plain relative path inside the export directory"


def _symlink_out(directory: Path) -> str:
    outside = _outside(directory)
    (directory / "stage1.onnx").unlink()
    (directory / "stage1.onnx").symlink_to(outside)
    return r"'stage1\.onnx' leads outside the export directory"


def _deeply_nested(directory: Path) -> str:
    _set_manifest(directory, "[" * 100_000 + "]" * 100_000)
    return r"manifest\.json is nested too deeply to be a manifest"


def _not_json(directory: Path) -> str:
    _set_manifest(directory, '{"format": "dereflect-export", ')
    return r"manifest\.json is not valid JSON"


def _unknown_method(directory: Path) -> str:
    data = _manifest(directory)
    data["method"] = ["rm2s"]
    _set_manifest(directory, data)
    return r"unknown method \['rm2s'\]"


def _channels_text(directory: Path) -> str:
    data = _manifest(directory)
    data["networks"]["stage2"]["inputs"][0]["channels"] = "9"
    _set_manifest(directory, data)
    return r"channels must be an integer >= 1, got '9'"


def _networks_list(directory: Path) -> str:
    data = _manifest(directory)
    data["networks"] = list(data["networks"].values())
    _set_manifest(directory, data)
    return r"networks must be an object, got list"


TAMPERED = [_format_version_text, _threshold_text, _channels_text, _networks_list, _dot_dot_path, _absolute_path,
            _symlink_out, _deeply_nested, _not_json, _unknown_method]


def _tamper_id(tamper: object) -> str:
    return tamper.__name__.strip("_")


@pytest.mark.parametrize("tamper", TAMPERED, ids=[_tamper_id(t) for t in TAMPERED])
def test_tampered_export_directory(tamper, tmp_path, cli, capsys):
    directory = make_rm2s_export(tmp_path / "export")
    error = tamper(directory)
    source = _save(tmp_path / "in" / "a.png", _photo())
    before = _hashes(tmp_path)
    assert cli(["remove", str(source), "-o", str(tmp_path / "out.png"), "--model", str(directory)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and len(err.splitlines()) == 1
    assert re.search(error, err), err
    with pytest.raises(ModelError, match=error):
        Remover.load(directory)
    assert _hashes(tmp_path) == before and not (tmp_path / "out.png").exists()


# -- arrays through the API ---------------------------------------------------------------------

@pytest.mark.parametrize("array, error", [
    (np.full((8, 8, 3), np.nan, np.float32), r"image( 0)? contains 192 NaN or infinite value\(s\)"),
    (np.full((8, 8, 3), -np.inf, np.float64), r"NaN or infinite"),
    (np.full((8, 8, 3), 200.0, np.float32), r"values in \[200, 200\]; float images must be in \[0, 1\].*0-255"),
    (np.full((8, 8, 3), -0.5, np.float32), r"values in \[-0\.5, -0\.5\]"),
    (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
    (np.zeros((8, 8, 3), np.int32), r"dtype int32"),
    (np.zeros((8, 8, 3), bool), r"dtype bool"),
    (np.zeros((0, 8, 3), np.uint8), r"empty"),
    ([[0, 1], [1, 0]], r"must be a numpy array, not list"),
], ids=["nan", "minus-infinity", "0-255-float", "negative", "two-channels", "int32", "bool", "empty", "list"])
def test_bad_arrays_through_the_api(api, array, error):
    for call in (api.remove, api.remove_with_intermediates, lambda a: api.remove_batch([a])):
        with pytest.raises(InputError, match=error):
            call(array)


def test_arrays_through_the_api_are_processed(api):
    frame = _photo(30, 40, seed=7)  # as cv2.imread gives it: BGR
    rgb = np.ascontiguousarray(frame[:, :, ::-1])
    out = api.remove(frame)
    np.testing.assert_array_equal(out, api.remove(rgb, colour_order="RGB")[:, :, ::-1])
    as_float = api.remove(frame.astype(np.float32) / 255)
    assert as_float.dtype == np.float32 and np.abs(as_float * 255 - out).max() <= 1.0
    assert api.remove(frame[:, :, 0]).shape == (30, 40)
    big = _photo(150, 210, seed=8)
    assert api.remove(big).shape == big.shape
    result = api.remove_with_intermediates(big)
    assert result.scale < 1 and result.confidence.shape == (46, 64)
    batch = api.remove_batch([frame, big, frame])
    np.testing.assert_array_equal(batch[0], out)
    np.testing.assert_array_equal(batch[1], api.remove(big))


def test_crrn_export_through_the_cli(tmp_path, cli, capsys):
    directory = make_crrn_export(tmp_path / "crrn")
    folder = tmp_path / "in"
    for seed in range(3):
        _save(folder / f"{seed}.png", _photo(seed=seed))
    before = _hashes(folder)
    assert cli(["remove", str(folder), "-o", str(tmp_path / "out"), "--model", str(directory),
                "--save-intermediates"]) == 0
    assert _hashes(folder) == before
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"{s}{suffix}" for s in range(3) for suffix in (".png", ".gradient.png",
                                                                          ".reflection.png"))
    got = cv2.imread(str(tmp_path / "out" / "1.png")).astype(float)
    assert np.abs(got - 0.7 * _photo(seed=1)).max() <= 1.0  # the toy CRRN keeps 0.7 of the image
