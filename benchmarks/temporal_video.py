"""The README's figures for temporal smoothing on real photos: what it steadies, and what it costs.

``dereflect eval MODEL --flicker`` measures a generated scene where the input stands still; this script
makes short clips from real photos, runs every frame through ``VideoSession(temporal=False)`` (per
frame, as ``Remover.remove``) and ``VideoSession(temporal=True)`` (the ``dereflect video`` default), and
prints, in 8-bit levels:

* static: a photo at 640x360 standing still for 40 frames with sensor noise of 2 levels, written as
  MP4 (mp4v) and read back: the mean frame-to-frame change of the input, of the per-frame output and
  of the smoothed output (what a viewer sees as flicker);
* pan N px: the photo panning N px a frame (30 frames): the mean and largest |smoothed - per-frame|
  after five frames (lag the smoothing adds where the scene moves);
* object: a 60x90 patch of a second photo moving 10 px a frame over the first: mean and largest
  |smoothed - per-frame| in the six positions the object has just left (a trail);
* cut: 20 frames of one photo, then another: the largest |smoothed - per-frame| on the cut's frame;
* the model's own change: the mean |per-frame output - input| of the static clip, for scale.

    python benchmarks/temporal_video.py --photos ../shared/data/dev/real45_inputs --model crrn-lite

The first photo (sorted by name) is the scene, the second the moving object and the cut's target.
One thread (the model opens with threads=1); the machine, date and load are printed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np
from dereflect.errors import DereflectError, InputError
from dereflect.imageio import is_image_file
from dereflect.models import open_model
from dereflect.temporal import VideoSession
from dereflect.tools.bench import machine_info

Frames = List[np.ndarray]
SIZE = (640, 360)  # width, height of every clip


def _photos(folder: Path) -> Tuple[np.ndarray, np.ndarray]:
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of photos")
    names = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if len(names) < 2:
        raise InputError(f"{folder}: needs two photos (the scene and the object), found {len(names)}")
    first, second = (cv2.imread(str(path)) for path in names[:2])
    if first is None or second is None:
        raise InputError(f"{folder}: {names[0].name} or {names[1].name} cannot be read")
    # 800 px wide and at least 360 high: room for a 640x360 window to pan across.
    return tuple(cv2.resize(image, (800, max(360, round(800 * image.shape[0] / image.shape[1]))))
                 for image in (first, second))


def _window(image: np.ndarray, left: int) -> np.ndarray:
    width, height = SIZE
    return np.ascontiguousarray(image[:height, left:left + width])


def _mean_change(frames: Frames) -> float:
    return float(np.mean([np.abs(frames[i].astype(np.float32) - frames[i - 1]).mean()
                          for i in range(1, len(frames))]))


def _through_mp4(frames: Frames, folder: Path) -> Frames:
    path = folder / "static.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, SIZE)
    for frame in frames:
        writer.write(frame)
    writer.release()
    capture, back = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            return back
        back.append(frame)


def _both(run: Callable[[bool], Frames]) -> Tuple[Frames, Frames]:
    return run(False), run(True)


def measure(model: str, photos: Path) -> List[str]:
    scene, other = _photos(photos)
    remover = open_model(model, threads=1)
    rng = np.random.default_rng(0)

    def session_run(frames: Frames) -> Callable[[bool], Frames]:
        def run(temporal: bool) -> Frames:
            session = VideoSession(remover, temporal=temporal)
            return [session.remove(frame) for frame in frames]
        return run

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        still = _window(scene, 0)
        noisy = [np.clip(still + rng.normal(0, 2, still.shape), 0, 255).astype(np.uint8) for _ in range(40)]
        static = _through_mp4(noisy, Path(tmp))
    per_frame, smoothed = _both(session_run(static))
    own = np.mean([np.abs(o.astype(np.float32) - i).mean() for o, i in zip(per_frame, static)])
    lines.append(f"static (40 frames, noise 2, mp4v): frame-to-frame change: input {_mean_change(static):.2f}, "
                 f"per frame {_mean_change(per_frame):.2f}, smoothed {_mean_change(smoothed):.2f}; the model's "
                 f"own change {own:.1f}")
    for speed in (1, 2, 4):
        frames = [_window(scene, speed * t) for t in range(30)]
        per_frame, smoothed = _both(session_run(frames))
        apart = [np.abs(a.astype(np.float32) - b) for a, b in zip(smoothed[5:], per_frame[5:])]
        lines.append(f"pan {speed} px a frame: |smoothed - per frame| mean {np.mean([d.mean() for d in apart]):.2f}, "
                     f"largest {max(d.max() for d in apart):.0f}")
    patch = other[100:160, 100:190]
    frames, lefts = [], []
    for t in range(30):
        frame, left = _window(scene, 0).copy(), 20 + 10 * t
        frame[150:210, left:left + 90] = patch
        frames.append(frame)
        lefts.append(left)
    per_frame, smoothed = _both(session_run(frames))
    trail = [np.abs(smoothed[t].astype(np.float32) - per_frame[t])[145:215, max(0, lefts[t] - 60):lefts[t]]
             for t in range(10, 30)]
    lines.append(f"object (10 px a frame): |smoothed - per frame| where it has just been: mean "
                 f"{np.mean([r.mean() for r in trail]):.2f}, largest {max(r.max() for r in trail):.0f}")
    frames = [_window(scene, 0)] * 20 + [_window(other, 0)] * 5
    per_frame, smoothed = _both(session_run(frames))
    at_cut, after = (np.abs(smoothed[t].astype(np.float32) - per_frame[t]).max() for t in (20, 21))
    lines.append(f"cut (frame 20): |smoothed - per frame| largest {at_cut:.0f} on the cut's frame, "
                 f"{after:.0f} on the next")
    remover.close()
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", required=True, type=Path,
                        help="a folder of photos (the first two, by name, are used)")
    parser.add_argument("--model", default="crrn-lite",
                        help="a bundled model, an export or a checkpoint (default crrn-lite)")
    args = parser.parse_args(argv)
    try:
        lines = measure(args.model, args.photos)
    except DereflectError as exc:
        print(f"temporal_video: error: {exc}", file=sys.stderr)
        return 2
    machine = machine_info(on_gpu=False)
    print(f"{args.model}, photos of {args.photos}; {machine.get('cpu', '')}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load {os.getloadavg()[0]:.2f}")
    for line in lines:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
