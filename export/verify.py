"""Golden files written at export time, and ``dereflect export verify`` on the target device.

At export, each network runs with ONNX Runtime (CPU, FP32 ONNX) on a few deterministic,
procedurally generated natural-looking images (no third-party images); inputs and outputs go
to ``golden/<network>.npz``. RM2S stage 2's golden inputs are built from stage 1's outputs by
the runtime's own middle step, so they look like what stage 2 sees in use.

``verify(model, backend)`` runs the networks on those inputs with ONNX Runtime (the FP32 or
FP16 files) or with the TensorRT engines built on this device, and compares (with
:mod:`dereflect.tools.compare`): PSNR and largest error per network and output, against
thresholds that depend on the precision (or the user's ``--min-psnr``; the report says which).
An export without goldens is compared on the same generated images against ONNX Runtime FP32
run here. With ``images=`` it also takes the user's own
photos: each, scaled as ``remove`` scales it (by default to the side the model records), runs
through the method's sequence on ONNX Runtime FP32, and every network of the tested backend is
compared with ONNX Runtime on the same inputs. TensorRT engines are opened
by the runtime's own checks (:func:`dereflect.backends.tensorrt.open_engine`): another TensorRT
version, GPU or ONNX file, or a changed engine, is refused before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from dereflect.errors import DereflectError, InputError, ModelError
from dereflect.manifest import Manifest, NetworkSpec, sha256_file
from dereflect.trt_api import engines_precision, shape_in_profile

GOLDEN_DIR = "golden"
#: (N, H, W) of the golden cases: sides that are not multiples of 32, inside the default
#: TensorRT profile (at least 128, see dereflect.trt_api.DEFAULT_PROFILE).
GOLDEN_SHAPES = ((1, 144, 256), (1, 130, 174))
#: Pass thresholds per (backend, precision): worst PSNR in dB and largest error as a fraction
#: of the output's value range (None: not checked).
THRESHOLDS: Dict[Tuple[str, str], Tuple[float, Optional[float]]] = {
    ("onnxruntime", "fp32"): (80.0, 1e-4),
    ("onnxruntime", "fp16"): (45.0, None),
    ("tensorrt", "fp32"): (50.0, None),
    ("tensorrt", "fp16"): (40.0, None),
}


# --- deterministic natural-looking images -------------------------------------------------------

def _smooth_field(rng: np.random.Generator, height: int, width: int, channels: int,
                  octaves: int) -> np.ndarray:
    # Noise with most energy at low frequencies (about 1/f, like photographs): random grids
    # from coarse to fine, upsampled and summed with halving amplitude.
    total = np.zeros((height, width, channels), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        cells = 2 ** (octave + 1) + 1
        grid = rng.standard_normal((cells, cells, channels)).astype(np.float32)
        up = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        total += amplitude * up.reshape(height, width, channels)
        amplitude *= 0.5
    return total


def _scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One HxWx3 scene: shaded background, overlapping objects with soft or hard edges, grain."""
    img = rng.uniform(0.2, 0.8, 3).astype(np.float32) + 0.12 * _smooth_field(rng, height, width, 3, 5)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.cos(angle) * xx / width + np.sin(angle) * yy / height - 0.5
    img += 0.25 * ramp[..., None] * rng.uniform(0.5, 1.0, 3).astype(np.float32)
    scale = max(height, width)
    for _ in range(int(rng.integers(6, 14))):
        grey = rng.uniform(0.0, 1.0)
        colour = tuple(float(0.6 * c + 0.4 * grey) for c in rng.uniform(0.0, 1.0, 3))
        layer = np.zeros((height, width, 3), np.float32)
        cx, cy = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        if rng.uniform() < 0.5:
            axes = tuple(max(1, int(rng.uniform(0.03, 0.25) * scale)) for _ in range(2))
            cv2.ellipse(layer, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
        else:
            w, h = int(rng.uniform(0.05, 0.4) * width), int(rng.uniform(0.05, 0.4) * height)
            cv2.rectangle(layer, (cx, cy), (cx + w, cy + h), colour, -1, cv2.LINE_AA)
        mask = (layer.max(axis=2, keepdims=True) > 0).astype(np.float32)
        sigma = float(rng.uniform(0.0, 1.5))
        if sigma > 0.3:
            mask = cv2.GaussianBlur(mask, (0, 0), sigma).reshape(height, width, 1)
            layer = cv2.GaussianBlur(layer, (0, 0), sigma)
        shade = 1.0 + 0.15 * _smooth_field(rng, height, width, 1, 3)
        img = img * (1.0 - mask) + layer * shade * mask
    grain = rng.standard_normal((height, width, 3)).astype(np.float32) * 0.02
    img += grain * (0.5 + np.abs(_smooth_field(rng, height, width, 1, 2)))
    return np.clip(img, 0.0, 1.0)


def natural_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` deterministic photo-like images (N, 3, H, W) float32 in [0, 1], each a scene seen
    through glass: a second, blurred scene added as a reflection."""
    if count < 1 or height < 1 or width < 1:
        raise InputError(f"natural_images needs positive count and size, got {count}, {height}x{width}")
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, height, width), np.float32)
    for i in range(count):
        background = _scene(rng, height, width)
        reflection = cv2.GaussianBlur(_scene(rng, height, width), (0, 0), float(rng.uniform(0.5, 3.0)))
        weight = float(rng.uniform(0.1, 0.35))
        out[i] = np.clip(background * (1.0 - 0.5 * weight) + weight * reflection, 0.0, 1.0).transpose(2, 0, 1)
    return out


# --- network inputs along a method's sequence -----------------------------------------------------

def network_feeds(backend: Any, images: np.ndarray) -> Dict[str, Dict[str, np.ndarray]]:
    """Each network's input feed for ``images`` (N, 3, H, W), recorded from the method's own sequence.

    Every image runs through :meth:`Method.run <dereflect.methods.base.Method.run>` on ``backend``'s
    host executor (so RM2S stage 2 gets the inputs the runtime's middle step makes from stage 1's
    outputs); what each network was given is stacked over the images.
    """
    from dereflect.backends.base import HostExecutor

    recorded: Dict[str, List[np.ndarray]] = {}

    class Recording(HostExecutor):
        def network(self, name: str, x: np.ndarray) -> Dict[str, np.ndarray]:
            recorded.setdefault(name, []).append(x)
            return super().network(name, x)

    executor = Recording(backend.manifest, backend.runners)
    settings = backend.method.settings(backend.manifest.settings)
    for image in images:
        executor.run(backend.method, np.ascontiguousarray(image.transpose(1, 2, 0)), settings)
    return {name: {backend.manifest.networks[name].inputs[0].name: np.concatenate(feeds)}
            for name, feeds in recorded.items()}


def ort_backend(manifest: Manifest, fp16: bool = False) -> Any:
    """The export's ONNX files on ONNX Runtime (CPU), FP32 or FP16."""
    from dereflect.backends.base import open_backend
    from dereflect.methods.base import get_method

    return open_backend(manifest, get_method(manifest.method), "onnxruntime", device="cpu",
                        precision="fp16" if fp16 else "fp32")


def golden_images() -> List[np.ndarray]:
    """The golden cases' images (one array per case)."""
    return [natural_images(n, h, w, seed=100 + i) for i, (n, h, w) in enumerate(GOLDEN_SHAPES)]


def _case_key(case: int, kind: str, name: str) -> str:
    return f"case{case}.{kind}.{name}"


def write_goldens(manifest: Manifest) -> Dict[str, Dict[str, str]]:
    """Write ``golden/<network>.npz`` (inputs and FP32 ONNX Runtime outputs) into the export directory.

    Returns ``{network: {"file": ..., "sha256": ...}}`` for the manifest.
    """
    backend = ort_backend(manifest)
    cases: Dict[str, Dict[str, np.ndarray]] = {name: {} for name in manifest.networks}
    try:
        for case, images in enumerate(golden_images()):
            for network, feed in network_feeds(backend, images).items():
                for name, value in feed.items():
                    cases[network][_case_key(case, "in", name)] = value
                for name, value in backend.runners[network].infer(feed).items():
                    cases[network][_case_key(case, "out", name)] = value
    finally:
        backend.close()
    (manifest.directory / GOLDEN_DIR).mkdir(exist_ok=True)
    record = {}
    for network, arrays in cases.items():
        relative = f"{GOLDEN_DIR}/{network}.npz"
        np.savez_compressed(manifest.directory / relative, **arrays)
        record[network] = {"file": relative, "sha256": sha256_file(manifest.directory / relative)}
    return record


Case = Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]


def load_goldens(manifest: Manifest, network: str) -> List[Case]:
    """The golden (inputs, outputs) cases of ``network``, after checking the file's hash."""
    path, expected = manifest.golden_path(network)
    if not path.is_file():
        raise ModelError(f"golden file missing: {path}")
    if sha256_file(path) != expected:
        raise ModelError(f"{path} does not match the SHA-256 in the manifest; it was changed after export")
    cases: Dict[int, Case] = {}
    with np.load(path) as data:
        for key in data.files:
            case, kind, name = key.split(".", 2)
            index = int(case[len("case"):])
            inputs, outputs = cases.setdefault(index, ({}, {}))
            (inputs if kind == "in" else outputs)[name] = data[key]
    return [cases[i] for i in sorted(cases)]


# --- comparison -----------------------------------------------------------------------------------

def output_ranges(spec: NetworkSpec) -> Dict[str, float]:
    """Each output's data range, what PSNR and errors are relative to: the width of its value range (1 where
    the range is empty). Export (parity, FP16) and verify measure with it alike."""
    ranges = {}
    for output in spec.outputs:
        low, high = output.value_range
        span = float(high) - float(low)
        ranges[output.name] = span if span > 0 else 1.0
    return ranges


@dataclass
class VerifyRow:
    network: str
    case: str
    shape: Tuple[int, ...]
    output: str
    psnr_db: float
    max_error: float
    passed: bool
    note: str = ""


@dataclass
class VerifyReport:
    """Per network, case and output: PSNR, largest error (fraction of the value range), pass/fail.

    ``limit_source`` says where the pass limit came from (the precision's default or ``--min-psnr``);
    ``notes`` what the reader must know to read the result (e.g. a reference computed here);
    ``unread`` the user's images that could not be read, each with why (they are not in the rows).
    """

    backend: str
    precision: str
    reference: str
    min_psnr_db: float
    max_error: Optional[float]
    rows: List[VerifyRow] = field(default_factory=list)
    limit_source: str = ""
    notes: List[str] = field(default_factory=list)
    unread: Dict[str, str] = field(default_factory=dict)

    @property
    def compared(self) -> List[VerifyRow]:
        """The rows that ran (not skipped)."""
        return [r for r in self.rows if not r.note]

    @property
    def passed(self) -> bool:
        ran = self.compared
        return bool(ran) and all(r.passed for r in ran)

    def worst(self) -> Dict[Tuple[str, str], VerifyRow]:
        """Per (network, output): the row with the lowest PSNR over the cases."""
        worst: Dict[Tuple[str, str], VerifyRow] = {}
        for row in self.compared:
            key = (row.network, row.output)
            if key not in worst or row.psnr_db < worst[key].psnr_db:
                worst[key] = row
        return worst

    def format(self) -> str:
        limit = f"PSNR >= {self.min_psnr_db:g} dB"
        if self.max_error is not None:
            limit += f", max error <= {self.max_error:g} of the range"
        if self.limit_source:
            limit += f"; {self.limit_source}"
        lines = [f"verify: {self.backend} {self.precision} against {self.reference}",
                 f"pass limit: {limit}",
                 f"{'network':<10} {'case':<24} {'input shape':<18} {'output':<12} {'PSNR dB':>9} "
                 f"{'max err':>10}  result"]
        for r in self.rows:
            if r.note:
                lines.append(f"{r.network:<10} {r.case:<24} {str(list(r.shape)):<18} {r.output:<12} "
                             f"{'':>9} {'':>10}  skipped: {r.note}")
                continue
            lines.append(f"{r.network:<10} {r.case:<24} {str(list(r.shape)):<18} {r.output:<12} "
                         f"{r.psnr_db:>9.2f} {r.max_error:>10.2e}  {'pass' if r.passed else 'FAIL'}")
        for (network, output), row in self.worst().items():
            lines.append(f"worst {network}/{output}: {row.psnr_db:.2f} dB ({row.case})")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.unread:
            from dereflect.imageio import some_names

            lines.append(f"not read: {len(self.unread)} image(s) ({some_names(list(self.unread), 3)}), left out "
                         "of the comparison")
        if not self.compared:
            lines.append("result: nothing compared")
        else:
            # With images left out the PASS is of the rest only, and the command exits 1: said on the line.
            scope = f" (of what was read; {len(self.unread)} image(s) not read)" if self.unread else ""
            lines.append("result: " + ("PASS" if self.passed else "FAIL") + scope)
        return "\n".join(lines)


def _image_cases(directory: Any, max_hw: Optional[Tuple[int, int]],
                 unread: Dict[str, str]) -> List[Tuple[str, np.ndarray]]:
    """The user's images (sorted), each at the size ``remove`` runs the networks at for a limit of ``max_hw``
    (:func:`dereflect.remover.scaled_to_fit`, the runtime's own rule): (name, 1x3xHxW).

    An image that cannot be read is left out and put in ``unread`` (its path: why), as ``remove`` skips
    one: a bad file among many should not leave the rest unverified.
    """
    from dereflect.imageio import is_image_file, one_line_error, read_image
    from dereflect.remover import scaled_to_fit

    folder = Path(directory)
    if not folder.is_dir():
        raise InputError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise InputError(f"--images {folder}: no images in it")
    cases = []
    for path in files:
        try:
            rgb, _ = read_image(path)
        except (DereflectError, MemoryError) as exc:
            unread[str(path)] = one_line_error(exc, path)
            continue
        rgb = scaled_to_fit(rgb, max_hw)
        cases.append((path.name, np.ascontiguousarray(rgb.transpose(2, 0, 1)[None])))
    return cases


def _no_goldens_note(source: Any) -> str:
    """What is missing when an export lists no goldens, and how to get them."""
    from dereflect import __version__

    if source.bundled:
        what = (f"the bundled {source.bundled} of dereflect {__version__} ships without golden files (nothing is "
                "wrong with this installation)")
    else:
        what = f"{source.path} lists no golden files (exported with --no-golden)"
    return (f"{what}; the reference was computed here instead. Goldens made once and kept with the model come "
            f"with 'dereflect export engine {source.bundled or source.path} -o DIR' (written into the copy) or "
            "'dereflect export onnx CHECKPOINT -o DIR'")


def verify(
    model: Any,
    backend: str = "onnxruntime",
    fp16: bool = False,
    networks: Optional[Sequence[str]] = None,
    images: Optional[Any] = None,
    max_side: Union[int, None, str] = "model",
    min_psnr_db: Optional[float] = None,
) -> VerifyReport:
    """Run an export's networks on ``backend`` and compare them with ONNX Runtime's FP32 results.

    ``model``: a bundled model's name or an export directory. Without ``images`` the cases are the
    export's goldens (inputs and FP32 outputs written at export); an export that lists none (made
    with ``--no-golden``, or a bundled model shipped without them) is compared on the same generated
    images with ONNX Runtime FP32 run here, and the report's notes say so. With ``images`` (a folder) each
    image is scaled to fit ``max_side`` as ``remove`` scales it (default "model": the side the model's
    manifest records, else :data:`~dereflect.manifest.DEFAULT_MAX_SIDE`; None or 0: full size; never more
    than the engines' profile), run through the method's sequence with ONNX Runtime FP32 to get every
    network's input, and each network's outputs on ``backend`` are compared with ONNX Runtime's on the
    same inputs. ``backend="onnxruntime"`` tests the FP32
    files (or the FP16 files with ``fp16=True``); ``"tensorrt"`` the engines built on this device,
    opened by the runtime's own checks. ``min_psnr_db`` replaces the precision's pass limit.
    An image that cannot be read is skipped and named in ``report.unread``.
    Raises ModelError for a missing/tampered file or an incompatible engine.
    """
    from dereflect.backends.base import open_backend
    from dereflect.models import open_source
    from dereflect.remover import model_max_side, network_max_hw
    from dereflect.tools.compare import compare_outputs

    source = open_source(model)
    if source.kind != "export":
        raise InputError(f"{source.path} is a training checkpoint; verify checks an export directory "
                         "(dereflect export onnx CHECKPOINT -o DIR)")
    manifest = source.manifest
    side = model_max_side(max_side, manifest)
    names = list(networks or manifest.networks)
    unknown = [n for n in names if n not in manifest.networks]
    if unknown:
        raise InputError(f"unknown network(s) {unknown}; this export has {list(manifest.networks)}")
    if backend not in ("onnxruntime", "tensorrt"):
        raise InputError(f"backend must be 'onnxruntime' or 'tensorrt', not {backend!r}")
    if fp16 and backend != "onnxruntime":
        raise InputError("--fp16 selects the FP16 ONNX files for onnxruntime; TensorRT engines carry their "
                         "own precision")
    tested = open_backend(manifest, source.method, backend, device="cpu" if backend == "onnxruntime" else "auto",
                          **({"precision": "fp16" if fp16 else "fp32"} if backend == "onnxruntime" else {}))
    reference = None
    try:
        if backend == "onnxruntime":
            precision = "fp16" if fp16 else "fp32"
            profiles: Dict[str, Dict[str, Dict[str, List[int]]]] = {}
        else:
            precision = engines_precision(tested.engine_info[n] for n in names)
            profiles = {n: tested.engine_info[n].profiles for n in names}
        min_psnr, max_error = THRESHOLDS[(backend, precision)]
        limit_source = f"the default for {backend} {precision}"
        if min_psnr_db is not None:
            min_psnr, max_error = float(min_psnr_db), None
            limit_source = "given with --min-psnr"
        notes: List[str] = []
        unread: Dict[str, str] = {}
        if images is None and manifest.records.get("golden"):
            cases_by_network = {name: [(f"golden {i}", inputs, expected)
                                       for i, (inputs, expected) in enumerate(load_goldens(manifest, name))]
                                for name in names}
            reference_text = "the FP32 ONNX Runtime goldens"
        else:
            reference = ort_backend(manifest)
            if images is None:
                # No goldens to compare with: the same generated images, with the reference computed here.
                labelled = [(f"generated {i}", batch) for i, batch in enumerate(golden_images())]
                reference_text = "ONNX Runtime FP32 run here on the golden cases' generated images"
                notes.append(_no_goldens_note(source))
            else:
                _, engine_max = tested.input_limits()
                labelled = _image_cases(images, network_max_hw(side, engine_max), unread)
                reference_text = f"ONNX Runtime FP32 on the images in {images}"
            if backend == "onnxruntime" and precision == "fp32":
                notes.append("ONNX Runtime FP32 compared with itself checks that the files load and run, not "
                             "their accuracy: use --fp16, or --backend tensorrt on the device")
            cases_by_network = {name: [] for name in names}
            for label, batch in labelled:
                feeds = network_feeds(reference, batch)
                for name in names:
                    expected = reference.runners[name].infer(feeds[name])
                    cases_by_network[name].append((label, feeds[name], expected))
        report = VerifyReport(backend=backend, precision=precision, reference=reference_text,
                              min_psnr_db=min_psnr, max_error=max_error, limit_source=limit_source, notes=notes,
                              unread=unread)
        for name in names:
            spec = manifest.networks[name]
            ranges = output_ranges(spec)
            for label, inputs, expected in cases_by_network[name]:
                shape = tuple(next(iter(inputs.values())).shape)
                profile = profiles.get(name, {})
                outside = [n for n, v in inputs.items()
                           if n in profile and not shape_in_profile(v.shape, profile[n])]
                if outside:
                    report.rows.append(VerifyRow(name, label, shape, "-", 0.0, 0.0, False,
                                                 note="input shape outside the engine's profile"))
                    continue
                actual = tested.runners[name].infer(inputs)
                for output, diff in compare_outputs(expected, actual, ranges).items():
                    ok = diff.psnr_db >= min_psnr and (max_error is None or diff.max_error <= max_error)
                    report.rows.append(VerifyRow(name, label, shape, output, diff.psnr_db, diff.max_error, bool(ok)))
    finally:
        tested.close()
        if reference is not None:
            reference.close()
    return report
