"""Soak: many frames through ``dereflect video`` with the process's memory sampled as it goes.

Not a timed test (pytest does not collect it). It generates a clip, runs the real command in a
subprocess with a toy ONNX export (``tests/onnx_fixtures.py``), reads the progress bar to know
how many frames are done, and samples the child's resident memory (VmRSS, and the peak VmHWM,
from /proc/PID/status) each time another ``--every`` frames have passed. Memory is flat when
RSS after the warm-up stays within a few MiB and its fitted slope is near zero.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/soak_video.py --frames 10000 --size 160x120

Small frames and one thread keep its CPU cost low on a shared machine; the leak check does not
need large frames (per-frame buffers scale with the frame, a leak shows as a slope either way).
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import platform
import pty
import re
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_clip(path: Path, frames: int, size: Tuple[int, int], fps: float) -> None:
    """A moving gradient with a moving bright 'reflection' band, Motion JPEG in AVI."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    if not writer.isOpened():
        raise SystemExit(f"cannot write {path}")
    ramp = np.linspace(30, 200, width, dtype=np.float32)
    base = np.tile(ramp, (height, 1))
    for i in range(frames):
        frame = np.dstack([np.roll(base, i, axis=1), np.roll(base, -i, axis=1), np.full_like(base, 60 + i % 100)])
        band = (i * 2) % width
        frame[:, band:band + max(2, width // 16)] += 40
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()


def status_kib(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def copy(source: str, target: str) -> None:
    """The control: decode and encode with plain OpenCV, no dereflect, printing progress like tqdm does."""
    capture = cv2.VideoCapture(source)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    writer = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*CONTROL_CODECS[Path(target).suffix]),
                             capture.get(cv2.CAP_PROP_FPS), size)
    done = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        writer.write(frame)
        done += 1
        if done % 50 == 0:
            print(f"\r| {done}/{total}", end="", file=sys.stderr, flush=True)
    writer.release()
    print(f"\r| {done}/{total}", file=sys.stderr)


CONTROL_CODECS = {".mp4": "mp4v", ".mkv": "XVID", ".avi": "MJPG"}


def run(command: List[str], every: int) -> Tuple[List[Tuple[int, int, int, float]], str, int, float]:
    """Run ``command``; (frames, rss KiB, hwm KiB, seconds) samples, its stderr, exit status, wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    # The child's stderr is a pseudo-terminal: its progress bar, which tells how many frames are done,
    # is drawn on a terminal only.
    terminal, child_end = pty.openpty()
    # A new terminal is 0 columns wide, where the bar draws nothing: give it 120.
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(command, stderr=child_end, env=env)
    os.close(child_end)
    samples: List[Tuple[int, int, int, float]] = []
    text: List[str] = []
    next_mark = 0

    def read_progress() -> None:
        nonlocal next_mark
        buffer = b""
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            buffer += chunk
            # The progress bar redraws with carriage returns: every piece holds the frames done so far.
            *pieces, buffer = re.split(rb"[\r\n]", buffer)
            for piece in pieces:
                text.append(piece.decode(errors="replace"))
                match = re.search(rb"\|\s*(\d+)/\d+", piece)
                if match and int(match.group(1)) >= next_mark:
                    done = int(match.group(1))
                    try:
                        memory = status_kib(process.pid)
                    except FileNotFoundError:  # the process has just ended
                        return
                    samples.append((done, memory["VmRSS"], memory["VmHWM"], time.perf_counter() - start))
                    next_mark = (done // every + 1) * every
        text.append(buffer.decode(errors="replace"))

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    code = process.wait()
    reader.join(timeout=10)
    os.close(terminal)
    lines = [line for line in text if line.strip() and not re.search(r"\|\s*\d+/\d+", line)]
    return samples, "\n".join(lines), code, time.perf_counter() - start


def count_frames(path: Path) -> Tuple[int, Tuple[int, int]]:
    capture, count, size = cv2.VideoCapture(str(path)), 0, (0, 0)
    while True:
        ok, frame = capture.read()
        if not ok:
            return count, size
        count, size = count + 1, (frame.shape[1], frame.shape[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=10000, help="frames in the clip (default 10000)")
    parser.add_argument("--size", default="160x120", help="frame size WxH (default 160x120)")
    parser.add_argument("--fps", type=float, default=25.0, help="the clip's frame rate (default 25)")
    parser.add_argument("--model", choices=["crrn", "rm2s"], default="rm2s",
                        help="toy export: rm2s runs two networks and the CPU middle step (default rm2s)")
    parser.add_argument("--every", type=int, default=100, help="sample memory every N frames (default 100)")
    parser.add_argument("--output", default="out.mp4", help="output file name, its extension sets the codec")
    parser.add_argument("--warmup", type=int, default=1000, help="frames before memory counts as settled")
    parser.add_argument("--control", action="store_true",
                        help="the same clip decoded and encoded by plain OpenCV, without dereflect: what the "
                             "decoder and muxer alone do to memory")
    parser.add_argument("--copy", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.copy:
        copy(*args.copy)
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from onnx_fixtures import make_crrn_export, make_rm2s_export

    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="dereflect-soak-") as tmp:
        work = Path(tmp)
        model = (make_rm2s_export if args.model == "rm2s" else make_crrn_export)(work / "model")
        clip = work / "clip.avi"
        made = time.perf_counter()
        make_clip(clip, args.frames, (width, height), args.fps)
        made = time.perf_counter() - made
        load_before = os.getloadavg()
        out = work / args.output
        if args.control:
            command = [sys.executable, __file__, "--copy", str(clip), str(out)]
        else:
            command = [sys.executable, "-m", "dereflect.cli", "video", str(clip), "-o", str(out), "--model",
                       str(model), "--threads", "1", "--overwrite"]
        samples, stderr, code, seconds = run(command, args.every)
        load_after = os.getloadavg()
        written, size = count_frames(out)

    settled = [s for s in samples if s[0] >= args.warmup] or samples
    frames = np.array([s[0] for s in settled], np.float64)
    rss = np.array([s[1] for s in settled], np.float64) / 1024
    slope = float(np.polyfit(frames, rss, 1)[0] * 1000) if len(settled) > 2 else float("nan")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem_total = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    import dereflect
    import onnxruntime

    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, {mem_total / 1024 ** 2:.0f} GiB RAM; {platform.platform()}")
    print(f"versions: Python {platform.python_version()}, OpenCV {cv2.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, numpy {np.__version__}, dereflect {dereflect.__version__}")
    print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; nice {os.nice(0)}")
    what = "control: plain OpenCV decode + encode" if args.control else f"toy {args.model} export"
    print(f"clip: {args.frames} frames {width}x{height} MJPG, made in {made:.1f} s; run: {what}; output {args.output}")
    print(f"command exit {code}, {seconds:.1f} s wall ({args.frames / seconds:.0f} frames/s); "
          f"output {written} frames at {size[0]}x{size[1]}")
    print(f"samples: {len(samples)} (every {args.every} frames as the progress bar allows)")
    print("frames  RSS MiB  peak MiB")
    for done, rss_kib, hwm_kib, _ in samples:
        if done < args.every or done % 1000 < args.every or done == samples[-1][0]:
            print(f"{done:6d}  {rss_kib / 1024:7.1f}  {hwm_kib / 1024:8.1f}")
    print(f"after {args.warmup} frames: RSS min {rss.min():.1f} MiB, max {rss.max():.1f} MiB, spread "
          f"{rss.max() - rss.min():.1f} MiB; fitted slope {slope:+.3f} MiB per 1000 frames")
    print("command's stderr (progress lines left out):")
    print(stderr)
    return 0 if code == 0 and written == args.frames else 1


if __name__ == "__main__":
    sys.exit(main())
