"""Video and camera streams through a Remover, with decode, inference and encode overlapped.

Three stages run concurrently, joined by bounded queues (so memory stays flat and a slow
stage throttles the others): a reader thread decodes frames, an inference thread runs the
remover, and the calling thread encodes and drives the progress bar (its rate is the
pipeline's frames per second). One inference thread keeps the frame order by construction.

What is kept: every frame, in order, at the source's size and nominal frame rate.
What is not: **audio** (OpenCV reads and writes video frames only; mux it back with e.g.
``ffmpeg -i OUT -i IN -map 0:v -map 1:a? -c copy OUT2``), per-frame timestamps of
variable-frame-rate sources (the output is constant-rate), and the source codec (the output
codec follows the output file's extension). A frame the remover fails on is written
unchanged and counted in the summary; none is dropped. A camera delivers frames at its own
pace: if inference is slower, the camera driver drops frames before they are read, and the
output (written at the camera's nominal rate) plays faster than real time.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import cv2
import numpy as np

from .errors import InputError

FOURCC_BY_EXTENSION = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}
DEFAULT_CAMERA_FPS = 30.0
MAX_REPORTED_FAILURES = 10
AUDIO_NOTICE = (
    "note: audio is not copied (OpenCV carries video frames only); to add it back: "
    "ffmpeg -i OUT -i IN -map 0:v -map 1:a? -c copy OUT_WITH_AUDIO"
)
_END = object()


@dataclass
class VideoSummary:
    """What :func:`process_video` did."""

    output: Path
    frames: int
    failed: int
    failures: List[Tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    source_fps: float = 0.0
    size: Tuple[int, int] = (0, 0)
    expected_frames: Optional[int] = None
    interrupted: bool = False

    @property
    def fps(self) -> float:
        """Frames per second through the whole pipeline (decode, inference, encode)."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def parse_source(source: Union[str, int], camera: bool = False) -> Union[str, int]:
    """A camera index for an integer (or ``camera=True`` with an integer string), else a path or URL."""
    if isinstance(source, int):
        return source
    text = str(source)
    if text.isdigit() and (camera or not Path(text).exists()):
        return int(text)
    return text


def open_source(source: Union[str, int], camera: bool = False) -> cv2.VideoCapture:
    """Open a video file, URL or camera index; InputError when OpenCV cannot read it."""
    source = parse_source(source, camera)
    if isinstance(source, str) and not camera and "://" not in source:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{source}: video file not found")
        if path.stat().st_size == 0:
            raise InputError(f"{source}: file is empty (0 bytes)")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        what = f"camera {source}" if isinstance(source, int) else str(source)
        raise InputError(f"{what}: OpenCV cannot open it (missing camera, unsupported codec or not a video)")
    return capture


def fourcc_for(path: Path) -> str:
    """The codec used for an output file, chosen by its extension."""
    ext = path.suffix.lower()
    if ext not in FOURCC_BY_EXTENSION:
        raise InputError(f"{path}: unsupported video extension; use one of {', '.join(FOURCC_BY_EXTENSION)}")
    return FOURCC_BY_EXTENSION[ext]


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; False when it was not put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _reader(capture: cv2.VideoCapture, out_q: queue.Queue, stop: threading.Event,
            max_frames: Optional[int], errors: List[BaseException]) -> None:
    index = 0
    try:
        while not stop.is_set() and (max_frames is None or index < max_frames):
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            if not _put(out_q, (index, frame), stop):
                break
            index += 1
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
        errors.append(exc)
    finally:
        _put(out_q, _END, stop)


def _worker(remover: Any, in_q: queue.Queue, out_q: queue.Queue, stop: threading.Event,
            errors: List[BaseException]) -> None:
    try:
        while not stop.is_set():
            try:
                item = in_q.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                break
            index, frame = item
            try:
                result, error = remover.remove(frame, colour_order="BGR"), None
            except Exception as exc:  # noqa: BLE001 - one bad frame must not end a long video
                result, error = frame, f"{type(exc).__name__}: {exc}"
            if not _put(out_q, (index, frame, result, error), stop):
                break
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
        errors.append(exc)
    finally:
        _put(out_q, _END, stop)


