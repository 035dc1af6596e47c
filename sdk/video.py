"""Video, camera and GStreamer streams through a Remover, with decode, inference and encode overlapped.

Three stages run concurrently, joined by bounded queues (so memory stays flat and a slow
stage throttles the others): a reader thread decodes frames, an inference thread runs the
remover, and the calling thread encodes and drives the progress bar (its rate is the
pipeline's frames per second). One inference thread keeps the frame order by construction.

What is kept: every frame slot, in order, at the source's exact size and nominal frame rate.
A frame that cannot be decoded (a damaged packet in the middle of a file) is stepped over and
its slot filled with the previous output frame, so the output keeps the source's length and
timing (audio muxed back later stays in sync); a frame the remover fails on is written
unchanged. Both are counted in the summary; no frame slot is dropped.

What is not kept: **audio** (OpenCV reads and writes video frames only; mux it back with
:func:`audio_note`'s ffmpeg line), per-frame timestamps of variable-frame-rate sources (the
output is constant-rate), and the source codec. The output codec follows the output file's
extension: H.264 where this OpenCV build has an encoder for it (the PyPI wheel has none), else
MPEG-4 Part 2 (.mp4, .m4v, .mov), Xvid (.mkv) or Motion JPEG (.avi); the summary says which.

Frame size: OpenCV's FFmpeg writer silently crops an odd width or height to the even size
below (FFmpeg's scaler needs even sizes). An odd-sized video is therefore written to .avi by
OpenCV's own Motion JPEG writer, which keeps any size (its files stop at 4 GB, see
:data:`OWN_AVI_LIMIT`), and refused before anything is written for the other extensions.

Sources and sinks: a file, URL, camera index, or a GStreamer pipeline (a text with ``!``: the
source ending in ``appsink``, the output starting with ``appsrc``) where OpenCV was built with
GStreamer (JetPack's OpenCV is; the PyPI wheel is not). A camera delivers frames at its own
pace: if inference is slower, the driver drops frames before they are read, and the output
(written at the camera's nominal rate) plays faster than real time.

Stopping: Ctrl+C (SIGINT), SIGTERM (what ``timeout``, systemd and container runtimes send) and
q / Esc in the ``show`` window all end the run the same way: the frames processed so far are
written and the file is finished. The ``show`` window has a strength slider (0-200 %) where the
remover takes a strength (:attr:`dereflect.remover.Remover.strength`): moved, it applies from
the next frame the remover starts.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np

from .errors import InputError
from .imageio import check_output_location, is_image_file, name_max, nearest_existing, opencv_log_level, staging_name
from .stop_signals import SIGNAL_NAMES, StopSignals

#: The codecs tried for each output extension, best first (H.264 where the OpenCV build can encode it).
CODECS_BY_EXTENSION: Dict[str, Tuple[str, ...]] = {
    ".mp4": ("avc1", "mp4v"),
    ".m4v": ("avc1", "mp4v"),
    ".mov": ("avc1", "mp4v"),
    ".mkv": ("avc1", "XVID"),
    ".avi": ("MJPG",),
}
CODEC_NAMES = {"avc1": "H.264", "mp4v": "MPEG-4 Part 2", "XVID": "Xvid (MPEG-4 Part 2)", "MJPG": "Motion JPEG"}
#: OpenCV's own AVI writer (odd frame sizes) keeps 32-bit chunk sizes and fails at 4 GiB, losing
#: the whole file when it is closed: the run stops, keeping what was written, with this margin.
OWN_AVI_LIMIT = 4 * 1024 ** 3 - 256 * 1024 ** 2
#: Failed reads in a row after which a file is taken to have ended (a failed read is also how
#: the end looks; only a good frame after it proves it was a damaged one).
MAX_BAD_READS = 16
DEFAULT_CAMERA_FPS = 30.0
MAX_REPORTED_FAILURES = 10
WINDOW_NAME = "dereflect"
#: The ``show`` window's slider: the remover's strength in percent, 0 to this.
STRENGTH_SLIDER = ("strength %", 200)
_END = object()

Source = Union[str, int]
Output = Union[str, os.PathLike]


@dataclass
class VideoSummary:
    """What :func:`process_video` did."""

    output: Union[Path, str]
    #: Frames written: cleaned, failed (written unchanged) and undecodable (previous output frame repeated).
    frames: int = 0
    failed: int = 0
    failures: List[Tuple[int, str]] = field(default_factory=list)
    #: Indices of the frames that could not be decoded; each slot holds the previous output frame.
    skipped: List[int] = field(default_factory=list)
    seconds: float = 0.0
    source_fps: float = 0.0
    #: The source frame size (width, height), kept exactly in the output.
    size: Tuple[int, int] = (0, 0)
    #: The written frame size: twice as wide as ``size`` with ``preview`` (input | output).
    output_size: Tuple[int, int] = (0, 0)
    codec: str = ""
    expected_frames: Optional[int] = None
    #: What ended the run early (a signal's name, "the window", a size limit); None when the source ended.
    stopped_by: Optional[str] = None

    @property
    def fps(self) -> float:
        """Frames per second through the whole pipeline (decode, inference, encode)."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def interrupted(self) -> bool:
        """Whether the run was stopped before the source ended."""
        return self.stopped_by is not None


