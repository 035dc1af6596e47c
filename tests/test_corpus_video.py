"""A corpus of generated video cases through ``dereflect video``, each with its expected outcome.

Every case runs the real command in a subprocess (what a user sees: stderr at the file-descriptor
level, OpenCV's and FFmpeg's own lines included) on files made here, with the toy ONNX exports.
Each either processes the video (frame count, exact size and rate checked by reading the output
back; the audio note once) or fails with exit status 2 and exactly one line naming the problem.
For every case: no traceback, no OpenCV/FFmpeg log line, no hidden partial or probe file left,
and every file that existed before (inputs, an output not to be replaced) unchanged by hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import pytest
from dereflect.video import has_gstreamer

W, H, FPS, COUNT = 96, 48, 12.0, 12


@dataclass
class Ok:
    frames: int
    size: Tuple[int, int] = (W, H)
    output: str = "out.mp4"
    code: int = 0
    #: Texts the summary must hold.
    says: Tuple[str, ...] = ()


@dataclass
class Err:
    #: A regular expression the one error line must match.
    match: str


@dataclass
class Case:
    name: str
    #: Builds the inputs in the case's folder; returns the command's arguments after ``video``.
    make: Callable[[Path], List[str]]
    expect: object
    model: str = "crrn"
    env: Dict[str, Optional[str]] = field(default_factory=dict)
    skip: Optional[str] = None


def _clip(path: Path, count: int = COUNT, size: Tuple[int, int] = (W, H), fourcc: str = "MJPG",
          colour: bool = True) -> Path:
    """A clip whose frame i is a gradient shifted by i (so frames differ), written with ``fourcc``."""
    width, height = size
    # OpenCV's own AVI writer for odd sizes: FFmpeg's would crop them to even.
    api = cv2.CAP_OPENCV_MJPEG if (width % 2 or height % 2) else cv2.CAP_ANY
    writer = cv2.VideoWriter(str(path), api, cv2.VideoWriter_fourcc(*fourcc), FPS, size, colour)
    assert writer.isOpened(), path
    ramp = np.linspace(20, 230, width, dtype=np.float32)
    for i in range(count):
        plane = np.tile(np.roll(ramp, 3 * i), (height, 1)).astype(np.uint8)
        writer.write(np.dstack([plane, plane[:, ::-1], np.full_like(plane, 40 + 10 * i)]) if colour else plane)
    writer.release()
    return path


def _damaged(path: Path, frames: List[int]) -> Path:
    """An MJPEG AVI with the JPEG data of ``frames`` zeroed: the decoder fails on exactly those."""
    _clip(path, 11)
    data = bytearray(path.read_bytes())
    at, chunks = data.find(b"00dc"), []
    while at != -1:
        size = struct.unpack("<I", data[at + 4:at + 8])[0]
        if data[at + 8:at + 10] == b"\xff\xd8":
            chunks.append((at + 8, size))
        at = data.find(b"00dc", at + 4)
    for index in frames:
        offset, size = chunks[index]
        data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))
    return path


def _truncated(path: Path, fraction: float) -> Path:
    _clip(path, 11)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


def _zero_frames(path: Path) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    writer.release()
    return path


def _decodable(path: Path) -> int:
    """Frames OpenCV itself decodes from ``path`` before its first failed read (the oracle for a cut file)."""
    capture, count = cv2.VideoCapture(str(path)), 0
    while capture.read()[0]:
        count += 1
    return count


def _unwritable(folder: Path) -> str:
    """An output path in a folder this process may not write to."""
    if os.geteuid() != 0:
        locked = folder / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return str(locked / "out.mp4")
    # root may write anywhere os.access is asked about, but not into sysfs.
    return "/sys/out.mp4"


def _file(folder: Path, name: str, data: bytes) -> str:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return name


def _folder(folder: Path, name: str) -> str:
    (folder / name).mkdir()
    return name


def _broken_link(folder: Path, name: str) -> str:
    (folder / name).symlink_to(folder / "missing")
    return name


def _simple(tmp: Path) -> List[str]:
    _clip(tmp / "in.avi")
    return ["in.avi", "-o", "out.mp4"]


CASES = [
    Case("avi-to-mp4", _simple, Ok(COUNT)),
    Case("avi-to-avi", lambda d: [_clip(d / "in.avi").name, "-o", "out.avi"], Ok(COUNT, output="out.avi")),
    Case("mp4-to-mkv", lambda d: [_clip(d / "in.mp4", fourcc="mp4v").name, "-o", "out.mkv"],
         Ok(COUNT, output="out.mkv")),
    Case("avi-to-mov", lambda d: [_clip(d / "in.avi").name, "-o", "out.mov"], Ok(COUNT, output="out.mov")),
    Case("grey-source", lambda d: [_clip(d / "in.avi", colour=False).name, "-o", "out.avi"],
         Ok(COUNT, output="out.avi")),
    Case("odd-size-kept-in-avi", lambda d: [_clip(d / "in.avi", size=(97, 49)).name, "-o", "out.avi"],
         Ok(COUNT, size=(97, 49), output="out.avi", says=("97x49",))),
    Case("odd-size-rm2s", lambda d: [_clip(d / "in.avi", 5, size=(161, 121)).name, "-o", "out.avi"],
         Ok(5, size=(161, 121), output="out.avi"), model="rm2s"),
    Case("odd-size-refused-for-mp4", lambda d: [_clip(d / "in.avi", size=(97, 49)).name, "-o", "out.mp4"],
         Err(r"frames are 97x49; the \.mp4 encoders need an even width and height.*96x48.*\.avi")),
    Case("damaged-middle-frame", lambda d: [_damaged(d / "in.avi", [5]).name, "-o", "out.avi"],
         Ok(11, output="out.avi", code=1, says=("1 frame(s) could not be decoded (frame 5)",
                                                "previous output frame"))),
    Case("damaged-first-frames", lambda d: [_damaged(d / "in.avi", [0, 1]).name, "-o", "out.avi"],
         Ok(11, output="out.avi", code=1, says=("could not be decoded (frame 0, 1)",))),
    Case("cut-file-reads-to-the-cut", lambda d: [_truncated(d / "in.avi", 0.8).name, "-o", "out.avi"],
         Ok(-1, output="out.avi", says=("the source reported 11 frames but only",))),
    # Cut before its first frame: unopenable or frameless, depending on the FFmpeg build.
    Case("cut-file-without-frames", lambda d: [_truncated(d / "in.avi", 0.5).name, "-o", "out.mp4"],
         Err(r"in\.avi: (OpenCV cannot open it|no frame could be decoded)")),
    Case("zero-frames", lambda d: [_zero_frames(d / "in.avi").name, "-o", "out.mp4"],
         Err(r"in\.avi: no frame could be decoded.*nothing written")),
    Case("zero-frames-new-folder", lambda d: [_zero_frames(d / "in.avi").name, "-o", "new/deeper/out.mp4"],
         Err(r"no frame could be decoded")),
    Case("empty-file", lambda d: [_file(d, "in.mp4", b""), "-o", "out.mp4"],
         Err(r"in\.mp4: file is empty")),
    Case("not-a-video", lambda d: [_file(d, "in.mp4", os.urandom(4096)), "-o", "out.mp4"],
         Err(r"in\.mp4: OpenCV cannot open it")),
    Case("text-named-avi", lambda d: [_file(d, "in.avi", b"hello\n" * 100), "-o", "out.avi"],
         Err(r"in\.avi: OpenCV cannot open it")),
    Case("missing-input", lambda d: ["nope.mp4", "-o", "out.mp4"], Err(r"nope\.mp4: video file not found")),
    Case("input-is-a-folder", lambda d: [_folder(d, "clips"), "-o", "out.mp4"],
         Err(r"clips: is a folder, not a video file")),
    Case("output-under-a-file", lambda d: _simple(d)[:1] + ["-o", _file(d, "out.mp4", b"x") + "/x.mp4"],
         Err(r"out\.mp4/x\.mp4: out\.mp4 is a file, not a folder")),
    Case("output-folder-is-a-broken-link",
         lambda d: _simple(d)[:1] + ["-o", _broken_link(d, "gone") + "/out.mp4"],
         Err(r"gone/out\.mp4: gone is a broken symbolic link, not a folder")),
    Case("folder-name-too-long", lambda d: _simple(d)[:1] + ["-o", "f" * 300 + "/out.mp4"],
         Err(r"the folder name 'f+'\.\.\. is 300 bytes; this file system allows 255")),
    Case("unknown-extension", lambda d: _simple(d)[:1] + ["-o", "out.xyz"], Err(r"unknown video extension '\.xyz'")),
    Case("gif-extension", lambda d: _simple(d)[:1] + ["-o", "out.gif"], Err(r"unknown video extension '\.gif'")),
    Case("no-extension", lambda d: _simple(d)[:1] + ["-o", "out"], Err(r"unknown video extension '\(none\)'")),
    Case("output-is-a-folder", lambda d: _simple(d)[:1] + ["-o", _folder(d, "outdir")],
         Err(r"outdir: is a folder; name the output file")),
    Case("output-exists", lambda d: _simple(d)[:2] + [_file(d, "out.mp4", b"keep")],
         Err(r"out\.mp4: file exists; pass --overwrite")),
    Case("output-exists-overwrite", lambda d: _simple(d)[:2] + [_file(d, "out.mp4", b"old"), "--overwrite"],
         Ok(COUNT)),
    Case("output-is-the-input", lambda d: _simple(d)[:1] + ["-o", "in.avi", "--overwrite"],
         Err(r"refusing to overwrite the input video")),
    Case("unwritable-folder", lambda d: _simple(d)[:1] + ["-o", _unwritable(d)], Err(r"cannot write in .*denied")),
    Case("name-too-long", lambda d: _simple(d)[:1] + ["-o", "n" * 296 + ".mp4"],
         Err(r"the file name is 300 bytes; this file system allows 255")),
    Case("long-name-fits", lambda d: _simple(d)[:1] + ["-o", "n" * 250 + ".avi"],
         Ok(COUNT, output="n" * 250 + ".avi")),
    Case("new-nested-folder", lambda d: _simple(d)[:1] + ["-o", "a/b/out.mp4"], Ok(COUNT, output="a/b/out.mp4")),
    Case("preview", lambda d: _simple(d) + ["--preview"],
         Ok(COUNT, size=(2 * W, H), says=(f"{2 * W}x{H} (input | output, each {W}x{H})",))),
    Case("max-frames", lambda d: _simple(d) + ["--max-frames", "5"], Ok(5)),
    Case("missing-camera", lambda d: ["99", "--camera", "-o", "cam.mp4"],
         Err(r"^dereflect: error: camera 99: cannot open it \(no such camera")),
    Case("pipeline-without-gstreamer", lambda d: ["videotestsrc ! appsink", "-o", "out.mp4"],
         Err(r"the input looks like a GStreamer pipeline .*no GStreamer"),
         skip="this OpenCV has GStreamer: pipelines are accepted" if has_gstreamer() else None),
    Case("show-without-display", lambda d: _simple(d) + ["--show"], Err(r"--show needs a display"),
         env={"DISPLAY": None, "WAYLAND_DISPLAY": None}, skip=None if sys.platform.startswith("linux") else
         "the display check is for Linux (X11/Wayland)"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    from onnx_fixtures import make_crrn_export, make_rm2s_export

    root = tmp_path_factory.mktemp("models")
    return {"crrn": make_crrn_export(root / "crrn"), "rm2s": make_rm2s_export(root / "rm2s")}


def _hashes(folder: Path) -> Dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _read_back(path: Path) -> Tuple[int, Tuple[int, int], float]:
    capture = cv2.VideoCapture(str(path))
    frames, size = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames, size = frames + 1, (frame.shape[1], frame.shape[0])
    return frames, size, capture.get(cv2.CAP_PROP_FPS)


def test_corpus_has_enough_cases():
    assert len(CASES) >= 15 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case(case: Case, tmp_path: Path, models: Dict[str, Path]):
    if case.skip:
        pytest.skip(case.skip)
    work = tmp_path / "case"
    work.mkdir()
    args = case.make(work)
    before, model_before, paths_before = _hashes(work), _hashes(models[case.model]), set(work.rglob("*"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key, value in case.env.items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    result = subprocess.run(
        [sys.executable, "-m", "dereflect.cli", "video", *args, "--model", str(models[case.model]),
         "--threads", "1", "--no-progress"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )
    err = result.stderr
    lines = err.strip().splitlines()
    assert "Traceback" not in err and result.stdout == "", err
    assert not [line for line in lines if re.match(r"\s*\[|OpenCV|Unexpected", line)], err  # library log lines
    leftovers = [p for p in work.rglob("*") if "partial" in p.name or p.name.startswith(".dereflect-probe")]
    assert leftovers == [], err
    after = _hashes(work)
    assert _hashes(models[case.model]) == model_before
    if isinstance(case.expect, Err):
        assert result.returncode == 2 and len(lines) == 1, err
        assert lines[0].startswith("dereflect: error: ") and re.search(case.expect.match, lines[0]), err
        assert after == before and set(work.rglob("*")) == paths_before, err  # nothing written, nothing changed
        return
    expect: Ok = case.expect
    output = work / expect.output
    assert result.returncode == expect.code, err
    assert all(after.get(path) == digest for path, digest in before.items() if path != output), err
    assert set(work.rglob("*")) - paths_before <= {output, *output.parents} and output.is_file(), err
    frames, size, fps = _read_back(output)
    wanted = expect.frames if expect.frames >= 0 else _decodable(work / args[0])
    assert 0 < wanted and frames == wanted and size == expect.size and fps == pytest.approx(FPS), err
    assert f"{frames} frame(s) at {size[0]}x{size[1]}" in lines[0] and "12 fps" in lines[0], err
    assert err.count("audio is not copied") == 1 and lines[-1].startswith("note: audio is not copied"), err
    for text in expect.says:
        assert text in err, err