def _partial_path(output: Path) -> Path:
    return output.with_name(f".{output.stem}.partial{output.suffix}")


def process_video(
    source: Union[str, int],
    output: Union[str, os.PathLike],
    remover: Any,
    preview: bool = False,
    overwrite: bool = False,
    camera: bool = False,
    max_frames: Optional[int] = None,
    queue_size: int = 8,
    progress: bool = True,
) -> VideoSummary:
    """Remove reflections from every frame of ``source`` (file, URL or camera index) into ``output``.

    ``remover`` is anything with ``remove(frame, colour_order="BGR")`` (a
    :class:`~dereflect.remover.Remover`). ``preview`` writes input | output side by side.
    The output is written to a hidden temporary file and renamed when done (also after
    Ctrl+C, so a camera session keeps what was recorded); it never replaces the input and
    replaces another existing file only with ``overwrite``.
    """
    from tqdm import tqdm

    output = Path(output)
    codec = fourcc_for(output)
    src = parse_source(source, camera)
    if isinstance(src, str) and Path(src).exists() and output.exists() and os.path.samefile(src, output):
        raise InputError(f"{output}: refusing to overwrite the input video; choose another output path")
    if output.exists() and not overwrite:
        raise InputError(f"{output}: file exists; pass --overwrite to replace it")
    capture = open_source(src, camera)
    try:
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        if not fps > 0 or fps > 1000:
            fps = DEFAULT_CAMERA_FPS
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if isinstance(src, str) else 0
        expected = total if total > 0 else None
        if max_frames is not None and expected is not None:
            expected = min(expected, max_frames)
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial_path(output)
        out_size = (2 * width if preview else width, height)
        writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*codec), fps, out_size)
        if not writer.isOpened():
            raise InputError(
                f"{output}: OpenCV cannot write {codec} video here; try an .avi (MJPG) or .mp4 output"
            )
        summary = VideoSummary(output=output, frames=0, failed=0, source_fps=fps, size=(width, height),
                               expected_frames=expected)
        stop = threading.Event()
        errors: List[BaseException] = []
        frames_q: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        results_q: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        threads = [
            threading.Thread(target=_reader, args=(capture, frames_q, stop, max_frames, errors),
                             name="dereflect-decode", daemon=True),
            threading.Thread(target=_worker, args=(remover, frames_q, results_q, stop, errors),
                             name="dereflect-infer", daemon=True),
        ]
        bar = tqdm(total=expected, unit="frame", disable=not progress, dynamic_ncols=True, file=sys.stderr)
        start = time.perf_counter()
        completed = False
        try:
            for thread in threads:
                thread.start()
            while True:
                try:
                    item = results_q.get(timeout=0.1)
                except queue.Empty:
                    if errors:
                        raise errors[0] from None
                    continue
                if item is _END:
                    break
                index, frame, result, error = item
                if error is not None:
                    summary.failed += 1
                    summary.failures.append((index, error))
                    if summary.failed <= MAX_REPORTED_FAILURES:
                        bar.write(f"frame {index}: failed ({error}); written unchanged")
                if result.shape[:2] != (height, width):
                    result = cv2.resize(result, (width, height))
                    frame = cv2.resize(frame, (width, height))
                writer.write(np.hstack([frame, result]) if preview else result)
                summary.frames += 1
                bar.update(1)
            if errors:
                raise errors[0]
            completed = True
        except KeyboardInterrupt:
            summary.interrupted = True
            completed = True
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=5)
            bar.close()
            writer.release()
            summary.seconds = time.perf_counter() - start
            if completed:
                os.replace(partial, output)
            elif partial.exists():
                partial.unlink()
    finally:
        capture.release()
    return summary
