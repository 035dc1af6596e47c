"""TensorRT backend: serialized engines, pycuda for memory, streams and the fused middle-step kernel.

Engines live next to the ONNX files of an export directory as ``<network>.engine`` with a
sidecar ``<network>.engine.json`` (:mod:`dereflect.trt_api`); they are built on the target
device (``dereflect export engine DIR``) because an engine only loads in the TensorRT version
and on the GPU that built it. The sidecar is checked before deserialising, and
``deserialize_cuda_engine`` returning None is reported as a ModelError.

TensorRT >= 8.5 is required: I/O is name-based (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``), which 8.5 (JetPack 5), 10.x and 11.x share. Each thread gets its own
execution context, CUDA stream and pinned host buffers (TensorRT contexts must not be shared
between threads); every call pushes the device's primary CUDA context, so any thread may call.

RM2S on the device (:class:`TensorRTDeviceExecutor`): the method's own sequence
(:meth:`dereflect.methods.rm2s.RM2S.run`) with primitives that only enqueue: the frame is copied
in once, engine 1, the four passes of ``middle_step/confidence.cu`` (compiled with pycuda's
``SourceModule``, launched by :func:`dereflect.middle_step.cuda.launch_plan`) and engine 2 go on
one stream with no host synchronisation between them, and the result is copied out once. For a
repeated frame size that sequence is captured once in a CUDA graph and replayed
(``use_graph=True``); when capture fails it falls back to plain enqueueing, warns once and keeps
the reason (``graph_capture_error``, which ``dereflect bench`` reports). Since the primitives only
enqueue, its stages are timed with CUDA events on its stream (:class:`PycudaEventTimer`).

Every engine is opened by :func:`open_engine`, the one compatibility check the runtime and
``dereflect export verify`` share: sidecar present and readable, built by this TensorRT for
this GPU from this export's ONNX file, and the engine file unchanged since (its SHA-256).

This module cannot be exercised without TensorRT, pycuda and a GPU; its pure parts are tested
with fake modules, and the real tests skip elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from dereflect.backends.base import HW, Backend, BackendDescription, BackendOptions, Runner, require_backend_module
from dereflect.errors import InputError, ModelError
from dereflect.manifest import Manifest
from dereflect.methods.base import NULL_TIMER, EventTimer, Executor, Layers, MiddleStepOutput, Timer
from dereflect.methods.rm2s import RM2S, STAGE1, STAGE2
from dereflect.trt_api import MIN_TENSORRT, trt_version_tuple


@dataclass
class TensorIO:
    """One engine I/O tensor: name, direction and numpy dtype."""

    name: str
    is_input: bool
    dtype: np.dtype


def engine_io(engine: Any, trt: Any) -> List[TensorIO]:
    """The engine's I/O tensors via the name-based API of TensorRT >= 8.5."""
    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        tensors.append(TensorIO(name, is_input, np.dtype(trt.nptype(engine.get_tensor_dtype(name)))))
    return tensors


def profile_hw(engine: Any, names: Sequence[str], profile: int = 0) -> Tuple[Optional[HW], Optional[HW]]:
    """The (H, W) range every NCHW input of optimisation profile ``profile`` accepts: (smallest, largest)."""
    lows, highs = [], []
    for name in names:
        smallest, _, largest = engine.get_tensor_profile_shape(name, profile)
        smallest, largest = tuple(int(v) for v in smallest), tuple(int(v) for v in largest)
        if len(largest) == 4:
            lows.append((smallest[2], smallest[3]))
            highs.append((largest[2], largest[3]))
    if not highs:
        return None, None
    low = (max(h for h, _ in lows), max(w for _, w in lows))
    high = (min(h for h, _ in highs), min(w for _, w in highs))
    return low, high


def check_version(trt: Any) -> Tuple[int, int, int]:
    version = trt_version_tuple(trt)
    if version < MIN_TENSORRT:
        raise ModelError(
            f"TensorRT {trt.__version__} is too old: dereflect needs >= 8.5 "
            "(name-based I/O, execute_async_v3); JetPack 5 ships 8.5"
        )
    return version


