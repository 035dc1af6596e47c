"""Video through the threaded pipeline: frame count, order, size and rate kept; failures passed through.

Each generated frame carries its index as 8 black/white stripes, readable after lossy MJPG.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time

import cv2
import dereflect.cli
import numpy as np
import pytest
from conftest import Terminal, sigint_as_in_a_terminal
from dereflect.errors import InputError
from dereflect.temporal import VideoSession
from dereflect.video import has_gstreamer, parse_source, process_video, sequence_gap

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
    users = tmp_path / ".out.partial.avi"  # what an earlier version wrote under: a name a user's file may have
    users.write_bytes(b"mine")
    summary = process_video(source, tmp_path / "out.avi", Darken(), queue_size=2, progress=False)
    frames, fps = _read_video(tmp_path / "out.avi")
    assert summary.frames == 40 and summary.failed == 0 and summary.expected_frames == 40
    assert [_index(f) for f in frames] == list(range(40))
    assert frames[0].shape == (H, W, 3) and fps == pytest.approx(FPS)
    assert summary.fps > 0
    assert users.read_bytes() == b"mine" and list(tmp_path.glob(".*partial*")) == [users]


def test_the_progress_bar_is_drawn_on_a_terminal_only(tmp_path, monkeypatch):
    source = _write_video(tmp_path / "in.avi", 6)
    log = io.StringIO()  # what a log file would hold: no redraws
    monkeypatch.setattr(sys, "stderr", log)
    process_video(source, tmp_path / "log.avi", Darken())
    assert log.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    process_video(source, tmp_path / "tty.avi", Darken())
    assert "6/6" in terminal.getvalue() and "frame" in terminal.getvalue()


@pytest.mark.parametrize("extension", [".avi", ".mp4"])
def test_frames_the_writer_lost_are_an_error_and_an_earlier_output_is_kept(tmp_path, monkeypatch, extension):
    """OpenCV's writer reports no failed write (a full disk): the file is read back before it is kept."""
    import dereflect.video as video

    source = _write_video(tmp_path / "in.avi", 8)
    out = tmp_path / f"out{extension}"
    out.write_bytes(b"an earlier output")

    def lose_frames(sink, image):  # what a full disk does: the frames never reach the file
        sink.written += 1

    monkeypatch.setattr(video._Sink, "write", lose_frames)
    with pytest.raises(InputError, match=r"8 frame\(s\) were written but the file (holds 0 of them|cannot be read "
                                         r"back) \(is the disk full\?\); nothing kept; the earlier .* is untouched"):
        process_video(source, out, Darken(), overwrite=True, progress=False)
    assert out.read_bytes() == b"an earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.avi", out.name]  # no partial file left


class _SignalledAtOnce:
    """StopSignals as when SIGTERM came before the first frame was written."""

    received = "SIGTERM"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_a_signal_before_the_first_frame_leaves_no_file_and_exits_with_its_status(tmp_path, monkeypatch, capsys):
    import dereflect.video as video
    from onnx_fixtures import make_crrn_export

    monkeypatch.setattr(video, "StopSignals", _SignalledAtOnce)
    source = _write_video(tmp_path / "in.avi", 4)

    class Slow(Darken):  # the signal comes while the first frame is still in the model
        def remove(self, frame, colour_order="RGB"):
            time.sleep(0.5)
            return super().remove(frame, colour_order)

    summary = process_video(source, tmp_path / "out.avi", Slow(), progress=False)
    assert summary.frames == 0 and summary.stopped_by == "SIGTERM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.avi"]
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_video",))
    model = make_crrn_export(tmp_path / "model")
    remove = VideoSession.remove
    monkeypatch.setattr(VideoSession, "remove",
                        lambda self, frame, colour_order="BGR": (time.sleep(0.5), remove(self, frame, colour_order))[1])
    # 143 as for a signal after the first frame (it was 2: "nothing written", a usage error)
    assert dereflect.cli.main(["video", str(source), "-o", str(tmp_path / "out.avi"), "--model", str(model)]) == 143
    assert "stopped by SIGTERM before any frame was written; no file" in capsys.readouterr().err
    assert not (tmp_path / "out.avi").exists()


