"""``dereflect export engine``: TensorRT engines from any model, built on the target device.

Everything that needs no TensorRT is checked first, before anything is written
(:func:`plan_engine_dir`): the model reference, the networks named, the profile shapes, the
workspace and the output folder. The engines go into a folder of the user's
(:func:`plan_engine_dir`, then :meth:`EngineDirPlan.prepare`): it becomes a
self-contained export directory (the manifest, the ONNX and FP16 ONNX files and the goldens
it lists, copied; goldens written there when the model has none), so ``export verify DIR
--backend tensorrt`` and ``Remover.load(DIR, backend="tensorrt")`` work on it. Nothing is
ever written into the installed package (the bundled models live there).

One engine per network, with the API the installed TensorRT needs (see
:mod:`dereflect.trt_api` for the version facts):

* 8.x: the network is created with ``EXPLICIT_BATCH``; FP16 is ``BuilderFlag.FP16`` on the
  FP32 ONNX file;
* 10.x: no creation flag; FP16 is ``BuilderFlag.FP16`` on the FP32 ONNX file;
* with the FP16 flag, the layers of the ONNX nodes the FP16 export kept in float32 (listed in
  the manifest: overflow-prone or output layers) are constrained to float32
  (``OBEY_PRECISION_CONSTRAINTS``), so 8.x/10.x engines follow the same precision plan;
* 11.x: ``STRONGLY_TYPED`` networks: FP16 comes from the FP16 ONNX file (float32 kept
  where the export decided), FP32 from the FP32 file.

Each build has one optimisation profile (``--min/--opt/--max``, the same H x W range for
every network), a persistent timing cache shared by all builds (faster rebuilds on the same
device), ``build_serialized_network``, and a sidecar JSON recording the TensorRT version,
GPU, compute capability, profile, precision and the hash of the ONNX file used. A build takes
minutes on a Jetson: TensorRT 10 and later report its phases (``IProgressMonitor``), shown as
progress bars; every version logs each network's start and how long it took. Ctrl+C or SIGTERM
(``stop``) cancels the build in progress where TensorRT reports progress (10 and later), else
lets it finish; the engines built before are kept.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dereflect.cache import cache_dir
from dereflect.errors import InputError, ModelError, require
from dereflect.imageio import check_output_location, is_free_folder, staged_file, staged_folder
from dereflect.manifest import MANIFEST_NAME, Manifest, inside, is_int, load_manifest, sha256_file
from dereflect.remover import fit_size
from dereflect.stop_signals import StopSignals
from dereflect.trt_api import (
    DEFAULT_PROFILE,
    NAMED_SIZES,
    EngineInfo,
    Version,
    derive_profile,
    engine_paths,
    fp16_flag_available,
    gpu_info,
    jetson_model,
    needs_explicit_batch_flag,
    parse_shape,
    trt_version_tuple,
    use_strong_typing,
    write_engine_info,
)

log = logging.getLogger("dereflect.export")


def default_timing_cache(trt_version: str, gpu_name: str) -> Path:
    """``timing-<trt>-<gpu>.cache`` in the cache folder the training weights use too
    (:func:`dereflect.cache.cache_dir`): kept across exports on one device."""
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{trt_version}-{gpu_name}").strip("-")
    return cache_dir() / f"timing-{tag}.cache"


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or a MissingDependencyError with the install line (Jetson's included)."""
    return require("tensorrt", "trt", "building TensorRT engines")


# --- the folder the engines go to ----------------------------------------------------------------

def package_dirs() -> List[Path]:
    """Folders engines must never be written to: the installed package and its bundled models."""
    import dereflect
    from dereflect.models import BUNDLED_MODELS_DIR

    return [Path(dereflect.__file__).resolve().parent, BUNDLED_MODELS_DIR.resolve()]