def open_engine(manifest: Manifest, network: str, device: int = 0) -> Tuple[TensorRTRunner, Any]:
    """An activated runner for the engine of ``network`` and its sidecar, after every check.

    Refuses (ModelError, before deserialising) an engine that is missing, whose sidecar is
    missing or unreadable, that was built by another TensorRT version, for another GPU or from
    another ONNX file than this export lists, or whose bytes changed since it was built.
    """
    from dereflect.manifest import sha256_file
    from dereflect.trt_api import check_engine_compatible, engine_paths, gpu_info, jetson_model, read_engine_info

    trt = require_backend_module("tensorrt", "tensorrt")
    require_backend_module("pycuda.driver", "tensorrt", "CUDA memory and streams")
    check_version(trt)
    engine, sidecar = engine_paths(manifest.directory, network)
    if not engine.is_file():
        raise ModelError(
            f"{manifest.directory} has no TensorRT engine for network {network!r} ({engine.name}); "
            f"build it on this device with: dereflect export engine {manifest.directory} -o DIR"
        )
    info = read_engine_info(sidecar)
    spec = manifest.networks[network]
    hashes = {spec.onnx: spec.sha256}
    if spec.onnx_fp16:
        hashes[spec.onnx_fp16] = spec.sha256_fp16 or ""
    if info.onnx not in hashes:
        raise ModelError(f"engine {engine.name} was built from {info.onnx}, which this export does not list")
    gpu_name, capability = gpu_info()
    check_engine_compatible(info, str(trt.__version__), gpu_name, capability, hashes[info.onnx], jetson_model())
    if sha256_file(engine) != info.engine_sha256:
        raise ModelError(f"{engine} does not match the SHA-256 in its sidecar (changed after it was built); "
                         "rebuild it with: dereflect export engine")
    return TensorRTRunner(engine, device=device, name=network).activate(), info


def _grow(current: Optional[Tuple[Any, int]], nbytes: int, allocate: Any) -> Tuple[Any, int]:
    """Reuse ``current`` (allocation, capacity) when it is large enough, else allocate anew."""
    if current is not None and current[1] >= nbytes:
        return current
    return allocate(max(nbytes, 1)), nbytes


class _HostDevice:
    """A pinned host buffer and a device buffer of the same capacity, viewed at the current shape."""

    def __init__(self, cuda: Any) -> None:
        self._cuda = cuda
        self.host: Optional[Tuple[Any, int]] = None
        self.device: Optional[Tuple[Any, int]] = None
        self.shape: Tuple[int, ...] = ()
        self.dtype = np.dtype(np.float32)

    def fit(self, shape: Sequence[int], dtype: np.dtype) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.host = _grow(self.host, nbytes, lambda n: self._cuda.pagelocked_empty(n, np.uint8))
        self.device = _grow(self.device, nbytes, self._cuda.mem_alloc)

    @property
    def array(self) -> np.ndarray:
        """The pinned host memory as an array of the current shape and dtype (a view)."""
        count = int(np.prod(self.shape))
        return self.host[0][: count * self.dtype.itemsize].view(self.dtype).reshape(self.shape)

    @property
    def pointer(self) -> int:
        return int(self.device[0])