def _build_setting(name: str) -> Optional[str]:
    """The first word after ``name:`` in OpenCV's build information (e.g. GStreamer: YES, GUI: QT5)."""
    match = re.search(rf"^\s*{re.escape(name)}:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    return match.group(1) if match else None


def has_gstreamer() -> bool:
    """Whether this OpenCV build can open GStreamer pipelines."""
    return (_build_setting("GStreamer") or "").upper() == "YES"


def is_pipeline(text: Union[str, os.PathLike, int]) -> bool:
    """A GStreamer pipeline: a text with ``!`` links that is not an existing file."""
    return isinstance(text, str) and "!" in text and not os.path.exists(text)


def parse_source(source: Union[str, int, os.PathLike], camera: bool = False) -> Source:
    """A camera index for an integer (or ``camera=True`` with an integer string), else a path, URL or pipeline."""
    if isinstance(source, int):
        return source
    text = str(source)
    if text.isdigit() and (camera or not Path(text).exists()):
        return int(text)
    return text


def describe_source(source: Source) -> str:
    """How messages name a source: "camera N", "input pipeline" or the path / URL."""
    if isinstance(source, int):
        return f"camera {source}"
    return "input pipeline" if is_pipeline(source) else source


_STDERR_LOCK = threading.Lock()


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Silence OpenCV while it opens a source or a writer: we raise one clear error instead.

    A missing camera prints several log lines (one per backend tried), and some backends (FFmpeg,
    OpenCV's own AVI reader) print straight to the stderr file descriptor, past any log level:
    so for these few milliseconds the log level is silent and descriptor 2 goes to the null device.
    """
    with _STDERR_LOCK, opencv_log_level("LOG_LEVEL_SILENT"):
        sys.stderr.flush()
        try:
            saved: Optional[int] = os.dup(2)
        except OSError:  # no descriptor 2 (a daemon): nothing to silence
            saved = None
        null = os.open(os.devnull, os.O_WRONLY)
        if saved is not None:
            os.dup2(null, 2)
        try:
            yield
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            os.close(null)


def _require_gstreamer(what: str, instead: str) -> None:
    if not has_gstreamer():
        raise InputError(
            f"{what} looks like a GStreamer pipeline (it has '!'), but this OpenCV build has no GStreamer "
            f"(the PyPI opencv-python wheel has none; JetPack's OpenCV has it); use {instead}, or an OpenCV "
            "built with GStreamer"
        )


def _check_display() -> None:
    """``show`` needs a window: refuse before any work rather than let the GUI toolkit abort the process."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise InputError("--show needs a display and there is none (DISPLAY and WAYLAND_DISPLAY are unset, "
                         "e.g. over SSH without -X); run without --show")
    if (_build_setting("GUI") or "NONE").upper() == "NONE":
        raise InputError("--show: this OpenCV build has no GUI (opencv-python-headless); run without --show "
                         "or install an OpenCV with a GUI")


def _check_output_path(output: Path, source: Source, overwrite: bool) -> None:
    check_output_location(output, example="clean.mp4")
    ext = output.suffix.lower()
    if ext not in CODECS_BY_EXTENSION:
        raise InputError(f"{output}: unknown video extension '{ext or '(none)'}'; use one of "
                         f"{', '.join(CODECS_BY_EXTENSION)}")
    if os.path.exists(output):
        if isinstance(source, str) and os.path.exists(source) and os.path.samefile(source, output):
            raise InputError(f"{output}: refusing to overwrite the input video; choose another output path")
        if not overwrite:
            raise InputError(f"{output}: file exists; pass --overwrite to replace it")


def _check_input(src: Source, camera: bool) -> None:
    if is_pipeline(src):
        _require_gstreamer("the input", "a file or camera index")
        if "appsink" not in str(src):
            raise InputError("input pipeline: it must end in appsink, where OpenCV takes the frames")
    elif isinstance(src, str) and not camera and "://" not in src:
        if not src.strip():
            raise InputError("no input given: name a video file, a camera index or a pipeline")
        path = Path(src)
        if path.is_dir():
            raise InputError(f"{src}: is a folder, not a video file")
        first_images = _sequence_first_images(src)
        if first_images is not None:
            if any(os.path.isfile(image) for image in first_images):
                return  # OpenCV reads the sequence as a video
            names = " or ".join(os.path.basename(image) for image in first_images) or "its first image"
            raise InputError(f"{src}: no numbered image {names} (a sequence starts at 0 or 1; check the folder "
                             "and the pattern's zero padding)")
        if src.startswith("/dev/video"):
            raise InputError(f"{src}: a camera device; add --camera to read it as one")
        if not path.is_file():
            raise InputError(f"{src}: video file not found")
        if path.stat().st_size == 0:
            raise InputError(f"{src}: file is empty (0 bytes)")


def _sequence_first_images(src: str) -> Optional[List[str]]:
    """For a printf pattern of numbered images (``frames/f_%04d.png``), the paths its first image may
    have (OpenCV starts a sequence at 0 or 1; none where the pattern cannot be filled in); None for
    anything else."""
    if not re.search(r"%0?\d*d", src) or not is_image_file(src):
        return None
    try:
        return [src % first for first in (0, 1)]
    except (TypeError, ValueError):
        return []


def sequence_gap(source: Source, frames_read: int) -> Optional[str]:
    """For numbered images read as a video, the image whose absence ended it after ``frames_read`` frames
    (OpenCV stops a sequence at its first gap); None for any other source or where that image exists."""
    first_images = _sequence_first_images(source) if isinstance(source, str) else None
    start = next((i for i, image in enumerate(first_images or []) if os.path.isfile(image)), None)
    if start is None:
        return None
    missing = source % (start + frames_read)
    return None if os.path.isfile(missing) else missing


def check_job(source: Union[str, int, os.PathLike], output: Output, overwrite: bool = False,
              camera: bool = False, show: bool = False, max_frames: Optional[int] = None) -> None:
    """Every check that needs no decoding, so that a command refuses before it loads a model.

    ``max_frames`` (None or a positive integer), the output path (a folder, writable, a name
    that fits, a known extension, not the input, not an existing file without ``overwrite``),
    the input file, GStreamer support for pipelines and a display for ``show``.
    :func:`process_video` runs it too. Raises InputError.
    """
    if max_frames is not None and max_frames < 1:
        raise InputError(f"--max-frames must be a positive integer, not {max_frames}")
    src = parse_source(source, camera)
    _check_input(src, camera)
    if is_pipeline(output):
        _require_gstreamer("the output", "a video file")
        if not str(output).lstrip().startswith("appsrc"):
            raise InputError("output pipeline: it must start with appsrc, where OpenCV hands in the frames")
    else:
        if str(output).endswith(("/", os.sep)):  # Path() drops the slash that says a folder is meant
            raise InputError(f"{output}: names a folder; name the output file, e.g. {Path(output) / 'clean.mp4'}")
        _check_output_path(Path(output), src, overwrite)
    if show:
        _check_display()


def open_source(source: Union[str, int, os.PathLike], camera: bool = False) -> cv2.VideoCapture:
    """Open a video file, URL, camera index or GStreamer pipeline; InputError when OpenCV cannot read it."""
    src = parse_source(source, camera)
    _check_input(src, camera)
    with _quiet_opencv():
        capture = cv2.VideoCapture(src, cv2.CAP_GSTREAMER) if is_pipeline(src) else cv2.VideoCapture(src)
    if not capture.isOpened():
        if camera or isinstance(src, int):
            raise InputError(f"camera {src}: cannot open it (no such camera, or another program is using it)")
        if is_pipeline(src):
            raise InputError("input pipeline: GStreamer could not start it (test it with gst-launch-1.0, "
                             "with fakesink in place of appsink)")
        raise InputError(f"{src}: OpenCV cannot open it (not a video, an unsupported codec, or a damaged file "
                         "such as an MP4 recording cut off before it was finished)")
    return capture


class _Frames:
    """Decoded frames of a capture, stepping over frames that fail to decode in the middle of a file."""

    def __init__(self, capture: cv2.VideoCapture, step_over: bool, total: Optional[int]) -> None:
        self.capture = capture
        self.step_over = step_over
        self.total = total
        self.reads = 0

    def next(self) -> Optional[Tuple[np.ndarray, int]]:
        """The next good frame and how many undecodable frames came before it; None at the end."""
        bad = 0
        while True:
            ok, frame = self.capture.read()
            self.reads += 1
            if ok and frame is not None:
                return frame, bad
            bad += 1
            # The end of a file reads exactly like a damaged frame: stop after the frame count the
            # container reported, or after too many failures in a row (count unknown or wrong).
            # Failures not followed by a good frame are never counted as skipped.
            if not self.step_over or bad >= MAX_BAD_READS or (self.total and self.reads >= self.total):
                return None


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; False when it was not put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _reader(frames: _Frames, first: Tuple[np.ndarray, int], out_q: queue.Queue, stop: threading.Event,
            max_frames: Optional[int], errors: List[BaseException]) -> None:
    """Queue ``(index, frame)``; ``frame`` is None for a slot whose frame could not be decoded."""
    index = 0
    got: Optional[Tuple[np.ndarray, int]] = first
    try:
        while got is not None and not stop.is_set():
            frame, skipped = got
            for item in [None] * skipped + [frame]:
                if max_frames is not None and index >= max_frames:
                    return
                if not _put(out_q, (index, item), stop):
                    return
                index += 1
            got = frames.next()
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
        errors.append(exc)
    finally:
        _put(out_q, _END, stop)


def _worker(remover: Any, in_q: queue.Queue, out_q: queue.Queue, stop: threading.Event,
            errors: List[BaseException]) -> None:
    """Queue ``(index, frame, result, error)``: the one place where the remover sees a frame."""
    try:
        while not stop.is_set():
            try:
                item = in_q.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                break
            index, frame = item
            result, error = None, None
            if frame is not None:
                try:
                    result = remover.remove(frame, colour_order="BGR")
                except Exception as exc:  # noqa: BLE001 - one bad frame must not end a long video
                    result, error = frame, f"{type(exc).__name__}: {exc}"
            if not _put(out_q, (index, frame, result, error), stop):
                break
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
        errors.append(exc)
    finally:
        _put(out_q, _END, stop)


class _Sink:
    """Where frames go: a file written under a hidden name and renamed when finished, or a GStreamer pipeline."""

    def __init__(self, output: Union[Path, str], size: Tuple[int, int], fps: float) -> None:
        self.output = output
        self.partial: Optional[Path] = None
        self.limit: Optional[int] = None
        self.written = 0
        self.created: List[Path] = []
        if isinstance(output, str):
            with _quiet_opencv():
                self.writer = cv2.VideoWriter(output, cv2.CAP_GSTREAMER, 0, fps, size, True)
            if not self.writer.isOpened():
                raise InputError("output pipeline: GStreamer could not start it (test it with gst-launch-1.0, "
                                 "with videotestsrc in place of appsrc)")
            self.codec = "GStreamer pipeline"
            return
        width, height = size
        ext = output.suffix.lower()
        if (width % 2 or height % 2) and ext != ".avi":
            raise InputError(
                f"{output}: frames are {width}x{height}; the {ext} encoders need an even width and height "
                f"(OpenCV would silently crop to {width & ~1}x{height & ~1}); write an .avi instead "
                "(Motion JPEG keeps any size)"
            )
        # A unique hidden name (a fixed one could be the user's file), ending in the container's suffix,
        # by which OpenCV chooses the muxer.
        self.partial = staging_name(output, name_max(nearest_existing(output.parent)), f".partial{output.suffix}")
        for folder in reversed(output.parents):
            if not folder.exists():
                folder.mkdir()
                self.created.append(folder)
        if width % 2 or height % 2:
            # OpenCV's own Motion JPEG writer: the only one that keeps an odd size exactly.
            candidates = [("MJPG", cv2.CAP_OPENCV_MJPEG)]
            self.limit = OWN_AVI_LIMIT
        else:
            candidates = [(code, cv2.CAP_ANY) for code in CODECS_BY_EXTENSION[ext]]
        for code, api in candidates:
            with _quiet_opencv():
                self.writer = cv2.VideoWriter(str(self.partial), api, cv2.VideoWriter_fourcc(*code), fps, size)
            if self.writer.isOpened():
                self.codec = f"{CODEC_NAMES[code]} ({code})"
                if code != candidates[0][0]:
                    self.codec = (f"{CODEC_NAMES[code]} ({code}; no {CODEC_NAMES[candidates[0][0]]} encoder in "
                                  "this OpenCV build)")
                return
            self.writer.release()
            self.partial.unlink(missing_ok=True)
        self._remove_created()
        raise InputError(f"{output}: OpenCV cannot write {ext} video here (tried "
                         f"{', '.join(code for code, _ in candidates)}); try an .avi output")

    def write(self, image: np.ndarray) -> None:
        # A failed write (a full disk) logs a warning per frame; finish() reads the file back and
        # says so once instead.
        with _STDERR_LOCK, opencv_log_level("LOG_LEVEL_ERROR"):
            self.writer.write(image)
        self.written += 1

    def full(self) -> bool:
        return self.limit is not None and self.partial is not None and self.partial.stat().st_size > self.limit

    def finish(self, keep: bool) -> None:
        """Close the writer; then rename the file into place (``keep``) or remove every trace of it."""
        self.writer.release()
        if self.partial is None:
            return
        if keep:
            readable = _readable_frames(self.partial)
            if readable is not None and readable >= self.written:
                os.replace(self.partial, self.output)
                return
        self.partial.unlink(missing_ok=True)
        self._remove_created()
        if keep:
            # OpenCV's writer reports no failed write (a full disk, a storage limit): the file is read back.
            held = "cannot be read back" if readable is None else f"holds {readable} of them"
            earlier = f"; the earlier {self.output} is untouched" if self.output.exists() else ""
            raise InputError(f"{self.output}: {self.written} frame(s) were written but the file {held} "
                             f"(is the disk full?); nothing kept{earlier}")

    def _remove_created(self) -> None:
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:  # something else was put there meanwhile: leave it
                break


def _readable_frames(path: Path) -> Optional[int]:
    """How many frames the container at ``path`` says it holds (its index, not a decode); None when
    OpenCV cannot open it."""
    with _quiet_opencv():
        capture = cv2.VideoCapture(str(path))
        try:
            if not capture.isOpened():
                return None
            return max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0)
        finally:
            capture.release()


class _Window:
    """The ``show`` window; q, Esc or closing it asks the run to stop. With a remover that takes a
    strength, a slider sets it live (:data:`STRENGTH_SLIDER`)."""

    def __init__(self, remover: Any) -> None:
        self.remover = remover
        self.opened = False

    def _open(self) -> None:
        cv2.namedWindow(WINDOW_NAME)
        if isinstance(getattr(self.remover, "strength", None), float):
            label, top = STRENGTH_SLIDER
            cv2.createTrackbar(label, WINDOW_NAME, round(100 * self.remover.strength), top, self._set_strength)
        self.opened = True

    def _set_strength(self, percent: int) -> None:
        self.remover.strength = percent / 100.0

    def show(self, image: np.ndarray) -> bool:
        """Show ``image``; False when the user asked to stop."""
        if not self.opened:
            self._open()
        cv2.imshow(WINDOW_NAME, image)
        key = cv2.waitKey(1) & 0xFF
        return key not in (ord("q"), 27) and cv2.getWindowProperty(WINDOW_NAME, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        cv2.destroyWindow(WINDOW_NAME)


def may_have_audio(source: Source) -> bool:
    """Whether ``source`` is a local video file, the one input whose audio :func:`audio_note`'s line
    can add back: cameras and pipelines give OpenCV no audio, a still image has none, and a URL may
    be a live stream that ffmpeg would not read the same again. Whether the file holds an audio track
    is not known here: OpenCV's FFmpeg backend (the PyPI wheel's) opens no audio streams."""
    return isinstance(source, str) and os.path.isfile(source) and not is_image_file(source)


def audio_note(source: Source, output: Union[Path, str]) -> str:
    """The note that audio is not copied, with the ffmpeg line that adds it back for these files.

    ``-shortest`` cuts the audio where the video ends, as after ``max_frames``."""
    out = Path(output)
    with_audio = out.with_name(f"{out.stem}_with_audio{out.suffix}")
    command = " ".join(shlex.quote(str(part)) for part in
                       ("ffmpeg", "-i", out, "-i", source, "-map", "0:v", "-map", "1:a?", "-c", "copy", "-shortest",
                        with_audio))
    return f"note: audio is not copied (OpenCV carries video frames only); to add it back: {command}"


def process_video(
    source: Union[str, int, os.PathLike],
    output: Output,
    remover: Any,
    preview: bool = False,
    overwrite: bool = False,
    camera: bool = False,
    max_frames: Optional[int] = None,
    queue_size: int = 8,
    progress: bool = True,
    show: bool = False,
) -> VideoSummary:
    """Remove reflections from every frame of ``source`` into ``output``.

    ``source``: a video file, URL, camera index or GStreamer pipeline; ``output``: a video file
    (extension from :data:`CODECS_BY_EXTENSION`) or a GStreamer pipeline starting with appsrc.
    ``remover`` is anything with ``remove(frame, colour_order="BGR")`` (a
    :class:`~dereflect.remover.Remover`). ``preview`` writes input | output side by side;
    ``show`` also shows each output frame in a window. A file output is written under a
    hidden temporary name and renamed when done (also after Ctrl+C or SIGTERM, so a camera
    session keeps what was recorded); it never replaces the input and replaces another
    existing file only with ``overwrite``. Raises InputError, before anything is written,
    for bad paths, a source with no decodable frame, or an odd frame size the output's
    encoder cannot keep. A signal before the first frame leaves no file and a summary of 0
    frames whose ``stopped_by`` names it.
    """
    from tqdm import tqdm

    check_job(source, output, overwrite=overwrite, camera=camera, show=show, max_frames=max_frames)
    src = parse_source(source, camera)
    target: Union[Path, str] = output if is_pipeline(output) else Path(output)
    capture = open_source(src, camera)
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        if not fps > 0 or fps > 1000:
            fps = DEFAULT_CAMERA_FPS
        live = camera or isinstance(src, int)
        is_file = not live and isinstance(src, str) and not is_pipeline(src)
        total = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0) if is_file else 0
        expected = total or None
        if max_frames is not None and expected is not None:
            expected = min(expected, max_frames)
        # A camera's failed read means it is gone: no stepping over, unlike a damaged frame in a file.
        frames = _Frames(capture, step_over=not live, total=total or None)
        first = frames.next()
        if first is None:
            raise InputError(f"{describe_source(src)}: no frame could be decoded (the video holds no frames, "
                             "or none is readable); nothing written")
        height, width = first[0].shape[:2]
        out_size = (2 * width if preview else width, height)
        sink = _Sink(target, out_size, fps)
        summary = VideoSummary(output=target, source_fps=fps, size=(width, height), output_size=out_size,
                               codec=sink.codec, expected_frames=expected)
        _run(summary, sink, frames, first, remover, preview, max_frames, queue_size, progress, show, tqdm)
    finally:
        capture.release()
    return summary


def _run(summary: VideoSummary, sink: _Sink, frames: _Frames, first: Tuple[np.ndarray, int], remover: Any,
         preview: bool, max_frames: Optional[int], queue_size: int, progress: bool, show: bool, tqdm: Any) -> None:
    """The threads and the writing loop; the sink is finished (kept or removed) whatever happens."""
    width, height = summary.size
    stop = threading.Event()
    errors: List[BaseException] = []
    frames_q: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
    results_q: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
    threads = [
        threading.Thread(target=_reader, args=(frames, first, frames_q, stop, max_frames, errors),
                         name="dereflect-decode", daemon=True),
        threading.Thread(target=_worker, args=(remover, frames_q, results_q, stop, errors),
                         name="dereflect-infer", daemon=True),
    ]
    window = _Window(remover) if show else None
    # disable=None: a bar only on a terminal; a log file would fill with its redraws.
    bar = tqdm(total=summary.expected_frames, unit="frame", disable=None if progress else True, dynamic_ncols=True,
               file=sys.stderr)
    last: Optional[np.ndarray] = None
    waiting = 0  # undecodable frames before the first good one: they take its output frame

    def write(item: Tuple[int, Optional[np.ndarray], Optional[np.ndarray], Optional[str]]) -> bool:
        """Write one slot; False when the window or the size limit asks to stop."""
        nonlocal last, waiting
        index, frame, result, error = item
        if frame is None:
            summary.skipped.append(index)
            if last is None:
                waiting += 1
                return True
            image = last
        else:
            if error is not None:
                summary.failed += 1
                summary.failures.append((index, error))
                if summary.failed <= MAX_REPORTED_FAILURES:
                    bar.write(f"frame {index}: failed ({error}); written unchanged")
            if result.shape[:2] != (height, width):
                result = cv2.resize(result, (width, height))
                frame = cv2.resize(frame, (width, height))
            image = np.hstack([frame, result]) if preview else result
        for _ in range(waiting + 1):
            sink.write(image)
            summary.frames += 1
            bar.update(1)
        waiting, last = 0, image
        if window is not None and not window.show(image):
            summary.stopped_by = "the window"
            return False
        if sink.full():
            summary.stopped_by = f"the {OWN_AVI_LIMIT >> 20} MiB limit of OpenCV's own AVI writer (odd frame size)"
            return False
        return True

    keep = False
    start = time.perf_counter()
    try:
        with StopSignals() as signals:
            try:
                for thread in threads:
                    thread.start()
                while signals.received is None:
                    try:
                        item = results_q.get(timeout=0.1)
                    except queue.Empty:
                        if errors:
                            raise errors[0] from None
                        continue
                    if item is _END or not write(item):
                        break
                if errors:
                    raise errors[0]
            except KeyboardInterrupt:  # an application's own SIGINT handler, or a Ctrl+C before ours was set
                summary.stopped_by = "SIGINT"
            if signals.received is not None:
                summary.stopped_by = signals.received
            stop.set()
            for thread in threads:
                thread.join(timeout=5)
            if summary.stopped_by is not None:
                # Frames the remover finished before the stop are kept too.
                while True:
                    try:
                        item = results_q.get_nowait()
                    except queue.Empty:
                        break
                    if item is _END or not write(item):
                        break
            if summary.frames == 0:
                if summary.stopped_by in SIGNAL_NAMES:
                    return  # nothing to keep; the summary says what stopped it (the CLI: its exit status)
                raise InputError(f"{summary.output}: stopped before any frame was written; nothing kept")
            keep = True
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        bar.close()
        if window is not None:
            window.close()
        summary.seconds = time.perf_counter() - start
        sink.finish(keep)
