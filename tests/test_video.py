"""Video through the threaded pipeline: frame count, order, size and rate kept; failures passed through.

Each generated frame carries its index as 8 black/white stripes, readable after lossy MJPG.
"""

from __future__ import annotations

import cv2
import dereflect.cli
import numpy as np
import pytest
from dereflect.errors import InputError
from dereflect.video import parse_source, process_video

W, H, FPS, STRIPE = 96, 48, 12.0, 12


def _frame(index: int) -> np.ndarray:
    frame = np.full((H, W, 3), 40, np.uint8)
    for bit in range(8):
        if index >> bit & 1:
            frame[:, bit * STRIPE:(bit + 1) * STRIPE] = 220
    return frame


def _index(frame: np.ndarray) -> int:
    grey = frame.mean(axis=2)
    stripes = [grey[4:-4, bit * STRIPE + 3:(bit + 1) * STRIPE - 3].mean() for bit in range(8)]
    return sum(1 << bit for bit, level in enumerate(stripes) if level > 110)


def _write_video(path, count):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert writer.isOpened()
    for i in range(count):
        writer.write(_frame(i))
    writer.release()
    return path


def _read_video(path):
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames, fps


class Darken:
    """A stand-in remover: 0.9 x the frame; raises on the frames listed in ``fail_on``."""

    def __init__(self, fail_on=()):
        self.fail_on = set(fail_on)
        self.calls = 0

    def remove(self, frame, colour_order="RGB"):
        assert colour_order == "BGR" and frame.dtype == np.uint8
        index = _index(frame)
        self.calls += 1
        if index in self.fail_on:
            raise RuntimeError(f"boom at {index}")
        return (frame * 0.9).astype(np.uint8)


def test_indices_survive_the_codec(tmp_path):
    frames, fps = _read_video(_write_video(tmp_path / "in.avi", 20))
    assert [_index(f) for f in frames] == list(range(20)) and fps == pytest.approx(FPS)


def test_round_trip_keeps_count_order_size_and_rate(tmp_path):
    source = _write_video(tmp_path / "in.avi", 40)
    summary = process_video(source, tmp_path / "out.avi", Darken(), queue_size=2, progress=False)
    frames, fps = _read_video(tmp_path / "out.avi")
    assert summary.frames == 40 and summary.failed == 0 and summary.expected_frames == 40
    assert [_index(f) for f in frames] == list(range(40))
    assert frames[0].shape == (H, W, 3) and fps == pytest.approx(FPS)
    assert summary.fps > 0
    assert not list(tmp_path.glob(".*partial*"))


def test_failing_frame_is_passed_through_and_counted(tmp_path):
    source = _write_video(tmp_path / "in.avi", 12)
    summary = process_video(source, tmp_path / "out.avi", Darken(fail_on={5}), progress=False)
    frames, _ = _read_video(tmp_path / "out.avi")
    assert summary.frames == 12 and summary.failed == 1 and summary.failures[0][0] == 5
    assert "boom at 5" in summary.failures[0][1]
    assert [_index(f) for f in frames] == list(range(12))
    # The failed frame is the unchanged input, the others were darkened.
    for i in (4, 5):
        unchanged = abs(frames[i].mean() - _frame(i).mean())
        darkened = abs(frames[i].mean() - 0.9 * _frame(i).mean())
        assert (unchanged < darkened) == (i == 5)


def test_preview_is_side_by_side(tmp_path):
    source = _write_video(tmp_path / "in.avi", 5)
    process_video(source, tmp_path / "prev.avi", Darken(), preview=True, max_frames=3, progress=False)
    frames, _ = _read_video(tmp_path / "prev.avi")
    assert len(frames) == 3 and frames[0].shape == (H, 2 * W, 3)
    assert _index(frames[2][:, :W]) == 2


def test_refuses_input_existing_and_bad_outputs(tmp_path):
    source = _write_video(tmp_path / "in.avi", 3)
    with pytest.raises(InputError, match="input video"):
        process_video(source, source, Darken(), overwrite=True, progress=False)
    existing = tmp_path / "out.avi"
    existing.write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists"):
        process_video(source, existing, Darken(), progress=False)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(InputError, match="extension"):
        process_video(source, tmp_path / "out.xyz", Darken(), progress=False)
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        process_video(empty, tmp_path / "o.avi", Darken(), progress=False)
    with pytest.raises(InputError, match="not found"):
        process_video(tmp_path / "nope.avi", tmp_path / "o.avi", Darken(), progress=False)


def test_camera_sources_parse():
    assert parse_source("0") == 0 and parse_source(2) == 2
    assert parse_source("clip.mp4") == "clip.mp4"


def test_video_cli_with_an_export(tmp_path, monkeypatch, capsys):
    from onnx_fixtures import make_crrn_export

    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_video",))
    model = make_crrn_export(tmp_path / "model")
    source = _write_video(tmp_path / "in.avi", 6)
    out = tmp_path / "out.mp4"
    code = dereflect.cli.main(["video", str(source), "-o", str(out), "--model", str(model), "--no-progress"])
    assert code == 0
    frames, _ = _read_video(out)
    assert len(frames) == 6 and frames[0].shape == (H, W, 3)
    # The toy CRRN keeps 0.7 of the input.
    assert frames[3].mean() == pytest.approx(0.7 * _frame(3).mean(), rel=0.1)
    err = capsys.readouterr().err
    assert "audio is not copied" in err and "6 frame(s)" in err
