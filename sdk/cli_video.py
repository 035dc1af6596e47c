"""``dereflect video``: video files, cameras and (where OpenCV has GStreamer) pipelines."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

from dereflect.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE
from dereflect.cli_options import add_model_options, open_from_args
from dereflect.stop_signals import SIGNAL_NAMES, exit_status
from dereflect.video import CODEC_NAMES, CODECS_BY_EXTENSION


def _fallback_codecs() -> str:
    """The codec each output extension gets without H.264, grouped: "MPEG-4 Part 2: .mp4 .m4v; ..."."""
    extensions: Dict[str, List[str]] = {}
    for extension, codecs in CODECS_BY_EXTENSION.items():
        extensions.setdefault(CODEC_NAMES[codecs[-1]], []).append(extension)
    return "; ".join(f"{codec}: {' '.join(names)}" for codec, names in extensions.items())


INTERRUPTED, TERMINATED, HUNG_UP = exit_status("SIGINT"), exit_status("SIGTERM"), exit_status("SIGHUP")
EPILOG = f"""\
exit status: {EXIT_OK} done (also when stopped by --max-frames or q in the --show window); {EXIT_SOME_FAILED} done, but
some frames failed (written unchanged) or could not be decoded (the previous output frame
repeated in their place); {EXIT_USAGE} nothing written (bad input, output or option: a one-line error);
{INTERRUPTED} stopped by Ctrl+C, {TERMINATED} by SIGTERM, {HUNG_UP} by SIGHUP (the terminal closed) (the output holds
every frame processed so far; none written: no file).

A camera records until --max-frames N, q in the --show window (both exit {EXIT_OK}) or a stop signal:
Ctrl+C, SIGTERM (systemd, docker stop) or SIGHUP (exit {INTERRUPTED} / {TERMINATED} / {HUNG_UP}), each keeping
the file so far. Numbered images have no frame rate: OpenCV reads them at 25 fps.

output codec: H.264 where this OpenCV build has an encoder for it (the PyPI wheel has none; the
summary says which), else {_fallback_codecs()}.
An odd frame size is kept exactly in .avi and refused for the other extensions (OpenCV's FFmpeg
writer would crop it to even).

