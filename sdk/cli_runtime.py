"""``dereflect remove``: image files and folders of images."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from dereflect.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE
from dereflect.cli_options import add_model_options, open_from_args
from dereflect.errors import DereflectError, InputError
from dereflect.remover import INTERMEDIATE_LAYERS

from .imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, check_output_path, is_image_file, one_line_error, some_names

DESCRIPTION = """\
Remove reflections from image files and folders of images. A single input file with an image
file name as -o writes that file; otherwise -o is a folder (an existing one, a name without an
extension, or any name ending with /) and the outputs keep the input names (with --recursive,
their subfolders too). Inputs are never changed."""

EPILOG = f"""\
exit status: {EXIT_OK} every image written, or nothing left to do (every output exists already: one line
says so); an existing output is kept without --overwrite and its input not run, so the same
command again finishes an interrupted run; {EXIT_SOME_FAILED} some images failed (one line each; the others were
written); {EXIT_USAGE} nothing written (a bad option, input or output path, every image failed, or the one
input file named has its output already: a one-line error each).

Checked before any work starts, with nothing written when a check fails: -o names an image
format ({" ".join(IMAGE_EXTENSIONS)}) or a folder; every output's folder
can be created and written to (no part of the path is a file); every name fits the file system;
no two inputs would write one file, outputs and --save-intermediates files alike, and none would
replace an input. A colour image is refused as .pgm (grey only; use .ppm, .pnm or .png) before
the model runs on it; a float TIFF is written as a float32 TIFF, as 8-bit in other formats.
A folder's own images are processed; its subfolders only with --recursive. Hidden files,
subfolders and files that are not images are skipped and counted in one line. Outputs are
written atomically (a hidden temporary file, then a rename), so a failed or interrupted image
leaves no partial file."""


def register(subparsers: Any) -> None:
    remove = subparsers.add_parser(
        "remove",
        help="remove reflections from images",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    remove.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders of images")
    remove.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output image file (one input file) or folder (required)")
    remove.add_argument("-r", "--recursive", action="store_true",
                        help="also process the images in subfolders of IN folders, keeping the folder structure "
                             "under OUT (default: a folder's own images only)")
    remove.add_argument("-q", "--quiet", action="store_true",
                        help="print errors only: no progress bar, no line per image, no note of skipped files "
                             "(default: off)")
    remove.add_argument("--save-intermediates", action="store_true",
                        help="also write NAME.KEY.png next to each output for each intermediate the model "
                             f"makes, KEY one of {', '.join(INTERMEDIATE_LAYERS)} (RM2S: all but gradient; "
                             "CRRN: reflection and gradient), at the resolution the networks ran at; the "
                             "confidence map as a colour map, dark where there is no edge (default: off)")
    remove.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (default: an image whose output exists is not run, "
                             "and named; the others are done)")
    remove.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="refuse images with more pixels, from their header before decoding "
                             f"(0: no limit; default: {DEFAULT_MAX_PIXELS:,})")
    remove.add_argument("--strip-metadata", action="store_true",
                        help="write outputs without the input's EXIF (capture time, camera, place) and colour "
                             "profile (default: JPEG and PNG outputs keep both, orientation set to upright)")
    add_model_options(remove)
    remove.set_defaults(func=run_remove)


@dataclass
class RemovePlan:
    """What ``dereflect remove`` will do: (input, output) pairs, and what it skips by reason."""

    pairs: List[Tuple[Path, Path]]
    skipped: Dict[str, List[str]] = field(default_factory=dict)
    #: Outputs (or their intermediates) that exist already, kept without ``--overwrite``: those inputs are not run.
    existing: List[Path] = field(default_factory=list)

    def some_existing(self) -> str:
        """The first existing outputs and how many more: for messages."""
        return some_names([str(path) for path in self.existing], 3)

    def skipped_note(self) -> Optional[str]:
        """One line naming what was skipped, or None."""
        if not self.skipped:
            return None
        parts = [f"{len(names)} {reason} ({some_names(names, 3)})" for reason, names in self.skipped.items()]
        return "skipped " + "; ".join(parts)


_SUBFOLDER = "subfolder(s) (use --recursive)"


def _walk(folder: Path, recursive: bool, output: Optional[Path], relative: Path,
          found: List[Tuple[Path, Path]], skipped: Dict[str, List[str]]) -> None:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"{folder}: cannot list this folder: {exc.strerror or exc}") from exc
    for entry in entries:
        if entry.name.startswith("."):
            reason = "hidden file(s)"
        elif entry.is_dir():
            if output is not None and os.path.exists(output) and os.path.samefile(entry, output):
                reason = "output folder(s)"
            elif not recursive:
                reason = _SUBFOLDER
            elif entry.is_symlink():
                reason = "link(s) to a folder"  # not followed: a link may lead back up the tree
            else:
                _walk(entry, recursive, output, relative / entry.name, found, skipped)
                continue
        elif entry.is_file() and is_image_file(entry):
            found.append((entry, relative / entry.name))
            continue
        else:
            reason = "file(s) that are not images"
        skipped.setdefault(reason, []).append(str(entry))


def _inputs(inputs: List[str], recursive: bool, output: Optional[Path]) -> RemovePlan:
    """The image files to process, each with its output name relative to OUT, and what was skipped."""
    plan = RemovePlan(pairs=[])
    for raw in inputs:
        path = Path(raw)
        if os.path.isdir(path):
            found: List[Tuple[Path, Path]] = []
            skipped: Dict[str, List[str]] = {}
            _walk(path, recursive, output, Path(), found, skipped)
            if not found:
                note = " (it has subfolders: use --recursive)" if _SUBFOLDER in skipped else ""
                raise InputError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)}){note}")
            plan.pairs.extend(found)
            for reason, names in skipped.items():
                plan.skipped.setdefault(reason, []).extend(names)
        elif os.path.isfile(path):
            plan.pairs.append((path, Path(path.name)))
        elif os.path.lexists(path) and not os.path.exists(path):
            raise InputError(f"{path}: broken symbolic link")
        elif os.path.exists(path):
            raise InputError(f"{path}: not a file or a folder")
        else:
            raise InputError(f"{path}: file not found")
    return plan


def _output_is_folder(output: str, inputs: List[str]) -> bool:
    """Whether -o names a folder; InputError when it names neither an image file nor a folder."""
    out = Path(output)
    if os.path.isdir(out) or output.endswith(("/", os.sep)) or not out.suffix:
        return True
    if not is_image_file(out):
        raise InputError(f"-o {output}: {out.suffix!r} is not an image format ({', '.join(IMAGE_EXTENSIONS)}); "
                         "to name a folder, end it with /")
    if len(inputs) != 1 or os.path.isdir(inputs[0]):
        raise InputError(f"-o {output} names one image file, but the input is a folder or several files; "
                         "give a folder")
    return False


def intermediate_path(target: Path, key: str) -> Path:
    """Where ``--save-intermediates`` writes intermediate ``key`` of the output ``target``."""
    base = target.with_suffix("")
    return base.with_name(f"{base.name}.{key}.png")


def _file_id(path: Path) -> Tuple[int, int]:
    """What identifies a file whatever the path to it (links, ``..``): its device and inode."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def plan_outputs(inputs: List[str], output: str, recursive: bool = False,
                 intermediates: bool = False, overwrite: bool = False) -> RemovePlan:
    """(input, output) pairs, every file to be written checked; InputError before any work when one is
    unusable: two inputs would write one file (an output or, with ``intermediates``, one of its
    intermediates), a file written would replace an input, or a path cannot be written.

    Without ``overwrite``, inputs whose output exists already go to ``existing`` instead of the pairs
    (a folder run again after an interruption does the rest; when every output exists there is
    nothing left to do). One input file named alone whose output exists is an InputError instead:
    that file was asked for, and nothing would be done.
    """
    folder = _output_is_folder(output, inputs)
    out = Path(output)
    plan = _inputs(inputs, recursive, out if folder else None)
    if folder:
        check_output_path(out, folder=True)
    input_ids = {_file_id(source) for source, _ in plan.pairs}
    pairs: List[Tuple[Path, Path]] = []
    # Every file to be written: the input it is written for, and whether it is an intermediate.
    claimed: Dict[Path, Tuple[Path, bool]] = {}
    for source, relative in plan.pairs:
        if folder and not is_image_file(relative):
            raise InputError(f"{source}: not an image file name; in a folder the output keeps the input's name, "
                             f"which must end in one of {', '.join(IMAGE_EXTENSIONS)}")
        target = out / relative if folder else out
        written = [target]
        if intermediates:
            written += [intermediate_path(target, key) for key in INTERMEDIATE_LAYERS]
        for path in written:
            intermediate = path != target
            if path in claimed:
                other, other_intermediate = claimed[path]
                note = (" (--save-intermediates writes NAME.KEY.png beside each output NAME)"
                        if intermediate or other_intermediate else "")
                raise InputError(f"{source} and {other} would both be written to {path}{note}; rename one")
            claimed[path] = (source, intermediate)
            if os.path.exists(path) and _file_id(path) in input_ids:
                raise InputError(f"{path}: refusing to overwrite the input image; choose another output")
            check_output_path(path)
        found = [path for path in written if os.path.lexists(path)]
        if found and not overwrite:
            plan.existing.append(found[0])
            continue
        pairs.append((source, target))
    if plan.existing and not pairs and len(inputs) == 1 and not os.path.isdir(inputs[0]):
        raise InputError(f"{plan.existing[0]}: file exists; pass --overwrite to replace it")
    plan.pairs = pairs
    return plan