class TensorRTRunner(Runner):
    """One serialized engine; per-thread execution contexts, streams and pinned buffers."""

    def __init__(self, engine_path: Any, device: int = 0, name: Optional[str] = None) -> None:
        super().__init__()
        self.path = Path(engine_path)
        self.device_index = int(device)
        self.name = name or self.path.stem
        self.engine: Any = None
        self.min_input_hw: Optional[HW] = None
        self.max_input_hw: Optional[HW] = None
        self._trt: Any = None
        self._cuda: Any = None
        self._cuda_context: Any = None
        self._io: List[TensorIO] = []
        self._local = threading.local()
        self._states: List[Any] = []
        self._states_lock = threading.Lock()

    @property
    def input_names(self) -> List[str]:
        return [t.name for t in self._io if t.is_input]

    @property
    def output_names(self) -> List[str]:
        return [t.name for t in self._io if not t.is_input]

    def dtype_of(self, name: str) -> np.dtype:
        return next(t.dtype for t in self._io if t.name == name)

    @contextlib.contextmanager
    def pushed(self) -> Iterator[None]:
        """Make this runner's CUDA context current in the calling thread for the block."""
        self._cuda_context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _activate(self) -> None:
        self._trt = require_backend_module("tensorrt", "tensorrt")
        self._cuda = require_backend_module("pycuda.driver", "tensorrt", "CUDA memory and streams")
        check_version(self._trt)
        if not self.path.is_file():
            raise ModelError(f"TensorRT engine not found: {self.path}")
        self._cuda.init()
        self._cuda_context = self._cuda.Device(self.device_index).retain_primary_context()
        with self.pushed():
            self._logger = self._trt.Logger(self._trt.Logger.WARNING)
            self._runtime = self._trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelError(
                f"TensorRT could not deserialize {self.path} (built by another TensorRT version or for "
                "another GPU, or corrupt); rebuild it on this device with: dereflect export engine DIR"
            )
        self._io = engine_io(self.engine, self._trt)
        self.min_input_hw, self.max_input_hw = profile_hw(self.engine, self.input_names)

    def _deactivate(self) -> None:
        with self.pushed():
            with self._states_lock:
                self._states.clear()
            self._local = threading.local()
            self.engine = None
            self._runtime = None

    def thread_state(self) -> Any:
        """This thread's execution context, stream and buffers (created on first use)."""
        state = getattr(self._local, "state", None)
        if state is None:
            state = _ThreadState(context=self.new_context(), stream=self._cuda.Stream(), buffers={})
            self._local.state = state
            with self._states_lock:
                self._states.append(state)
        return state

    def new_context(self) -> Any:
        context = self.engine.create_execution_context()
        if context is None:
            raise ModelError(
                f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)"
            )
        return context

    def set_shapes(self, context: Any, shapes: Dict[str, Tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if not context.set_input_shape(name, tuple(int(s) for s in shape)):
                smallest, _, largest = self.engine.get_tensor_profile_shape(name, 0)
                raise InputError(
                    f"{self.path.name}: input {name} of shape {tuple(shape)} is outside the engine's profile "
                    f"({tuple(smallest)} to {tuple(largest)}); rebuild the engine with --min/--max "
                    "covering it"
                )

    def _infer(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        cuda = self._cuda
        with self.pushed():
            state = self.thread_state()
            arrays = {name: np.ascontiguousarray(feeds[name], dtype=self.dtype_of(name))
                      for name in self.input_names}
            self.set_shapes(state.context, {name: a.shape for name, a in arrays.items()})
            for name, array in arrays.items():
                buf = state.buffers.setdefault(name, _HostDevice(cuda))
                buf.fit(array.shape, array.dtype)
                buf.array[...] = array
                cuda.memcpy_htod_async(buf.device[0], buf.array, state.stream)
                state.context.set_tensor_address(name, buf.pointer)
            for name in self.output_names:
                buf = state.buffers.setdefault(name, _HostDevice(cuda))
                buf.fit(tuple(state.context.get_tensor_shape(name)), self.dtype_of(name))
                state.context.set_tensor_address(name, buf.pointer)
            if not state.context.execute_async_v3(state.stream.handle):
                raise ModelError(f"{self.path.name}: TensorRT execute_async_v3 failed")
            for name in self.output_names:
                buf = state.buffers[name]
                cuda.memcpy_dtoh_async(buf.array, buf.device[0], state.stream)
            state.stream.synchronize()
            return {name: state.buffers[name].array.astype(np.float32) for name in self.output_names}


@dataclass
class _ThreadState:
    context: Any
    stream: Any
    buffers: Dict[str, Any]


def _device_index(device: Any) -> int:
    text = str(device).lower()
    if text in ("auto", "cuda"):
        return 0
    if text.startswith("cuda:"):
        text = text[5:]
    if text.isdigit():
        return int(text)
    raise InputError(f"device must be auto, cuda, cuda:N or N for the tensorrt backend, not {device!r}")


@dataclasses.dataclass
class TensorRTOptions(BackendOptions):
    #: capture the device sequence in a CUDA graph and replay it for repeated frame sizes
    use_graph: bool = True


class TensorRTBackend(Backend):
    """The engines of an export directory. Their precision is fixed when built; ``precision`` is not used."""

    name = "tensorrt"
    options_class = TensorRTOptions

    def open_runners(self) -> Dict[str, Runner]:
        index = _device_index(self.options.device)
        self.engine_info = {}
        runners: Dict[str, Runner] = {}
        for name in self.manifest.networks:
            runners[name], self.engine_info[name] = open_engine(self.manifest, name, index)
        return runners

    def device_executor(self, settings: Any) -> Optional[Executor]:
        # The device sequence is RM2S's (its fused middle step); other methods run on the host executor.
        if not isinstance(self.method, RM2S):
            return None
        return TensorRTDeviceExecutor(self.runners[STAGE1.name], self.runners[STAGE2.name], settings,
                                      use_graph=self.options.use_graph)

    def describe(self) -> BackendDescription:
        from dereflect.trt_api import engines_precision

        precision = engines_precision(self.engine_info.values())
        return BackendDescription(f"tensorrt ({precision} engines)", on_gpu=True,
                                  element_bytes=2 if precision == "fp16" else 4)


# -- RM2S on the device -------------------------------------------------------------------

def workspace_bytes(height: int, width: int, batch: int = 1) -> Dict[str, int]:
    """Byte sizes of the kernel's device workspace, from the shared launch configuration."""
    from dereflect.middle_step.cuda import launch_config

    sizes = launch_config(height, width, batch)["workspace"]
    return {
        "confidence": sizes["confidence"] * 4,
        "max_bits": sizes["max_bits"] * 4,
        "hist_count": sizes["hist_count"] * 4,
        "hist_sum": sizes["hist_sum"] * 8,
        "result": sizes["result"] * 4,
    }


class _DeviceState:
    """One thread's execution contexts (its own, apart from the runners'), stream and frame plan."""

    def __init__(self, context1: Any, context2: Any, stream: Any) -> None:
        self.context1 = context1
        self.context2 = context2
        self.stream = stream
        self.shape: Optional[Tuple[int, int, int]] = None
        self.buffers: Dict[str, Any] = {}
        self.workspace: Dict[str, Any] = {}
        self.graph: Any = None
        #: while a graph is captured, nothing may wait for the stream
        self.capturing = False


#: The tensors the device executor binds by name besides the engines' inputs: RM2S's stage-1 estimate B1
#: and stage 2's background.
_B1 = STAGE1.outputs[0].name
_OUT = STAGE2.outputs[0].name


class TensorRTDeviceExecutor(Executor):
    """Engine 1 -> fused middle-step kernel -> engine 2 on one stream, optionally as a CUDA graph.

    The primitives enqueue and return buffer names; only ``download`` waits for the stream.
    Each thread gets its own pair of execution contexts and stream, separate from the runners'
    (so a plain ``infer`` on the same runners never rebinds what a captured graph uses), and one
    plan for the current frame shape: a new shape rebinds shapes and buffers and is captured again.
    """

    def __init__(self, stage1: TensorRTRunner, stage2: TensorRTRunner, settings: Any,
                 use_graph: bool = True, kernel_options: Sequence[str] = ()) -> None:
        from dereflect.middle_step.cuda import compile_with_pycuda, kernel_names

        if stage1.device_index != stage2.device_index:
            raise ModelError("both RM2S engines must run on the same GPU")
        self.stage1 = stage1
        self.stage2 = stage2
        self.settings = settings
        self.use_graph = bool(use_graph)
        #: why capturing the sequence as a CUDA graph failed (every frame is then enqueued plainly); None if it did not
        self.graph_capture_error: Optional[str] = None
        self._cuda = stage1._cuda
        self._image_name = stage1.input_names[0]
        self._s2_name = stage2.input_names[0]
        self.kernels = kernel_names(stage1.dtype_of(_B1), stage2.dtype_of(self._s2_name))
        compiler = require_backend_module("pycuda.compiler", "tensorrt", "compiling the CUDA kernel")
        with stage1.pushed():
            self._functions = compile_with_pycuda(compiler, kernel_options)
        self._local = threading.local()

    def _state(self) -> _DeviceState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = _DeviceState(self.stage1.new_context(), self.stage2.new_context(), self._cuda.Stream())
            self._local.state = state
        return state

    def _prepare(self, state: _DeviceState, batch: int, height: int, width: int) -> None:
        """Shapes, buffers, workspace and tensor addresses for a new frame shape."""
        cuda = self._cuda
        image_shape = (batch, STAGE1.input.channels, height, width)
        stage2_shape = (batch, STAGE2.input.channels, height, width)
        self.stage1.set_shapes(state.context1, {self._image_name: image_shape})
        self.stage2.set_shapes(state.context2, {self._s2_name: stage2_shape})
        image_dtype = self.stage1.dtype_of(self._image_name)
        specs = {
            "image": (image_shape, np.float32),
            "b1": ((batch, STAGE1.outputs[0].channels, height, width), self.stage1.dtype_of(_B1)),
            "stage2_input": (stage2_shape, self.stage2.dtype_of(self._s2_name)),
            "out": ((batch, STAGE2.outputs[0].channels, height, width), self.stage2.dtype_of(_OUT)),
        }
        if image_dtype != np.float32:
            # The kernel reads I as float32; an FP16 engine input gets its own converted copy.
            specs["image_engine"] = (image_shape, image_dtype)
        state.buffers = {}
        for key, (shape, dtype) in specs.items():
            buf = _HostDevice(cuda)
            buf.fit(shape, dtype)
            state.buffers[key] = buf
        state.workspace = {}
        for key, nbytes in workspace_bytes(height, width, batch).items():
            state.workspace[key] = cuda.mem_alloc(nbytes)
            # Zeroed once: the two-means pass leaves max_bits and the histogram zeroed again.
            cuda.memset_d8(state.workspace[key], 0, nbytes)
        engine_image = state.buffers.get("image_engine", state.buffers["image"])
        state.context1.set_tensor_address(self._image_name, engine_image.pointer)
        state.context1.set_tensor_address(_B1, state.buffers["b1"].pointer)
        state.context2.set_tensor_address(self._s2_name, state.buffers["stage2_input"].pointer)
        state.context2.set_tensor_address(_OUT, state.buffers["out"].pointer)
        state.shape = (batch, height, width)
        state.graph = None

    # -- the primitives the method's sequence runs on ------------------------------------

    def upload(self, image: np.ndarray) -> str:
        state = self._state()
        height, width = image.shape[:2]
        if state.shape != (1, height, width):
            self._prepare(state, 1, height, width)
        batch = image.transpose(2, 0, 1)[None]
        for key in ("image", "image_engine"):
            if key in state.buffers:
                state.buffers[key].array[...] = batch
                self._cuda.memcpy_htod_async(state.buffers[key].device[0], state.buffers[key].array, state.stream)
        return "image"

    def network(self, name: str, x: str) -> Dict[str, str]:
        state = self._state()
        context, output, buffer = ((state.context1, _B1, "b1") if name == STAGE1.name
                                   else (state.context2, _OUT, "out"))
        if not context.execute_async_v3(state.stream.handle):
            raise ModelError(f"TensorRT execute_async_v3 failed for {name}")
        return {output: buffer}

    def clip(self, x: str) -> str:
        # The exported graphs clamp their background output to [0, 1] already.
        return x

    def middle_step(self, image: str, stage1: str, settings: Any, intermediates: bool) -> MiddleStepOutput:
        from dereflect.middle_step.cuda import launch_config, launch_plan

        state = self._state()
        batch, height, width = state.shape
        buffers, work = state.buffers, state.workspace
        null = np.intp(0)
        plan = launch_plan(self.kernels, buffers[image].device[0], buffers[stage1].device[0], height, width,
                           settings.gradient_threshold, settings.epsilon, settings.c1, settings.c2, work,
                           buffers["stage2_input"].device[0], (null, null, null))
        config = launch_config(height, width, batch=batch)
        for name, step, args in plan:
            geometry = config[step]
            self._functions[name](*args, block=geometry["block"], grid=geometry["grid"], stream=state.stream)
        return MiddleStepOutput(stage2_input="stage2_input")

    def download(self, x: str) -> np.ndarray:
        state = self._state()
        buf = state.buffers[x]
        self._cuda.memcpy_dtoh_async(buf.array, buf.device[0], state.stream)
        if state.capturing:
            return np.zeros(buf.shape[2:] + (buf.shape[1],), np.float32)
        state.stream.synchronize()
        return np.ascontiguousarray(buf.array[0].transpose(1, 2, 0), dtype=np.float32)

    # -- the CUDA graph around the sequence ---------------------------------------------

    def run(self, method: RM2S, image: np.ndarray, settings: Any, timer: Timer = NULL_TIMER,
            intermediates: bool = False) -> Layers:
        """The method's sequence; for a frame size seen before, the replay of its captured graph."""
        with self.stage1.pushed():
            state = self._state()
            height, width = image.shape[:2]
            if state.graph is not None and state.shape == (1, height, width):
                # One stage from the frame's copy into the pinned buffer to the result's arrival.
                with timer.stage("graph"):
                    for key in ("image", "image_engine"):
                        if key in state.buffers:
                            state.buffers[key].array[...] = image.transpose(2, 0, 1)[None]
                    state.graph.launch(state.stream)
                    state.stream.synchronize()
                return method.layers(image, state.buffers["out"].array[0].transpose(1, 2, 0).astype(np.float32))
            layers = method.run(self, image, settings, timer, intermediates)
            # TensorRT applies deferred shape updates on the first enqueue, so capture only
            # after one plain run with this shape.
            if self.use_graph:
                self._capture(state, method, image, settings)
            return layers

    def _capture(self, state: _DeviceState, method: RM2S, image: np.ndarray, settings: Any) -> None:
        """Record the method's sequence as a CUDA graph; on failure keep plain enqueueing, and say so once."""
        try:
            state.stream.begin_capture()
            state.capturing = True
            try:
                method.run(self, image, settings)
            finally:
                state.capturing = False
                graph = state.stream.end_capture()
            state.graph = graph.instantiate()
        except Exception as exc:  # noqa: BLE001 - capture is an optimisation; the plain path stays correct
            state.graph = None
            self.use_graph = False  # no further tries, so one warning
            self.graph_capture_error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            warnings.warn(f"capturing the TensorRT sequence as a CUDA graph failed ({self.graph_capture_error}); "
                          "every frame is enqueued without a graph", stacklevel=2)

    def timer(self) -> Timer:
        """CUDA events on this thread's stream: the primitives only enqueue, so the host clock would time the
        enqueueing and put the GPU's work into ``download``, the one call that waits."""
        with self.stage1.pushed():
            stream = self._state().stream
        return PycudaEventTimer(self._cuda, stream, self.stage1.pushed)

    def close(self) -> None:
        """Free the contexts, buffers and graphs of every thread (with the CUDA context current)."""
        with self.stage1.pushed():
            self._local = threading.local()


class PycudaEventTimer(EventTimer):
    """pycuda events recorded on one stream, each with the CUDA context current (``pushed``): a stage of
    host work around the sequence (downscale, upsample) may be timed from a thread without it."""

    def __init__(self, cuda: Any, stream: Any, pushed: Callable[[], ContextManager[None]]) -> None:
        super().__init__()
        self._cuda = cuda
        self._stream = stream
        self._pushed = pushed

    def _record(self) -> Any:
        with self._pushed():
            event = self._cuda.Event()
            event.record(self._stream)
        return event

    def _elapsed_ms(self, start: Any, end: Any) -> float:
        return end.time_since(start)

    def read(self) -> Dict[str, float]:
        with self._pushed():
            return super().read()
