"""``dereflect video``: video files, cameras and (where OpenCV has GStreamer) pipelines."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dereflect.cli_options import add_model_options, open_from_args


def register(subparsers: Any) -> None:
    video = subparsers.add_parser(
        "video",
        help="remove reflections from a video file or camera",
        description="Remove reflections from every frame of a video file (or camera index) into OUT. Frame "
                    "order, size and nominal frame rate are kept; audio is NOT copied (OpenCV handles video "
                    "frames only). A frame that fails is written unchanged and counted.",
    )
    video.add_argument("input", metavar="IN", help="video file, URL, or camera index (an integer)")
    video.add_argument("-o", "--output", required=True, metavar="OUT",
                       help="output video (.mp4, .avi, .mkv, ...)")
    video.add_argument("--camera", action="store_true", help="treat IN as a camera index or device")
    video.add_argument("--preview", action="store_true", help="write input | output side by side")
    video.add_argument("--max-frames", type=int, metavar="N",
                       help="stop after N frames (cameras: stop with Ctrl+C)")
    video.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    video.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(video)
    video.set_defaults(func=run_video)


def run_video(args: argparse.Namespace) -> int:
    from .video import AUDIO_NOTICE, process_video

    remover = open_from_args(args)
    print(AUDIO_NOTICE, file=sys.stderr)
    summary = process_video(
        args.input, args.output, remover,
        preview=args.preview, overwrite=args.overwrite, camera=args.camera,
        max_frames=args.max_frames, progress=not args.no_progress,
    )
    print(
        f"{summary.output}: {summary.frames} frame(s) at {summary.size[0]}x{summary.size[1]}, "
        f"{summary.source_fps:.3g} fps; pipeline {summary.fps:.1f} frames/s",
        file=sys.stderr,
    )
    if summary.expected_frames is not None and summary.frames < summary.expected_frames:
        print(f"warning: the source reported {summary.expected_frames} frames but only {summary.frames} "
              "could be decoded", file=sys.stderr)
    if summary.interrupted:
        print("interrupted: the output holds the frames processed so far", file=sys.stderr)
    if summary.failed:
        print(f"warning: {summary.failed} frame(s) failed and were written unchanged "
              f"(first: frame {summary.failures[0][0]}: {summary.failures[0][1]})", file=sys.stderr)
        return 1
    return 0