GStreamer pipelines (OpenCV built with GStreamer, as JetPack's is; the PyPI wheel is not): IN
ending in appsink, OUT starting with appsrc. Usual Jetson pipelines:
  CSI camera (Argus):
    "nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 !
     nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR !
     appsink drop=true max-buffers=2"
  USB camera:
    "v4l2src device=/dev/video0 ! video/x-raw,width=1280,height=720,framerate=30/1 ! videoconvert !
     video/x-raw,format=BGR ! appsink drop=true max-buffers=2"
  hardware H.264 encoder to MP4 (Jetson with NVENC: not the Orin Nano, which has none):
    "appsrc ! videoconvert ! video/x-raw,format=BGRx ! nvvidconv ! video/x-raw(memory:NVMM),format=NV12 !
     nvv4l2h264enc bitrate=8000000 ! h264parse ! qtmux ! filesink location=clean.mp4"
  software H.264 (any machine, the Orin Nano included):
    "appsrc ! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast ! h264parse ! qtmux !
     filesink location=clean.mp4"
  stream over RTP/UDP:
    "appsrc ! videoconvert ! video/x-raw,format=BGRx ! nvvidconv ! video/x-raw(memory:NVMM),format=NV12 !
     nvv4l2h264enc insert-sps-pps=true ! h264parse ! rtph264pay config-interval=1 pt=96 !
     udpsink host=192.168.1.10 port=5000"
Give each pipeline as one argument (quoted, on one line).

FFmpeg's own log lines are hidden (the summary says what happened); set OPENCV_FFMPEG_LOGLEVEL
(e.g. 24) to see them.
"""


def register(subparsers: Any) -> None:
    video = subparsers.add_parser(
        "video",
        help="remove reflections from a video file, camera or GStreamer pipeline",
        description="Remove reflections from every frame of a video file, camera or GStreamer pipeline into "
                    "OUT. Frame order, exact size and nominal frame rate are kept; audio is NOT copied "
                    "(OpenCV handles video frames only). A frame that fails is written unchanged, a frame "
                    "that cannot be decoded is replaced by the previous output frame; both are counted. "
                    "Ctrl+C, SIGTERM, SIGHUP and q in the --show window stop the run and keep what was "
                    f"processed (exit status {INTERRUPTED}, {TERMINATED}, {HUNG_UP} and {EXIT_OK}).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    video.add_argument("input", metavar="IN",
                       help="video file, numbered images (frames/f_%%04d.png, from 0 or 1), URL, camera index (an "
                            "integer) or GStreamer pipeline ending in appsink")
    video.add_argument("-o", "--output", required=True, metavar="OUT",
                       help=f"output video ({', '.join(CODECS_BY_EXTENSION)}) or GStreamer pipeline starting "
                            "with appsrc")
    video.add_argument("--camera", action="store_true", help="treat IN as a camera index or device (default: off)")
    video.add_argument("--preview", action="store_true",
                       help="write input | output side by side: twice as wide (default: off)")
    video.add_argument("--show", action="store_true",
                       help="also show the output in a window, with a strength slider (needs a display; q or "
                            "Esc stops; default: off)")
    video.add_argument("--max-frames", type=int, metavar="N",
                       help="stop after N frames, a positive integer (default: all; a camera: until stopped, see "
                            "below)")
    video.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: off)")
    video.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    video.add_argument("-q", "--quiet", action="store_true",
                       help="print problems only: no progress bar, no summary line, no audio note (default: off)")
    video.add_argument("--temporal", choices=["on", "off"], default="on",
                       help="carry RM2S's 2-means centres, the output's overall colour and, where the frame "
                            "stayed put, the model's change per pixel across frames with moving averages "
                            "(dereflect.temporal); off runs every frame on its own. On is the default: it "
                            "flickers about half as much with the bundled models (dereflect eval --flicker)")
    add_model_options(video)
    video.set_defaults(func=run_video)


def run_video(args: argparse.Namespace) -> int:
    # FFmpeg logs each damaged frame and each encoder it fails to open (e.g. H.264 on the PyPI
    # wheel) straight to stderr; the summary reports both. Read when OpenCV first uses FFmpeg.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    from .temporal import VideoSession
    from .video import audio_note, check_job, is_pipeline, may_have_audio, parse_source, process_video, sequence_gap

    check_job(args.input, args.output, overwrite=args.overwrite, camera=args.camera, show=args.show,
              max_frames=args.max_frames)
    remover = open_from_args(args)
    frames = VideoSession(remover, temporal=args.temporal == "on")
    summary = process_video(
        args.input, args.output, frames,
        preview=args.preview, overwrite=args.overwrite, camera=args.camera,
        max_frames=args.max_frames, progress=not (args.no_progress or args.quiet), show=args.show,
    )
    if summary.frames == 0:  # a stop signal came before the first frame
        print(f"stopped by {summary.stopped_by} before any frame was written; no file", file=sys.stderr)
        return exit_status(summary.stopped_by)
    width, height = summary.output_size
    layout = f" (input | output, each {summary.size[0]}x{summary.size[1]})" if args.preview else ""
    if not args.quiet:
        print(
            f"{summary.output}: {summary.frames} frame(s) at {width}x{height}{layout}, {summary.source_fps:.4g} fps, "
            f"{summary.codec}; {summary.fps:.1f} frames/s overall (start-up included)",
            file=sys.stderr,
        )
    source = parse_source(args.input, args.camera)
    if summary.expected_frames is not None and not summary.interrupted and summary.frames < summary.expected_frames:
        gap = sequence_gap(source, summary.frames)
        if gap is not None:
            print(f"warning: the sequence stops at {gap}, which is missing: the numbered images after it were not "
                  "read (OpenCV reads a sequence up to its first gap)", file=sys.stderr)
        else:
            print(f"warning: the source reported {summary.expected_frames} frames but only {summary.frames} could "
                  "be read (a damaged or cut end, or a wrong count in the file)", file=sys.stderr)
    if summary.interrupted and not args.quiet:
        print(f"stopped by {summary.stopped_by}: the output holds the frames processed so far", file=sys.stderr)
    if summary.skipped:
        shown = ", ".join(str(i) for i in summary.skipped[:10]) + (", ..." if len(summary.skipped) > 10 else "")
        print(f"warning: {len(summary.skipped)} frame(s) could not be decoded (frame {shown}); the previous "
              "output frame (before the first decodable one: that one's) was written in each one's place, keeping "
              "the length and timing", file=sys.stderr)
    if summary.failed:
        print(f"warning: {summary.failed} frame(s) failed and were written unchanged "
              f"(first: frame {summary.failures[0][0]}: {summary.failures[0][1]})", file=sys.stderr)
    # Only for a run that finished (at the end or at --max-frames): a stopped run's file is partial,
    # not yet the result to add audio to.
    if (not summary.interrupted and not args.quiet and not args.camera and may_have_audio(source)
            and not is_pipeline(args.output)):
        print(audio_note(source, summary.output), file=sys.stderr)
    if summary.stopped_by in SIGNAL_NAMES:
        # Like any command stopped by a signal, though the file is complete so far.
        return exit_status(summary.stopped_by)
    return EXIT_SOME_FAILED if summary.failed or summary.skipped else EXIT_OK
