"""``dereflect export engine``: TensorRT engines from an export directory, built on the target device.

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
GPU, compute capability, profile, precision and the hash of the ONNX file used.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from dereflect.errors import ModelError, require
from dereflect.manifest import load_manifest, sha256_file
from dereflect.trt_api import (
    EngineInfo,
    derive_profile,
    engine_paths,
    fp16_flag_available,
    gpu_info,
    needs_explicit_batch_flag,
    trt_version_tuple,
    use_strong_typing,
    write_engine_info,
)

log = logging.getLogger("dereflect.export")


def default_timing_cache(trt_version: str, gpu_name: str) -> Path:
    """``$XDG_CACHE_HOME/dereflect/timing-<trt>-<gpu>.cache``: kept across exports on one device."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{trt_version}-{gpu_name}").strip("-")
    return base / "dereflect" / f"timing-{tag}.cache"


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(memoryview(data))
    os.replace(tmp, path)


def _network_flags(trt: Any, ver, strong: bool) -> int:
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


def build_engines(
    export_dir: os.PathLike,
    fp16: bool = True,
    min_shape: Optional[str] = None,
    opt_shape: Optional[str] = None,
    max_shape: Optional[str] = None,
    timing_cache: Optional[os.PathLike] = None,
    workspace: Optional[int] = None,
    networks: Optional[Sequence[str]] = None,
) -> Dict[str, EngineInfo]:
    """Build ``<network>.engine`` and its sidecar for each network of an export directory.

    ``min_shape``/``opt_shape``/``max_shape``: "NxCxHxW", "HxW" or a name such as "720p"
    (see :func:`dereflect.trt_api.parse_shape`). ``workspace``: bytes for the builder's
    workspace pool (TensorRT's default when None). Returns the sidecars written.
    """
    trt = require("tensorrt", "trt", "building TensorRT engines")
    ver = trt_version_tuple(trt)
    manifest = load_manifest(Path(export_dir))
    names: List[str] = list(networks or manifest.networks)
    unknown = [n for n in names if n not in manifest.networks]
    if unknown:
        raise ModelError(f"unknown network(s) {unknown}; this export has {list(manifest.networks)}")
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
        for name in names:
            spec = manifest.networks[name]
            use_fp16_file = fp16 and strong
            if use_fp16_file and not spec.onnx_fp16:
                raise ModelError(
                    f"TensorRT {trt.__version__} builds strongly typed networks, so an FP16 engine needs "
                    f"the FP16 ONNX file, which {manifest.directory} lacks for {name!r}; "
                    "re-export without --no-fp16"
                )
            onnx_path = manifest.path_of(name, fp16=use_fp16_file)
            network = builder.create_network(_network_flags(trt, ver, strong))
            parser = _parse(trt, network, logger, onnx_path)
            config = builder.create_builder_config()
            if workspace:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
            pinned = 0
            if fp16 and not strong:
                config.set_flag(trt.BuilderFlag.FP16)
                plan = ((manifest.records.get("fp16") or {}).get("networks") or {}).get(name) or {}
                pinned = _constrain_float32(trt, network, plan.get("float32_nodes") or [])
                if pinned:
                    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            channels = {t.name: t.channels for t in spec.inputs}
            profile = builder.create_optimization_profile()
            profiles: Dict[str, Dict[str, List[int]]] = {}
            for index in range(network.num_inputs):
                tensor = network.get_input(index)
                if tensor.name not in channels:
                    raise ModelError(f"{onnx_path.name}: input {tensor.name!r} is not in the manifest")
                shapes = derive_profile(channels[tensor.name], min_shape, opt_shape, max_shape)
                profile.set_shape(tensor.name, shapes["min"], shapes["opt"], shapes["max"])
                profiles[tensor.name] = shapes
            config.add_optimization_profile(profile)
            cache.attach(config)
            log.info("building %s from %s (TensorRT %s, %s)", name, onnx_path.name, trt.__version__,
                     "fp16" if fp16 else "fp32")
            serialized = builder.build_serialized_network(network, config)
            # The parser owns the weights the network points to: it must live until the build is done.
            del parser
            if serialized is None:
                raise ModelError(f"TensorRT could not build an engine for {name!r}; see its log above")
            engine_path, sidecar_path = engine_paths(manifest.directory, name)
            _write_atomic(engine_path, serialized)
            info = EngineInfo(
                network=name, engine=engine_path.name, onnx=onnx_path.name,
                onnx_sha256=spec.sha256_fp16 if use_fp16_file else spec.sha256,
                tensorrt_version=str(trt.__version__), gpu_name=gpu_name, compute_capability=capability,
                precision="fp16" if fp16 else "fp32", profiles=profiles, strongly_typed=strong,
                float32_layers=pinned, engine_sha256=sha256_file(engine_path),
            )
            write_engine_info(info, sidecar_path)
            built[name] = info
    finally:
        cache.save()
    return built