def default_engine_dir(name: str) -> Path:
    """``./<name>-engines`` in the current directory."""
    return Path.cwd() / (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") + "-engines")


def _refuse_package_dir(target: Path) -> None:
    resolved = target.resolve()
    for package in package_dirs():
        if resolved == package or package in resolved.parents:
            raise ModelError(
                f"{target} is inside the installed dereflect package ({package}); engines are built for one "
                "device and go to a folder of yours: pass -o DIR (default ./<model>-engines, run from another "
                "directory)"
            )


def _listed_files(manifest: Manifest) -> List[str]:
    """The files an export directory's manifest names: ONNX, FP16 ONNX and golden files (not engines)."""
    files = []
    for spec in manifest.networks.values():
        files += [spec.onnx] + ([spec.onnx_fp16] if spec.onnx_fp16 else [])
    files += [entry["file"] for entry in (manifest.records.get("golden") or {}).values()]
    return files


def _same_export(a: Manifest, b: Manifest) -> bool:
    return a.method == b.method and {n: s.sha256 for n, s in a.networks.items()} == \
        {n: s.sha256 for n, s in b.networks.items()}


def _copy_export(manifest: Manifest, target: Path) -> None:
    """Copy the manifest and the files it lists into the new folder ``target``, checking their hashes."""
    manifest.verify_files(fp16=True)
    goldens = {entry["file"]: entry["sha256"] for entry in (manifest.records.get("golden") or {}).values()}
    with staged_folder(target) as tmp:
        for relative in _listed_files(manifest):
            source = inside(manifest.directory, relative, relative)
            if relative in goldens and (not source.is_file() or sha256_file(source) != goldens[relative]):
                raise ModelError(f"{source} is missing or does not match the SHA-256 in the manifest")
            destination = tmp / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
        shutil.copyfile(manifest.directory / MANIFEST_NAME, tmp / MANIFEST_NAME)
        copied = load_manifest(tmp)
        if not copied.records.get("golden"):
            _write_missing_goldens(copied)


def _write_missing_goldens(manifest: Manifest) -> None:
    """Goldens for a model that came without them (ONNX Runtime FP32, here), so the folder can be verified."""
    from .verify import write_goldens

    log.info("%s lists no golden files: writing them with ONNX Runtime FP32 on this machine", manifest.name)
    manifest.records["golden"] = write_goldens(manifest)
    manifest.save()


#: network -> input name -> {"min": [N, C, H, W], "opt": ..., "max": ...}
Profiles = Dict[str, Dict[str, Dict[str, List[int]]]]


def engine_profiles(manifest: Manifest, networks: Optional[Sequence[str]] = None, min_shape: Optional[str] = None,
                    opt_shape: Optional[str] = None, max_shape: Optional[str] = None) -> Profiles:
    """The optimisation profile of every input of each network to build (``networks``, default all), from the
    manifest alone: InputError for a network the export lacks or a shape the runtime could never use
    (:func:`dereflect.trt_api.derive_profile`). Needs no TensorRT."""
    names = list(dict.fromkeys(networks or manifest.networks))
    unknown = [n for n in names if n not in manifest.networks]
    if unknown:
        raise InputError(f"unknown network(s) {unknown}; this export has {list(manifest.networks)}")
    model_channels = sorted({t.channels for spec in manifest.networks.values() for t in spec.inputs})
    opt_shape, max_shape = _complete_profile(manifest, min_shape, opt_shape, max_shape, model_channels)
    return {name: {t.name: derive_profile(t.channels, min_shape, opt_shape, max_shape, model_channels)
                   for t in manifest.networks[name].inputs}
            for name in names}


def model_profile(manifest: Manifest, min_shape: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """The ``opt`` and ``max`` shapes that fit what the runtime feeds this model's networks: a model that
    records the side its networks run at (``max_side``: 224 for the bundled ones) never sees more than
    that square, and a 720p frame reaches them scaled to fit it (and padded up to the profile's ``min``,
    as the runtime pads a frame below it). (None, None), the 720p / 1080p defaults, for a model without."""
    if not manifest.max_side:
        return None, None
    _, _, min_h, min_w = parse_shape(min_shape or DEFAULT_PROFILE["min"], 3)
    side = manifest.max_side
    height, width, _ = fit_size(*NAMED_SIZES["720p"], (side, side))
    return (f"{max(height, min_h)}x{max(width, min_w)}",
            f"{max(side, min_h)}x{max(side, min_w)}")


def _complete_profile(manifest: Manifest, min_shape: Optional[str], opt_shape: Optional[str],
                      max_shape: Optional[str], model_channels: Sequence[int]) -> Tuple[Optional[str], Optional[str]]:
    """``opt`` and ``max`` with the model's own (:func:`model_profile`) in place of a bound not given: its
    ``opt`` under a ``--max`` given by hand where it fits there (else that ``max``), its ``max`` above an
    ``--opt`` given by hand (widened to hold it)."""
    model_opt, model_max = model_profile(manifest, min_shape)
    if model_max is None or (opt_shape is not None and max_shape is not None):
        return opt_shape, max_shape

    def hw(text: str) -> Tuple[int, int]:
        _, _, height, width = parse_shape(text, 3, model_channels)
        return height, width

    if opt_shape is None and max_shape is None:
        return model_opt, model_max
    if opt_shape is None:
        fits = all(a <= b for a, b in zip(hw(model_opt), hw(max_shape)))
        return (model_opt if fits else max_shape), max_shape
    (opt_h, opt_w), (max_h, max_w) = hw(opt_shape), hw(model_max)
    return opt_shape, f"{max(opt_h, max_h)}x{max(opt_w, max_w)}"


def check_workspace(workspace: Optional[int]) -> Optional[int]:
    """The builder's workspace limit in bytes, or None for TensorRT's default (which lets the builder use up
    to the GPU's memory); 0 means the default too. InputError for anything else than a whole number >= 0."""
    if workspace is None:
        return None
    whole = is_int(workspace)
    if not whole or workspace < 0:
        size = repr(workspace) if not whole else f"{workspace} bytes" + (
            f" ({workspace // 2**20} MiB)" if workspace % 2**20 == 0 else "")
        raise InputError(f"the builder workspace must be 0 (TensorRT's default: up to the GPU's memory) or a "
                         f"positive size, got {size}")
    return workspace or None


@dataclass
class EngineDirPlan:
    """The folder the engines of a model go to, checked with the build options and with nothing written yet
    (:func:`plan_engine_dir`); :meth:`prepare` makes it."""

    source: Any
    directory: Path
    #: the export already in ``directory`` (reused; or the model's own, to build in place); None: copy it there
    existing: Optional[Manifest]

    def prepare(self) -> Manifest:
        """The export directory to build in: the existing one, else a copy of the model (see the module docstring)."""
        if self.existing is not None:
            if self.existing is not self.source.manifest and not self.existing.records.get("golden"):
                _write_missing_goldens(self.existing)
            return self.existing
        _copy_export(self.source.manifest, self.directory)
        log.info("copied %s (%s) to %s", self.source.manifest.name, self.source.path, self.directory)
        return load_manifest(self.directory)


def plan_engine_dir(model: Any, out: Optional[os.PathLike] = None, networks: Optional[Sequence[str]] = None,
                    min_shape: Optional[str] = None, opt_shape: Optional[str] = None,
                    max_shape: Optional[str] = None, workspace: Optional[int] = None) -> EngineDirPlan:
    """Check, without TensorRT and writing nothing, what ``export engine`` is asked: the model, the networks, the
    shapes and workspace (:func:`engine_profiles`, :func:`check_workspace`) and the folder ``out``
    (default ``./<name>-engines``).

    ``model`` is any model reference (a bundled name, an export directory). A new (or empty) ``out`` is
    to receive a copy of the export (see the module docstring); an ``out`` that already holds this
    export is reused (engines are rebuilt there), and the export directory itself may be named to
    build in place. Refuses (ModelError) a folder inside the installed package, one holding
    something else, and a training checkpoint.
    """
    from dereflect.models import open_source

    source = open_source(model)
    if source.kind != "export":
        raise ModelError(f"{source.path} is a training checkpoint; export it first "
                         "(dereflect export onnx CHECKPOINT -o DIR), then build engines from DIR")
    engine_profiles(source.manifest, networks, min_shape, opt_shape, max_shape)
    check_workspace(workspace)
    target = Path(out) if out else default_engine_dir(source.bundled or source.manifest.name)
    _refuse_package_dir(target)
    if target.exists() and target.resolve() == source.path.resolve():
        return EngineDirPlan(source, target, source.manifest)
    if (target / MANIFEST_NAME).is_file():
        existing = load_manifest(target)
        if not _same_export(existing, source.manifest):
            raise ModelError(f"{target} holds another export ({existing.name}); choose another -o DIR")
        return EngineDirPlan(source, target, existing)
    if not is_free_folder(target):
        raise ModelError(f"{target} exists and is not an export of {source.manifest.name}; choose a new or empty "
                         "folder with -o DIR")
    check_output_location(target, folder=True)
    return EngineDirPlan(source, target, None)


def _write_atomic(path: Path, data: Any) -> None:
    with staged_file(path) as staged, open(staged, "wb") as handle:
        handle.write(memoryview(data))


def _network_flags(trt: Any, ver: Version, strong: bool) -> int:
    flags = 0
    if needs_explicit_batch_flag(ver):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    # A release where strong typing is the only mode may drop the flag; then there is nothing to set.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strong and strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    return flags


def _parse(trt: Any, network: Any, logger: Any, path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        details = "\n  ".join(errors or ["(no details)"])
        raise ModelError(
            f"TensorRT {trt.__version__} cannot parse {path.name}:\n  {details}\n"
            "Run 'dereflect export check DIR' for the static compatibility report"
        )
    return parser


def _constrain_float32(trt: Any, network: Any, node_names: Sequence[str]) -> int:
    """Pin the layers made from ``node_names`` to float32; returns how many layers were pinned.

    The ONNX parser names each layer after its node, with ``_N`` appended to make names unique.
    Only layers whose outputs are floating point are touched (never shape arithmetic).
    """
    if not node_names:
        return 0
    pattern = re.compile("(?:" + "|".join(re.escape(n) for n in node_names) + r")(?:_\d+)?")
    floats = (trt.float32, trt.float16)
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not pattern.fullmatch(layer.name) or not outputs or any(t.dtype not in floats for t in outputs):
            continue
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
        pinned += 1
    return pinned


class _TimingCache:
    """One timing cache shared by every build of a run, loaded from and saved to ``path``."""

    def __init__(self, path: Path):
        self.path = path
        self.cache: Any = None

    def attach(self, config: Any) -> None:
        if self.cache is None:
            data = self.path.read_bytes() if self.path.is_file() else b""
            self.cache = config.create_timing_cache(data)
            if self.cache is None or not config.set_timing_cache(self.cache, False):
                if data:
                    log.warning("timing cache %s was made on another device or TensorRT; starting a new one",
                                self.path)
                self.cache = config.create_timing_cache(b"")
                config.set_timing_cache(self.cache, False)
            return
        config.set_timing_cache(self.cache, False)

    def save(self) -> None:
        if self.cache is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, self.cache.serialize())


def build_progress(trt: Any, network: str, show: bool = True, stop: Optional[StopSignals] = None) -> Optional[Any]:
    """A ``trt.IProgressMonitor`` that draws the builder's phases of ``network`` as progress bars on
    stderr (nested phases below their parent; ``show``) and cancels the build once ``stop`` has
    received a signal; None where TensorRT has no such interface (8.x)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None
    from tqdm import tqdm

    class BuildProgress(base):
        def __init__(self) -> None:
            base.__init__(self)
            # TensorRT may report from several of its threads.
            self._lock = threading.Lock()
            self._bars: Dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            with self._lock:
                depth = len(self._bars)
                self._bars[phase_name] = tqdm(total=num_steps, desc=f"{network}: {phase_name}", unit="step",
                                              position=depth, leave=depth == 0, file=sys.stderr, disable=not show)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return stop is None or stop.received is None  # False cancels the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return BuildProgress()


def build_engines(
    export_dir: os.PathLike,
    fp16: bool = True,
    min_shape: Optional[str] = None,
    opt_shape: Optional[str] = None,
    max_shape: Optional[str] = None,
    timing_cache: Optional[os.PathLike] = None,
    workspace: Optional[int] = None,
    networks: Optional[Sequence[str]] = None,
    progress: bool = True,
    stop: Optional[StopSignals] = None,
) -> Dict[str, EngineInfo]:
    """Build ``<network>.engine`` and its sidecar for each network of an export directory.

    ``min_shape``/``opt_shape``/``max_shape``: "HxW", a name such as "720p" or "1xCxHxW"
    (see :func:`dereflect.trt_api.parse_shape`), checked with the network names before TensorRT is
    needed (:func:`engine_profiles`). ``workspace``: bytes for the builder's workspace pool
    (None or 0: TensorRT's default, up to the GPU's memory; :func:`check_workspace`). ``progress``: the
    builder's phases as progress bars on stderr where TensorRT reports them (:func:`build_progress`).
    ``stop``: a
    :class:`~dereflect.stop_signals.StopSignals` in force; once it has received a signal the build
    in progress is cancelled (TensorRT 10 and later; 8.x finishes it) and no further network is
    built. Returns the sidecars written: every network's, or those built before a stop.
    """
    manifest = load_manifest(Path(export_dir))
    profiles = engine_profiles(manifest, networks, min_shape, opt_shape, max_shape)
    workspace = check_workspace(workspace)
    trt = require_tensorrt()
    ver = trt_version_tuple(trt)
    strong = use_strong_typing(ver)
    if fp16 and strong:
        manifest.verify_files(fp16=True)
    if fp16 and not strong and not (fp16_flag_available(ver) and hasattr(trt.BuilderFlag, "FP16")):
        raise ModelError(f"TensorRT {trt.__version__} has no FP16 builder flag; this dereflect cannot build "
                         "FP16 engines with it")
    gpu_name, capability = gpu_info()
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, gpu_name)
    cache = _TimingCache(cache_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    built: Dict[str, EngineInfo] = {}
    try:
        for name in profiles:
            spec = manifest.networks[name]
            use_fp16_file = fp16 and strong
            if use_fp16_file and not spec.onnx_fp16:
                raise ModelError(
                    f"TensorRT {trt.__version__} builds strongly typed networks, so an FP16 engine needs "
                    f"the FP16 ONNX file, which {manifest.directory} lacks for {name!r} (an export made with "
                    "--no-fp16, or a bundled model shipped without FP16 files): build FP32 engines with --fp32, "
                    "or export the checkpoint again (dereflect export onnx writes FP16 files by default)"
                )
            onnx_path = manifest.path_of(name, fp16=use_fp16_file)
            network = builder.create_network(_network_flags(trt, ver, strong))
            parser = _parse(trt, network, logger, onnx_path)
            config = builder.create_builder_config()
            if workspace:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
            pinned = 0
            if fp16 and not strong:
                config.set_flag(trt.BuilderFlag.FP16)
                plan = ((manifest.records.get("fp16") or {}).get("networks") or {}).get(name) or {}
                pinned = _constrain_float32(trt, network, plan.get("float32_nodes") or [])
                if pinned:
                    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            profile = builder.create_optimization_profile()
            for index in range(network.num_inputs):
                tensor = network.get_input(index)
                if tensor.name not in profiles[name]:
                    raise ModelError(f"{onnx_path.name}: input {tensor.name!r} is not in the manifest")
                shapes = profiles[name][tensor.name]
                profile.set_shape(tensor.name, shapes["min"], shapes["opt"], shapes["max"])
            config.add_optimization_profile(profile)
            cache.attach(config)
            # TensorRT holds the monitor by reference: it must live until the build is done.
            monitor = build_progress(trt, name, show=progress, stop=stop) if progress or stop else None
            if monitor is not None:
                config.progress_monitor = monitor
            log.info("building %s from %s (TensorRT %s, %s)%s", name, onnx_path.name, trt.__version__,
                     "fp16" if fp16 else "fp32", "" if progress and monitor else ": this can take minutes")
            began = time.monotonic()
            serialized = builder.build_serialized_network(network, config)
            # The parser owns the weights the network points to: it must live until the build is done.
            del parser, monitor
            if serialized is None:
                if stop is not None and stop.received:
                    break  # cancelled by the monitor
                raise ModelError(f"TensorRT could not build an engine for {name!r}; see its log above")
            log.info("built %s in %.0f s", name, time.monotonic() - began)
            engine_path, sidecar_path = engine_paths(manifest.directory, name)
            _write_atomic(engine_path, serialized)
            info = EngineInfo(
                network=name, engine=engine_path.name, onnx=onnx_path.name,
                onnx_sha256=spec.sha256_fp16 if use_fp16_file else spec.sha256,
                tensorrt_version=str(trt.__version__), gpu_name=gpu_name, compute_capability=capability,
                precision="fp16" if fp16 else "fp32", profiles=profiles[name], strongly_typed=strong,
                float32_layers=pinned, engine_sha256=sha256_file(engine_path), board=jetson_model(),
            )
            write_engine_info(info, sidecar_path)
            built[name] = info
            if stop is not None and stop.received:
                break
    finally:
        cache.save()
    return built