def _intermediate_images(result: Any) -> Dict[str, Any]:
    """The intermediates of a Result in BGR order (the command line runs in OpenCV's order) as images."""
    import numpy as np

    from .tools.evaluate import confidence_colours

    images: Dict[str, Any] = {}
    if result.stage1 is not None:
        images["stage1"] = result.stage1
    if result.confidence is not None:
        images["confidence"] = np.ascontiguousarray(confidence_colours(result.confidence)[:, :, ::-1])
    for key in ("mask_background", "mask_reflection", "gradient"):
        value = getattr(result, key)
        if value is not None:
            plane = value.astype(np.float32)
            if key == "gradient" and plane.max() > 0:
                plane = plane / plane.max()
            images[key] = np.repeat(plane[:, :, None], 3, axis=2)
    images["reflection"] = np.clip(result.reflection, 0, 1)
    return images


class _TileBar:
    """A progress bar over one large image's tiles (``--large-image tile`` can take minutes), opened
    at the first tile so that images that fit the networks whole show none; only on a terminal."""

    def __init__(self, source: Path, quiet: bool) -> None:
        self.source, self.quiet, self.bar = source, quiet, None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tile", desc=self.source.name, leave=False, file=sys.stderr,
                            disable=True if self.quiet else None)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _TileBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _remove_one(remover: Any, source: Path, target: Path, args: argparse.Namespace) -> None:
    from .imageio import output_layout, read_array, write_image

    # plan_outputs kept back the inputs whose outputs exist; write_image refuses one made since.
    image, info = read_array(source, max_pixels=args.max_pixels or None)
    output_layout(target, info)  # a format that cannot hold this image (colour as .pgm): refused before the model
    if args.strip_metadata:
        info.metadata = None
    with _TileBar(source, quiet=args.quiet) as tiles:
        if not args.save_intermediates:
            write_image(target, remover.remove(image, colour_order="BGR", progress=tiles.update), info,
                        overwrite=args.overwrite, colour_order="BGR")
            return
        result = remover.remove_with_intermediates(image, colour_order="BGR", progress=tiles.update)
    extras = {intermediate_path(target, key): value for key, value in _intermediate_images(result).items()}
    write_image(target, result.background, info, overwrite=args.overwrite, colour_order="BGR")
    for path, value in extras.items():
        write_image(path, value, overwrite=args.overwrite, colour_order="BGR")