def test_quiet_prints_problems_only(tmp_path, monkeypatch, capsys):
    from onnx_fixtures import make_crrn_export

    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_video",))
    model = make_crrn_export(tmp_path / "model")
    source = _write_video(tmp_path / "in.avi", 4)
    assert dereflect.cli.main(["video", str(source), "-o", str(tmp_path / "q.avi"), "--model", str(model),
                               "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert dereflect.cli.main(["video", str(source), "-o", str(tmp_path / "q.avi"), "--model", str(model),
                               "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err


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
    with pytest.raises(InputError, match="names a folder; name the output file, e.g. .*new/clean.mp4"):
        process_video(source, f"{tmp_path / 'new'}/", Darken(), progress=False)  # was "unknown extension"
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))  # a recording cut off before its index
    with pytest.raises(InputError, match="cut off before it was finished"):
        process_video(cut, tmp_path / "o.avi", Darken(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mp4", "empty.avi", "in.avi", "out.avi"]


@pytest.mark.parametrize("camera", [99, "/dev/video99"])
def test_a_missing_camera_is_one_clear_error_without_opencv_log_lines(tmp_path, capfd, camera):
    with pytest.raises(InputError, match=f"^camera {camera}: cannot open it"):
        process_video(camera, tmp_path / "cam.mp4", Darken(), camera=True, progress=False)
    assert capfd.readouterr().err == "" and list(tmp_path.iterdir()) == []


def test_a_numbered_image_sequence_reads_as_a_video_and_other_inputs_are_named(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for index in range(5):
        cv2.imwrite(str(frames / f"f_{index + 1:04d}.png"), _frame(index))
    summary = process_video(str(frames / "f_%04d.png"), tmp_path / "seq.avi", Darken(), progress=False)
    assert summary.frames == 5 and [_index(f) for f in _read_video(tmp_path / "seq.avi")[0]] == list(range(5))
    with pytest.raises(InputError, match="no numbered image g_0000.png or g_0001.png"):
        process_video(str(frames / "g_%04d.png"), tmp_path / "none.avi", Darken(), progress=False)
    with pytest.raises(InputError, match="no input given"):
        process_video("", tmp_path / "none.avi", Darken(), progress=False)
    # OpenCV ends a sequence at its first gap: the missing image is the one to name.
    pattern = str(frames / "f_%04d.png")
    assert sequence_gap(pattern, 5) == str(frames / "f_0006.png")
    (frames / "f_0003.png").unlink()
    assert sequence_gap(pattern, 2) == str(frames / "f_0003.png")
    assert sequence_gap(pattern, 1) is None  # f_0002.png is there: not a gap
    assert sequence_gap(str(tmp_path / "seq.avi"), 2) is None and sequence_gap(0, 2) is None
    with pytest.raises(InputError, match="a camera device; add --camera"):
        process_video("/dev/video7", tmp_path / "none.avi", Darken(), progress=False)


def test_video_cli_names_the_gap_that_ended_a_sequence(tmp_path, monkeypatch, capsys):
    from onnx_fixtures import make_crrn_export

    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_video",))
    for index in (1, 2, 3, 5, 6):
        cv2.imwrite(str(tmp_path / f"f_{index:04d}.png"), _frame(index))
    model = make_crrn_export(tmp_path / "model")
    code = dereflect.cli.main(["video", str(tmp_path / "f_%04d.png"), "-o", str(tmp_path / "out.avi"),
                               "--model", str(model), "--no-progress"])
    assert code == 0 and len(_read_video(tmp_path / "out.avi")[0]) == 3
    assert f"the sequence stops at {tmp_path / 'f_0004.png'}, which is missing" in capsys.readouterr().err


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
    # A finished run from a video file: the line that adds the source's audio back, cut to the video's length.
    assert "audio is not copied" in err and "6 frame(s)" in err
    assert f"-map 0:v -map '1:a?' -c copy -shortest {tmp_path / 'out_with_audio.mp4'}" in err
    # --strength 0.5 keeps half the model's change: halfway between the input and the full change.
    half = tmp_path / "half.mp4"
    assert dereflect.cli.main(["video", str(source), "-o", str(half), "--model", str(model), "--no-progress",
                               "--strength", "0.5"]) == 0
    midway = (_frame(3).mean() + frames[3].mean()) / 2
    assert _read_video(half)[0][3].mean() == pytest.approx(midway, rel=0.05)


def _frame_chunks(data: bytes):
    """(offset, size) of each Motion JPEG frame's data in an AVI written by OpenCV ('00dc' chunks)."""
    chunks, at = [], data.find(b"00dc")
    while at != -1:
        size = struct.unpack("<I", data[at + 4:at + 8])[0]
        if data[at + 8:at + 10] == b"\xff\xd8":
            chunks.append((at + 8, size))
        at = data.find(b"00dc", at + 4)
    return chunks


def _damage(path, frames):
    """Zero the JPEG data of ``frames``: the decoder fails on exactly those frames."""
    data = bytearray(path.read_bytes())
    chunks = _frame_chunks(bytes(data))
    for index in frames:
        offset, size = chunks[index]
        data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))
    return path


def test_undecodable_frames_are_stepped_over_and_their_slot_repeats_the_previous_output(tmp_path):
    source = _damage(_write_video(tmp_path / "in.avi", 11), [5])
    summary = process_video(source, tmp_path / "out.avi", Darken(), progress=False)
    frames, fps = _read_video(tmp_path / "out.avi")
    assert summary.frames == 11 and summary.skipped == [5] and summary.failed == 0
    assert [_index(f) for f in frames] == [0, 1, 2, 3, 4, 4, 6, 7, 8, 9, 10] and fps == pytest.approx(FPS)
    assert np.array_equal(frames[5], frames[4])


def test_undecodable_first_frame_takes_the_first_output_frame(tmp_path):
    source = _damage(_write_video(tmp_path / "in.avi", 8), [0, 1])
    summary = process_video(source, tmp_path / "out.avi", Darken(), progress=False)
    frames, _ = _read_video(tmp_path / "out.avi")
    assert summary.skipped == [0, 1] and [_index(f) for f in frames] == [2, 2, 2, 3, 4, 5, 6, 7]


def test_a_damaged_last_frame_reads_as_the_end(tmp_path):
    # Only a good frame after a failed read proves the frame was damaged rather than the file ended.
    source = _damage(_write_video(tmp_path / "in.avi", 8), [7])
    summary = process_video(source, tmp_path / "out.avi", Darken(), progress=False)
    assert summary.frames == 7 and summary.skipped == [] and summary.expected_frames == 8


def _write_sized(path, width, height, count=4, fourcc="MJPG", api=cv2.CAP_OPENCV_MJPEG):
    writer = cv2.VideoWriter(str(path), api, cv2.VideoWriter_fourcc(*fourcc), FPS, (width, height))
    assert writer.isOpened()
    for i in range(count):
        frame = np.full((height, width, 3), (30 + 40 * i) % 200, np.uint8)
        frame[-1, :] = 250  # the bottom row and right column are where a crop to even sizes would cut
        frame[:, -1] = 250
        writer.write(frame)
    writer.release()
    return path


def test_odd_size_is_kept_exactly_in_avi(tmp_path):
    source = _write_sized(tmp_path / "odd.avi", 641, 359)
    assert _read_video(source)[0][0].shape == (359, 641, 3)
    summary = process_video(source, tmp_path / "out.avi", Darken(), progress=False)
    frames, _ = _read_video(tmp_path / "out.avi")
    assert summary.size == summary.output_size == (641, 359) and len(frames) == 4
    assert frames[0].shape == (359, 641, 3) and frames[0][-1, 10:-10].mean() > 200
    preview = process_video(source, tmp_path / "prev.avi", Darken(), preview=True, progress=False)
    assert preview.output_size == (1282, 359) and _read_video(tmp_path / "prev.avi")[0][0].shape == (359, 1282, 3)


@pytest.mark.parametrize("extension", [".mp4", ".mkv", ".mov"])
def test_odd_size_is_refused_where_the_encoder_would_crop_it(tmp_path, extension):
    source = _write_sized(tmp_path / "odd.avi", 97, 49)
    out = tmp_path / "sub" / f"out{extension}"
    with pytest.raises(InputError, match=r"97x49.*even.*96x48.*\.avi"):
        process_video(source, out, Darken(), progress=False)
    assert not (tmp_path / "sub").exists()  # the folder made for the output is removed again


def test_zero_frames_is_an_error_and_leaves_no_file(tmp_path):
    source = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    writer.release()
    assert source.stat().st_size > 0 and cv2.VideoCapture(str(source)).isOpened()
    with pytest.raises(InputError, match="no frame could be decoded"):
        process_video(source, tmp_path / "out.mp4", Darken(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.avi"]


def test_output_checks_come_before_any_work(tmp_path):
    source = _write_video(tmp_path / "in.avi", 3)
    blocker = tmp_path / "out.mp4"
    blocker.write_bytes(b"not a folder")
    remover = Darken()
    with pytest.raises(InputError, match="is a file, not a folder"):
        process_video(source, blocker / "x.mp4", remover, progress=False)
    with pytest.raises(InputError, match="is a folder"):
        process_video(source, tmp_path, remover, progress=False)
    with pytest.raises(InputError, match="unknown video extension '.gif'"):
        process_video(source, tmp_path / "out.gif", remover, progress=False)
    with pytest.raises(InputError, match="file name is 300 bytes"):
        process_video(source, tmp_path / ("n" * 296 + ".mp4"), remover, progress=False)
    assert remover.calls == 0 and blocker.read_bytes() == b"not a folder"


def test_a_name_near_the_limit_gets_a_short_hidden_name_while_written(tmp_path):
    source = _write_video(tmp_path / "in.avi", 3)
    out = tmp_path / ("n" * 250 + ".avi")  # ".<stem>.<token>.partial.avi" would be 280 bytes
    summary = process_video(source, out, Darken(), progress=False)
    assert summary.frames == 3 and len(_read_video(out)[0]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.avi", out.name])


def _h264_encoder_available(tmp_path) -> bool:
    probe = tmp_path / "probe.mp4"
    writer = cv2.VideoWriter(str(probe), cv2.VideoWriter_fourcc(*"avc1"), FPS, (W, H))
    opened = writer.isOpened()
    writer.release()
    probe.unlink(missing_ok=True)
    return opened


def test_h264_where_the_build_has_it_else_mpeg4_and_the_summary_says_which(tmp_path):
    source = _write_video(tmp_path / "in.avi", 4)
    summary = process_video(source, tmp_path / "out.mp4", Darken(), progress=False)
    fourcc = int(cv2.VideoCapture(str(tmp_path / "out.mp4")).get(cv2.CAP_PROP_FOURCC))
    written = fourcc.to_bytes(4, "little").decode("ascii", "replace").lower()
    if _h264_encoder_available(tmp_path):
        assert summary.codec == "H.264 (avc1)" and written in ("avc1", "h264")
    else:
        # FFmpeg reads MPEG-4 Part 2 back as FMP4 whatever tag it was written with.
        assert summary.codec.startswith("MPEG-4 Part 2 (mp4v; no H.264 encoder") and written in ("mp4v", "fmp4")


def test_the_avi_size_limit_stops_the_run_and_keeps_a_playable_file(tmp_path, monkeypatch):
    import dereflect.video

    monkeypatch.setattr(dereflect.video, "OWN_AVI_LIMIT", 40_000)
    source = _write_sized(tmp_path / "odd.avi", 161, 121, count=40)
    summary = process_video(source, tmp_path / "out.avi", Darken(), progress=False)
    frames, _ = _read_video(tmp_path / "out.avi")
    assert "limit" in summary.stopped_by and 0 < summary.frames < 40 and len(frames) == summary.frames


def test_show_refuses_without_a_display(tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    source = _write_video(tmp_path / "in.avi", 3)
    remover = Darken()
    with pytest.raises(InputError, match="--show needs a display"):
        process_video(source, tmp_path / "out.avi", remover, show=True, progress=False)
    assert remover.calls == 0 and not (tmp_path / "out.avi").exists()


def test_show_displays_each_output_frame_and_q_stops(tmp_path, monkeypatch):
    # cv2's window calls replaced: this checks what the loop shows and that q ends the run cleanly.
    import dereflect.video

    shown = []
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(dereflect.video, "_build_setting", lambda name: "QT5" if name == "GUI" else "NO")
    monkeypatch.setattr(cv2, "imshow", lambda name, image: shown.append(image.copy()))
    monkeypatch.setattr(cv2, "waitKey", lambda delay: ord("q") if len(shown) == 3 else -1)
    monkeypatch.setattr(cv2, "getWindowProperty", lambda name, prop: 1.0)
    monkeypatch.setattr(cv2, "destroyWindow", lambda name: None)
    monkeypatch.setattr(cv2, "namedWindow", lambda name: None)
    monkeypatch.setattr(cv2, "createTrackbar", lambda *args: pytest.fail("a slider for a remover without strength"))
    source = _write_video(tmp_path / "in.avi", 20)
    summary = process_video(source, tmp_path / "out.avi", Darken(), show=True, queue_size=1, progress=False)
    frames, _ = _read_video(tmp_path / "out.avi")
    # Frames the remover had finished when q was pressed are still written (and shown).
    assert summary.stopped_by == "the window" and 3 <= summary.frames == len(frames) < 20
    assert [_index(f) for f in shown] == [_index(f) for f in frames] == list(range(len(frames)))


class Scaled(Darken):
    """A stand-in remover with a strength: (1 - 0.5 strength) x the frame."""

    def __init__(self):
        super().__init__()
        self.strength = 1.0
        self.used = []

    def remove(self, frame, colour_order="RGB"):
        self.used.append(self.strength)
        return (frame * (1 - 0.5 * self.strength)).astype(np.uint8)


def test_show_window_has_a_strength_slider_that_applies_from_the_next_frame(tmp_path, monkeypatch):
    import dereflect.video

    sliders = []
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(dereflect.video, "_build_setting", lambda name: "QT5" if name == "GUI" else "NO")
    monkeypatch.setattr(cv2, "namedWindow", lambda name: None)
    monkeypatch.setattr(cv2, "createTrackbar", lambda *args: sliders.append(args))
    remover = Scaled()
    shown = []

    def imshow(name, image):
        shown.append(image)
        if len(shown) == 2:  # the user drags the slider to 40 % after the second frame
            sliders[0][4](40)

    monkeypatch.setattr(cv2, "imshow", imshow)
    monkeypatch.setattr(cv2, "waitKey", lambda delay: -1)
    monkeypatch.setattr(cv2, "getWindowProperty", lambda name, prop: 1.0)
    monkeypatch.setattr(cv2, "destroyWindow", lambda name: None)
    source = _write_video(tmp_path / "in.avi", 12)
    summary = process_video(source, tmp_path / "out.avi", remover, show=True, queue_size=1, progress=False)
    assert summary.frames == 12 and len(sliders) == 1
    label, window, start, top, _ = sliders[0]
    assert (label, window, start, top) == ("strength %", dereflect.video.WINDOW_NAME, 100, 200)
    # Frames already taken by the remover keep the old strength; from then on the new one.
    switch = remover.used.index(0.4)
    assert remover.used == [1.0] * switch + [0.4] * (12 - switch) and 2 <= switch <= 5


def test_video_command_shows_the_slider_at_the_strength_asked(tmp_path, monkeypatch):
    import dereflect.video
    from onnx_fixtures import make_crrn_export

    sliders = []
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_video",))
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(dereflect.video, "_build_setting", lambda name: "QT5" if name == "GUI" else "NO")
    for name, stand_in in (("namedWindow", lambda name: None), ("imshow", lambda name, image: None),
                           ("waitKey", lambda delay: -1), ("getWindowProperty", lambda name, prop: 1.0),
                           ("destroyWindow", lambda name: None), ("createTrackbar", lambda *a: sliders.append(a))):
        monkeypatch.setattr(cv2, name, stand_in)
    model = make_crrn_export(tmp_path / "model")
    source = _write_video(tmp_path / "in.avi", 3)
    assert dereflect.cli.main(["video", str(source), "-o", str(tmp_path / "out.avi"), "--model", str(model),
                               "--show", "--strength", "1.5", "--no-progress"]) == 0
    assert [(label, start, top) for label, _, start, top, _ in sliders] == [("strength %", 150, 200)]


@pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                    reason="no display here (DISPLAY and WAYLAND_DISPLAY unset): a real --show window cannot open")
def test_show_opens_a_real_window(tmp_path):
    source = _write_video(tmp_path / "in.avi", 5)
    summary = process_video(source, tmp_path / "out.avi", Darken(), show=True, progress=False)
    assert summary.frames == 5


def test_pipelines_need_opencv_with_gstreamer(tmp_path):
    if has_gstreamer():
        pytest.skip("this OpenCV has GStreamer: test_gstreamer_pipelines_end_to_end covers pipelines")
    source = _write_video(tmp_path / "in.avi", 3)
    with pytest.raises(InputError, match="the input looks like a GStreamer pipeline.*no GStreamer"):
        process_video("videotestsrc num-buffers=3 ! appsink", tmp_path / "out.avi", Darken(), progress=False)
    with pytest.raises(InputError, match="the output looks like a GStreamer pipeline.*no GStreamer"):
        process_video(source, "appsrc ! videoconvert ! fakesink", Darken(), progress=False)


def test_pipelines_must_end_in_appsink_and_start_with_appsrc(tmp_path, monkeypatch):
    import dereflect.video

    monkeypatch.setattr(dereflect.video, "has_gstreamer", lambda: True)
    source = _write_video(tmp_path / "in.avi", 3)
    with pytest.raises(InputError, match="must end in appsink"):
        process_video("videotestsrc ! fakesink", tmp_path / "out.avi", Darken(), progress=False)
    with pytest.raises(InputError, match="must start with appsrc"):
        process_video(source, "videotestsrc ! autovideosink", Darken(), progress=False)


def test_pipelines_open_with_the_gstreamer_backend(tmp_path, monkeypatch):
    # Without GStreamer here, OpenCV's classes are replaced by recorders: this checks what
    # process_video asks of OpenCV for a pipeline (backend, string, size) and that nothing is renamed.
    import dereflect.video

    opened = {}

    class Capture:
        def __init__(self, source, api=cv2.CAP_ANY):
            opened["capture"] = (source, api)
            self.left = 6

        def isOpened(self):  # noqa: N802 - OpenCV's name
            return True

        def get(self, prop):
            return {cv2.CAP_PROP_FPS: 25.0}.get(prop, 0.0)

        def read(self):
            self.left -= 1
            return (True, _frame(5 - self.left)) if self.left >= 0 else (False, None)

        def release(self):
            pass

    class Writer:
        def __init__(self, target, api, fourcc, fps, size, colour):
            opened["writer"] = (target, api, fourcc, fps, size)
            opened["frames"] = []

        def isOpened(self):  # noqa: N802 - OpenCV's name
            return True

        def write(self, image):
            opened["frames"].append(_index(image))

        def release(self):
            pass

    monkeypatch.setattr(dereflect.video, "has_gstreamer", lambda: True)
    monkeypatch.setattr(cv2, "VideoCapture", Capture)
    monkeypatch.setattr(cv2, "VideoWriter", Writer)
    src = "v4l2src ! videoconvert ! video/x-raw,format=BGR ! appsink"
    sink = "appsrc ! videoconvert ! x264enc ! mp4mux ! filesink location=x.mp4"
    summary = process_video(src, sink, Darken(), progress=False)
    assert opened["capture"] == (src, cv2.CAP_GSTREAMER)
    assert opened["writer"] == (sink, cv2.CAP_GSTREAMER, 0, 25.0, (W, H))
    assert opened["frames"] == list(range(6)) and summary.frames == 6 and summary.codec == "GStreamer pipeline"
    assert summary.expected_frames is None and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not has_gstreamer(), reason="this OpenCV build has no GStreamer (the PyPI wheel has none)")
def test_gstreamer_pipelines_end_to_end(tmp_path):
    out = tmp_path / "out.avi"
    summary = process_video(f"videotestsrc num-buffers=10 ! video/x-raw,width={W},height={H} ! videoconvert ! "
                            "video/x-raw,format=BGR ! appsink",
                            f"appsrc ! videoconvert ! jpegenc ! avimux ! filesink location={out}",
                            Darken(), progress=False)
    frames, _ = _read_video(out)
    assert summary.frames == 10 and len(frames) == 10 and frames[0].shape == (H, W, 3)


def _slow_cli(tmp_path, frames):
    """A `dereflect video` subprocess on a long clip, and the path of its output."""
    from onnx_fixtures import make_crrn_export

    model = make_crrn_export(tmp_path / "model")
    source = _write_video(tmp_path / "in.avi", frames)
    out = tmp_path / "out.avi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dereflect.cli", "video", str(source), "-o", str(out),
                                "--model", str(model), "--threads", "1", "--no-progress"],
                               stderr=subprocess.PIPE, text=True, env=env, preexec_fn=sigint_as_in_a_terminal)
    return process, out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_sigterm_and_sigint_finish_the_file_with_every_frame_so_far(tmp_path, signum):
    process, out = _slow_cli(tmp_path, 6000)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.*.partial.avi")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    frames, _ = _read_video(out)
    assert process.returncode == 128 + signum, err  # 130 for Ctrl+C, 143 for SIGTERM, 129 for SIGHUP
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert 0 < len(frames) < 6000 and f"{len(frames)} frame(s) at {W}x{H}" in err
    assert [_index(f) for f in frames] == [i % 256 for i in range(len(frames))]
    # A stopped run's file is partial: no hint to add the audio to it.
    assert not list(tmp_path.glob(".*partial*")) and "audio is not copied" not in err


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        dereflect.cli.main(argv)
    return " ".join(capsys.readouterr().out.split())


def test_video_help_gives_the_exit_status_of_each_way_of_stopping(monkeypatch, capsys):
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_video",))
    text = _help(["video", "--help"], capsys)
    status = text[text.index("exit status:"):text.index("output codec:")]
    zero = status[:status.index("; 1 ")]
    # Measured by test_sigterm_and_sigint_finish_the_file_with_every_frame_so_far: 130 and 143, not 0.
    assert "Ctrl+C" not in zero and "SIGTERM" not in zero and "q in the --show window" in zero
    assert "130 stopped by Ctrl+C, 143 by SIGTERM" in status
    assert "(exit status 130, 143, 129 and 0)" in text  # the description above says the same


@pytest.mark.parametrize("count", ["0", "-3"])
def test_max_frames_must_be_positive_before_anything_is_opened(tmp_path, monkeypatch, capsys, count):
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_video",))
    source = _write_video(tmp_path / "clip.avi", 3)
    # A model that does not exist: had the model been opened first, the error would be about it.
    code = dereflect.cli.main(["video", str(source), "-o", str(tmp_path / "y.mp4"), "--max-frames", count,
                               "--model", str(tmp_path / "no-model"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"dereflect: error: --max-frames must be a positive integer, not {count}\n"
    remover = Darken()
    with pytest.raises(InputError, match="--max-frames must be a positive integer"):
        process_video(source, tmp_path / "y.mp4", remover, max_frames=int(count), progress=False)
    assert remover.calls == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["clip.avi"]


def test_no_audio_hint_for_a_still_image_or_a_stopped_run(tmp_path, monkeypatch, capsys):
    import dereflect.video
    from onnx_fixtures import make_crrn_export

    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_video",))
    model = make_crrn_export(tmp_path / "model")
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), _frame(5))
    assert dereflect.cli.main(["video", str(still), "-o", str(tmp_path / "still.avi"), "--model", str(model),
                               "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 frame(s)" in err and "audio is not copied" not in err

    # q in the --show window after the second frame (cv2's window calls replaced)
    shown = []
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(dereflect.video, "_build_setting", lambda name: "QT5" if name == "GUI" else "NO")
    for name, stand_in in (("namedWindow", lambda name: None), ("imshow", lambda name, image: shown.append(1)),
                           ("waitKey", lambda delay: ord("q") if len(shown) == 2 else -1),
                           ("getWindowProperty", lambda name, prop: 1.0), ("destroyWindow", lambda name: None),
                           ("createTrackbar", lambda *a: None)):
        monkeypatch.setattr(cv2, name, stand_in)
    source = _write_video(tmp_path / "in.avi", 40)
    assert dereflect.cli.main(["video", str(source), "-o", str(tmp_path / "out.avi"), "--model", str(model),
                               "--show", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "stopped by the window" in err and "audio is not copied" not in err