def run_remove(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .imageio import opencv_logging

    # Every OpenCV failure here becomes one line of our own (an image that cannot be read or written),
    # so OpenCV's log lines ([ERROR:...], [ WARN:...]) would only repeat it, or be noise (libtiff warnings).
    logging = opencv_logging()
    if logging is not None:
        logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    if args.max_pixels < 0:
        raise InputError(f"--max-pixels must be 0 (no limit) or positive, not {args.max_pixels}")
    plan = plan_outputs(args.inputs, args.output, recursive=args.recursive, intermediates=args.save_intermediates,
                        overwrite=args.overwrite)
    note = plan.skipped_note()
    if note and not args.quiet:
        print(f"dereflect: {note}", file=sys.stderr)
    kept = len(plan.existing)
    if not plan.pairs:
        # A run again after a finished one: nothing left to do is success, for scripts that resume.
        # Said even with --quiet: the user may have expected those outputs replaced.
        print(f"dereflect: nothing to do: all {kept} output(s) exist already ({plan.some_existing()}); "
              "pass --overwrite to replace them", file=sys.stderr)
        return EXIT_OK
    if kept:
        # Even with --quiet: the user may have expected those outputs replaced.
        print(f"dereflect: {kept} output(s) exist already and are kept, their inputs not run "
              f"({plan.some_existing()}); pass --overwrite to replace them",
              file=sys.stderr)
    remover = open_from_args(args)
    written = failed = 0
    total = len(plan.pairs)
    # disable=None: a bar only on a terminal; a log file would fill with its redraws.
    with tqdm(plan.pairs, unit="image", disable=True if args.quiet or total < 2 else None, file=sys.stderr) as bar:
        try:
            for source, target in bar:
                try:
                    _remove_one(remover, source, target, args)
                except (DereflectError, MemoryError) as exc:
                    failed += 1
                    # Through tqdm, so that the line does not break the progress bar.
                    bar.write(f"dereflect: error: {one_line_error(exc, source, target)}", file=sys.stderr)
                    continue
                written += 1
                if not args.quiet:
                    bar.write(f"{source} -> {target}", file=sys.stdout)
        except KeyboardInterrupt:
            # At once, not after the image in progress (one large image can take minutes); writes are
            # atomic, so what was written is whole, and a second run does the rest.
            if total > 1:
                bar.write(f"dereflect: {written} of {total} image(s) written before the interruption; the same "
                          "command again does the rest", file=sys.stderr)
            raise
    if failed or kept:
        counts = [f"{failed} of {total} image(s) failed"] if failed else []
        if kept:
            counts.append(f"{kept} not run (output exists)")
        print(f"dereflect: {'; '.join(counts)}; {written} written", file=sys.stderr)
        # Keeping an existing output is what was asked (no --overwrite): a second run after an
        # interruption that does the rest has done everything.
        if failed:
            return EXIT_SOME_FAILED if written else EXIT_USAGE
        return EXIT_OK
    if total > 1 and not args.quiet:
        print(f"dereflect: {written} image(s) written to {args.output}", file=sys.stderr)
    return EXIT_OK
