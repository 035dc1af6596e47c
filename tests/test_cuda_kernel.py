"""The fused CUDA middle step: launch math, nvcc builds, and the kernel against the NumPy reference.

Without a GPU the kernel source is compiled as C++ (g++) under a small host emulation of
CUDA's execution model (blocks run one after another, each thread of a block is a POSIX
thread, __syncthreads is a barrier, atomics are compare-and-swap), so every pass is checked
against the reference here too. The cupy tests run the real kernels where a GPU exists.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
from dereflect.errors import InputError, MissingDependencyError, ModelError
from dereflect.middle_step import cuda as cc
from dereflect.middle_step.reference import (
    HISTOGRAM_BINS,
    confidence_map,
    edge_masks,
    middle_step_reference,
    stage2_input,
    two_means_threshold_histogram,
)


def _find_nvcc():
    """nvcc on PATH, else under $CUDA_HOME, $CUDA_PATH or /usr/local/cuda; None without one."""
    found = shutil.which("nvcc")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not found and root and (Path(root) / "bin" / "nvcc").is_file():
            found = str(Path(root) / "bin" / "nvcc")
    return found


NVCC = _find_nvcc()
GXX = shutil.which("g++")


def synthetic_pair(rng: np.random.Generator, h: int, w: int):
    """(image, stage-1 estimate) HxWx3: sharp shapes, a blurred reflection, a partly cleaned estimate."""
    background = np.full((h, w, 3), 0.3, np.float32) + np.linspace(0, 0.3, w, dtype=np.float32)[None, :, None]
    reflection = np.zeros((h, w, 3), np.float32)

    def box():
        y0, x0 = rng.integers(0, max(h - 2, 1)), rng.integers(0, max(w - 2, 1))
        return slice(y0, y0 + rng.integers(2, h // 2 + 3)), slice(x0, x0 + rng.integers(2, w // 2 + 3))

    for _ in range(4):
        background[box()] = rng.random(3)
        reflection[box()] += rng.random(3) * 0.5
    reflection = cv2.GaussianBlur(reflection, (0, 0), 1.2)
    image = np.clip(0.8 * background + reflection, 0, 1).astype(np.float32)
    stage1 = np.clip(0.8 * background + 0.1 * reflection, 0, 1).astype(np.float32)
    return image, stage1


def to_nchw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(2, 0, 1))


# ---- pure-Python launch math -------------------------------------------------------------


def test_launch_config_covers_the_image():
    cfg = cc.launch_config(37, 53, batch=2)
    assert cfg["confidence"]["block"] == (cc.TILE_W, cc.TILE_H, 1)
    gx, gy, gz = cfg["confidence"]["grid"]
    assert gx * cc.TILE_W >= 53 > (gx - 1) * cc.TILE_W and gz == 2
    assert gy * cc.TILE_H >= 37 > (gy - 1) * cc.TILE_H
    assert cfg["two_means"] == {"grid": (2, 1, 1), "block": (cc.SCAN_THREADS, 1, 1)}
    sx, _, sz = cfg["stage2"]["grid"]
    assert sx * cc.STAGE2_THREADS >= 37 * 53 > (sx - 1) * cc.STAGE2_THREADS and sz == 2
    assert cfg["histogram"]["grid"] == (1, 1, 2) and cfg["bins"] == HISTOGRAM_BINS
    assert cfg["workspace"] == {
        "confidence": 2 * 37 * 53,
        "max_bits": 2,
        "hist_count": 2 * HISTOGRAM_BINS,
        "hist_sum": 2 * HISTOGRAM_BINS,
        "result": 2 * cc.RESULT_SIZE,
    }
    big = cc.launch_config(2160, 3840)
    assert big["histogram"]["grid"][0] == cc.HIST_MAX_BLOCKS
    assert cc.launch_config(1, 1)["histogram"]["grid"][0] == 1
    for bad in ((0, 5, 1), (5, -1, 1), (5, 5, 0), (5.0, 5, 1), (70000 * 8, 4, 1), (46341, 46341, 1)):
        with pytest.raises(InputError):
            cc.launch_config(*bad)


def test_check_frame_size_is_the_kernels_limit():
    cc.check_frame_size(2160, 3840)
    cc.check_frame_size(cc.MAX_GRID_YZ * cc.TILE_H, 1)
    with pytest.raises(InputError, match=r"fused middle-step kernel takes frames below 2\*\*31 pixels"):
        cc.check_frame_size(46341, 46341)
    with pytest.raises(InputError, match=rf"at most {cc.MAX_GRID_YZ} frames and {cc.MAX_GRID_YZ * cc.TILE_H} rows"):
        cc.check_frame_size(cc.MAX_GRID_YZ * cc.TILE_H + 1, 1)


# ---- compiling with pycuda (a stand-in for pycuda.compiler) ---------------------------------


class FakeCompiler:
    """pycuda.compiler: records the nvcc each SourceModule would run; ``error`` is raised instead."""

    def __init__(self, error: Exception = None):
        self.nvcc = []
        self.error = error

    def SourceModule(self, source, nvcc="nvcc", options=None, no_extern_c=False):
        assert no_extern_c and "rm2s_two_means" in source and any(o.startswith("-DRM2S_BINS=") for o in options)
        self.nvcc.append(nvcc)
        if self.error is not None:
            raise self.error
        return types.SimpleNamespace(get_function=lambda name: f"function {name}")


@pytest.fixture()
def nvcc_places(tmp_path, monkeypatch):
    """``put(on_path, in_toolkit)``: an nvcc on an otherwise empty PATH and/or at the toolkit's place."""
    def put(on_path: bool, in_toolkit: bool):
        for folder, wanted in ((tmp_path / "path", on_path), (tmp_path / "cuda" / "bin", in_toolkit)):
            folder.mkdir(parents=True, exist_ok=True)
            if wanted:
                (folder / "nvcc").write_text("#!/bin/sh\n")
                (folder / "nvcc").chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path / "path"))
        monkeypatch.setattr(cc, "TOOLKIT_NVCC", tmp_path / "cuda" / "bin" / "nvcc")
        return tmp_path / "path" / "nvcc", tmp_path / "cuda" / "bin" / "nvcc"

    return put


def test_pycuda_compiles_with_the_toolkits_nvcc_when_path_has_none(nvcc_places):
    _, toolkit = nvcc_places(on_path=False, in_toolkit=True)
    compiler = FakeCompiler()
    assert cc.compile_with_pycuda(compiler) == {name: f"function {name}" for name in cc.KERNELS}
    assert compiler.nvcc == [str(toolkit)]
    nvcc_places(on_path=True, in_toolkit=True)
    compiler = FakeCompiler()
    cc.compile_with_pycuda(compiler)
    assert compiler.nvcc == ["nvcc"]  # PATH's, as pycuda runs it by default


def test_pycuda_without_nvcc_says_how_to_put_it_on_path(nvcc_places):
    nvcc_places(on_path=False, in_toolkit=False)
    # pycuda reports an nvcc it cannot start with pytools' ExecError, an OSError.
    compiler = FakeCompiler(OSError("error invoking 'nvcc --version': [Errno 2] No such file or directory"))
    with pytest.raises(MissingDependencyError) as caught:
        cc.compile_with_pycuda(compiler)
    message = str(caught.value)
    assert "\n" not in message and "neither on PATH nor at" in message
    assert "export PATH=/usr/local/cuda/bin:$PATH" in message and "device_middle_step=False" in message


def test_a_failed_kernel_build_is_one_line_naming_nvccs_error(nvcc_places):
    on_path, _ = nvcc_places(on_path=True, in_toolkit=False)

    class CompileError(Exception):  # as pycuda.driver.CompileError: the message, then nvcc's stderr
        stderr = "kernel.cu(12): error: identifier \"__hfma2\" is undefined\n1 error detected\n"

    compiler = FakeCompiler(CompileError(f"nvcc compilation of /tmp/kernel.cu failed\n[command: {on_path} ...]"))
    with pytest.raises(ModelError) as caught:
        cc.compile_with_pycuda(compiler)
    message = str(caught.value)
    assert "\n" not in message and f"nvcc ({on_path}) could not build confidence.cu" in message
    assert 'error: identifier "__hfma2" is undefined' in message and "export PATH=/usr/local/cuda/bin" in message


def test_kernel_source_defaults_match_python_constants():
    source = cc.kernel_source()
    defaults = dict(re.findall(r"#ifndef (RM2S_\w+)\n#define \1 (\d+)", source))
    assert {f"-D{k}={v}" for k, v in defaults.items()} == set(cc.kernel_defines())
    for name in cc.KERNELS:
        assert re.search(rf'extern "C" __global__ void __launch_bounds__\(\w+\)\s+{name}\(', source), name
    assert len(cc.RESULT_FIELDS) == cc.RESULT_SIZE
    assert cc.kernel_path().read_text(encoding="utf-8") == source


# ---- nvcc builds ---------------------------------------------------------------------------

#: The GPUs the kernel is built for: Xavier (sm_72) to Thor (sm_110).
NVCC_ARCHS = ("sm_72", "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_110")


@functools.lru_cache(maxsize=None)
def nvcc_targets(nvcc: str) -> tuple:
    """``sm_*`` and ``compute_*`` targets this nvcc builds."""
    return tuple(target for flag in ("--list-gpu-code", "--list-gpu-arch")
                 for target in subprocess.run([nvcc, flag], capture_output=True, text=True, timeout=60,
                                              check=True).stdout.split())


def compile_with_nvcc(arch: str, out_dir) -> Path:
    """The kernel compiled by nvcc for one target: ``sm_XY`` gives a cubin, ``compute_XY`` a PTX file."""
    kind = "cubin" if arch.startswith("sm_") else "ptx"
    out = out_dir / f"confidence_{arch}.{kind}"
    cmd = [NVCC, f"-{kind}", f"-arch={arch}", "-O3", *cc.kernel_defines(), "-o", str(out), str(cc.kernel_path())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    return out


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not installed")
@pytest.mark.parametrize("arch", NVCC_ARCHS)
def test_nvcc_compiles_every_arch(arch, tmp_path):
    if arch not in nvcc_targets(NVCC):
        pytest.skip(f"this nvcc cannot build {arch} (CUDA 13 dropped sm_72; JetPack 5's CUDA 11.4 builds it)")
    start = time.perf_counter()
    out = compile_with_nvcc(arch, tmp_path)
    assert out.stat().st_size > 1000
    assert time.perf_counter() - start < 60
    names = out.read_bytes()
    for name in cc.KERNELS:
        assert name.encode() in names


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not installed")
def test_nvcc_ptx(tmp_path):
    out = compile_with_nvcc("compute_87", tmp_path)
    text = out.read_text()
    assert ".entry rm2s_two_means" in text and "cvt.rn.f16.f32" in text


def _find_nvrtc():
    """libnvrtc from the CUDA toolkit or the nvidia-cuda-nvrtc wheels, else None."""
    import ctypes.util
    import glob
    import importlib.util

    candidates = [ctypes.util.find_library("nvrtc")]
    for package in ("nvidia.cuda_nvrtc", "nvidia.cu13"):
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            spec = None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidates += sorted(glob.glob(f"{folder}/lib/libnvrtc.so*"))
    for candidate in filter(None, candidates):
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    return None


NVRTC = _find_nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (CUDA toolkit or nvidia-cuda-nvrtc-cu12)")
def test_nvrtc_compiles_without_includes():
    # What cupy.RawModule does: NVRTC, no include paths, names resolved with extern "C".
    program = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(program), cc.kernel_source().encode(), b"confidence.cu",
                                    0, None, None) == 0
    options = [b"--gpu-architecture=compute_75"] + [o.encode() for o in cc.kernel_defines()]
    status = NVRTC.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode()
    NVRTC.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetPTX(program, ptx)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(program))
    for name in cc.KERNELS:
        assert f".entry {name}(" in ptx.value.decode()


# ---- host emulation of the kernels ---------------------------------------------------------

EMULATION_PRELUDE = r"""
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <functional>
#include <vector>

struct dim3 { unsigned int x, y, z; };
static dim3 gridDim, blockDim, blockIdx;
static thread_local dim3 threadIdx;
static pthread_barrier_t emu_barrier;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(n)

static inline void __syncthreads() { pthread_barrier_wait(&emu_barrier); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, sizeof i); return i; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, sizeof f); return f; }

template <typename T> static inline T atomicAdd(T* p, T v)
{
    T expected, desired;
    __atomic_load(p, &expected, __ATOMIC_SEQ_CST);
    do { desired = expected + v; }
    while (!__atomic_compare_exchange(p, &expected, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return expected;
}

static inline int atomicMax(int* p, int v)
{
    int expected, desired;
    __atomic_load(p, &expected, __ATOMIC_SEQ_CST);
    do { desired = expected > v ? expected : v; }
    while (!__atomic_compare_exchange(p, &expected, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return expected;
}

static inline unsigned short rm2s_float_to_half(float f)
{
    _Float16 h = (_Float16)f;
    unsigned short u;
    memcpy(&u, &h, sizeof u);
    return u;
}

static inline float rm2s_half_to_float(unsigned short u)
{
    _Float16 h;
    memcpy(&h, &u, sizeof h);
    return (float)h;
}
"""

EMULATION_HARNESS = r"""
struct EmuThread { std::function<void()>* body; dim3 index; };

static void* emu_thread_main(void* arg)
{
    EmuThread* t = (EmuThread*)arg;
    threadIdx = t->index;
    (*t->body)();
    return nullptr;
}

template <typename K, typename... A>
static void emu_launch(K kernel, const unsigned int* g, const unsigned int* b, A... args)
{
    gridDim = dim3{g[0], g[1], g[2]};
    blockDim = dim3{b[0], b[1], b[2]};
    const unsigned int n = b[0] * b[1] * b[2];
    std::function<void()> body = [&]() { kernel(args...); };
    std::vector<pthread_t> threads(n);
    std::vector<EmuThread> info(n);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 18);
    for (unsigned int z = 0; z < g[2]; ++z)
        for (unsigned int y = 0; y < g[1]; ++y)
            for (unsigned int x = 0; x < g[0]; ++x) {
                blockIdx = dim3{x, y, z};
                pthread_barrier_init(&emu_barrier, nullptr, n);
                for (unsigned int t = 0; t < n; ++t) {
                    info[t] = EmuThread{&body, dim3{t % b[0], (t / b[0]) % b[1], t / (b[0] * b[1])}};
                    pthread_create(&threads[t], &attr, emu_thread_main, &info[t]);
                }
                for (unsigned int t = 0; t < n; ++t) pthread_join(threads[t], nullptr);
                pthread_barrier_destroy(&emu_barrier);
            }
    pthread_attr_destroy(&attr);
}

#define EMU(name, params, args) \
    extern "C" void emu_##name(const unsigned int* g, const unsigned int* b, params) \
    { emu_launch(rm2s_##name, g, b, args); }
#define P(...) __VA_ARGS__

EMU(confidence_f32, P(const float* i, const float* s, int h, int w, float t, float e, float* c,
    unsigned char* m, int* x), P(i, s, h, w, t, e, c, m, x))
EMU(confidence_b1f16, P(const float* i, const unsigned short* s, int h, int w, float t, float e, float* c,
    unsigned char* m, int* x), P(i, s, h, w, t, e, c, m, x))
EMU(histogram, P(const float* c, int h, int w, const int* x, unsigned int* n, double* s), P(c, h, w, x, n, s))
EMU(two_means, P(unsigned int* n, double* s, int* x, float c1, float c2, float* r), P(n, s, x, c1, c2, r))
EMU(stage2_input_f32, P(const float* i, const float* c, const float* r, int h, int w, float* o,
    unsigned char* mb, unsigned char* mr), P(i, c, r, h, w, o, mb, mr))
EMU(stage2_input_f16, P(const float* i, const float* c, const float* r, int h, int w, unsigned short* o,
    unsigned char* mb, unsigned char* mr), P(i, c, r, h, w, o, mb, mr))
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if GXX is None or sys.platform != "linux":
        pytest.skip("the host emulation of the kernels needs g++ on Linux")
    folder = tmp_path_factory.mktemp("cuda_emulation")
    source = folder / "emulated.cpp"
    source.write_text(EMULATION_PRELUDE + cc.kernel_source() + EMULATION_HARNESS)
    lib = folder / "emulated.so"
    defines = list(cc.kernel_defines())
    proc = subprocess.run(
        [GXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-DRM2S_HOST_EMULATION", *defines,
         "-o", str(lib), str(source)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0 and "_Float16" in proc.stderr:
        pytest.skip("this g++ has no _Float16 for the emulated half conversions")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def _arg(value):
    if isinstance(value, np.ndarray):
        assert value.flags.c_contiguous
        return ctypes.c_void_p(value.ctypes.data)
    if isinstance(value, np.uintp):
        return ctypes.c_void_p(int(value) or None)
    if isinstance(value, np.int32):
        return ctypes.c_int(int(value))
    if isinstance(value, np.float32):
        return ctypes.c_float(float(value))
    raise TypeError(f"unexpected kernel argument {type(value)}")


def launch(lib, kernel: str, grid, block, args) -> None:
    """Launch ``rm2s_<kernel>`` on the emulator with cupy-style arguments."""
    dims = (ctypes.c_uint * 3)
    getattr(lib, "emu_" + kernel.replace("rm2s_", ""))(dims(*grid), dims(*block), *[_arg(a) for a in args])


class Workspace:
    def __init__(self, batch: int, h: int, w: int):
        sizes = cc.launch_config(h, w, batch)["workspace"]
        self.confidence = np.zeros((batch, h, w), np.float32)
        self.gradient_mask = np.zeros((batch, h, w), np.uint8)
        self.max_bits = np.zeros(sizes["max_bits"], np.int32)
        self.hist_count = np.zeros(sizes["hist_count"], np.uint32)
        self.hist_sum = np.zeros(sizes["hist_sum"], np.float64)
        self.result = np.zeros((batch, cc.RESULT_SIZE), np.float32)
        self.mask_background = np.zeros((batch, h, w), np.uint8)
        self.mask_reflection = np.zeros((batch, h, w), np.uint8)


def run_emulated(lib, images, stage1, c1=0.5, c2=0.5, half_stage1=False, half_out=False, ws=None):
    """All four passes on a batch of HxWx3 images; returns (workspace, N x 9 x H x W output)."""
    batch, h, w, _ = images.shape
    cfg = cc.launch_config(h, w, batch)
    ws = ws or Workspace(batch, h, w)
    image = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    b1 = np.ascontiguousarray(stage1.transpose(0, 3, 1, 2))
    b1 = b1.astype(np.float16).view(np.uint16) if half_stage1 else b1
    out = np.zeros((batch, 9, h, w), np.uint16 if half_out else np.float32)
    hh, ww = np.int32(h), np.int32(w)
    launch(lib, "confidence_b1f16" if half_stage1 else "confidence_f32", cfg["confidence"]["grid"],
           cfg["confidence"]["block"], (image, b1, hh, ww, np.float32(1.0), np.float32(1e-7), ws.confidence,
                                        ws.gradient_mask, ws.max_bits))
    launch(lib, "histogram", cfg["histogram"]["grid"], cfg["histogram"]["block"],
           (ws.confidence, hh, ww, ws.max_bits, ws.hist_count, ws.hist_sum))
    launch(lib, "two_means", cfg["two_means"]["grid"], cfg["two_means"]["block"],
           (ws.hist_count, ws.hist_sum, ws.max_bits, np.float32(c1), np.float32(c2), ws.result))
    launch(lib, "stage2_input_f16" if half_out else "stage2_input_f32", cfg["stage2"]["grid"],
           cfg["stage2"]["block"], (image, ws.confidence, ws.result, hh, ww, out, ws.mask_background,
                                    ws.mask_reflection))
    return ws, (out.view(np.float16) if half_out else out)


def check_against_reference(ws, out, images, stage1, c1, c2, i=0, half_stage1=False, half_out=False):
    image, b1 = images[i], stage1[i]
    if half_stage1:
        b1 = b1.astype(np.float16).astype(np.float32)
    conf, mask = confidence_map(image, b1)
    # Same roundings as the reference; only log1pf may differ by an ulp.
    np.testing.assert_allclose(ws.confidence[i], conf, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(ws.gradient_mask[i], mask)
    nonzero = conf[conf > 0]
    low, high = two_means_threshold_histogram(conf)
    r = dict(zip(cc.RESULT_FIELDS, ws.result[i].tolist()))
    assert r["low"] == pytest.approx(low, rel=1e-5, abs=1e-7)
    assert r["high"] == pytest.approx(high, rel=1e-5, abs=1e-7)
    assert r["background_upper"] == pytest.approx(low + c2 * (high - low), rel=1e-5, abs=1e-7)
    assert r["reflection_lower"] == pytest.approx(high - c1 * (high - low), rel=1e-5, abs=1e-7)
    assert r["count"] == nonzero.size
    assert r["max"] == pytest.approx(float(nonzero.max()) if nonzero.size else 0.0, rel=1e-6)
    # Masks from the kernel's own thresholds equal the reference's masks with those thresholds,
    # and differ from the reference's histogram thresholds only at float-tolerance pixels.
    mb, mr = edge_masks(conf, r["low"], r["high"], c1, c2)
    ref_b, ref_r = edge_masks(conf, low, high, c1, c2)
    tol = 1e-5 * max(1.0, high)
    near = (np.abs(conf - r["background_upper"]) < tol) | (np.abs(conf - r["reflection_lower"]) < tol)
    assert np.all((mb == ref_b) | near) and np.all((mr == ref_r) | near)
    kernel_b = (conf > 0) & (conf < np.float32(r["background_upper"]))
    kernel_r = conf > np.float32(r["reflection_lower"])
    np.testing.assert_array_equal(ws.mask_background[i], kernel_b)
    np.testing.assert_array_equal(ws.mask_reflection[i], kernel_r)
    expected = stage2_input(image, kernel_b, kernel_r).transpose(2, 0, 1)
    if half_out:
        np.testing.assert_array_equal(out[i], expected.astype(np.float16))
    else:
        np.testing.assert_array_equal(out[i], expected)
    # Pass (c) left the workspace clean for the next frame.
    assert not ws.max_bits.any() and not ws.hist_count.any() and not ws.hist_sum.any()
    return kernel_b, kernel_r


def test_emulated_kernel_matches_reference_odd_size(emulator):
    images, stage1 = (np.stack(x) for x in zip(synthetic_pair(np.random.default_rng(0), 37, 53)))
    ws, out = run_emulated(emulator, images, stage1)
    mb, mr = check_against_reference(ws, out, images, stage1, 0.5, 0.5)
    assert mb.any() and mr.any()
    # Same workspace again: identical result (self-cleaning workspace), other thresholds.
    ws2, out2 = run_emulated(emulator, images, stage1, c1=0.2, c2=0.8, ws=ws)
    check_against_reference(ws2, out2, images, stage1, 0.2, 0.8)


def test_emulated_kernel_batch_and_half_precision(emulator):
    pairs = [synthetic_pair(np.random.default_rng(s), 20, 70) for s in (1, 2)]
    images = np.stack([p[0] for p in pairs])
    stage1 = np.stack([p[1] for p in pairs])
    ws, out = run_emulated(emulator, images, stage1, c1=0.2, c2=0.8, half_stage1=True, half_out=True)
    assert out.dtype == np.float16
    for i in range(2):
        check_against_reference(ws, out, images, stage1, 0.2, 0.8, i=i, half_stage1=True, half_out=True)
    assert ws.result[0, 0] != ws.result[1, 0]


@pytest.mark.parametrize(
    "case", ["flat", "zero_confidence", "one_pixel", "tiny", "thin_lines", "random_noise"]
)
def test_emulated_kernel_edge_cases(emulator, case):
    rng = np.random.default_rng(3)
    if case == "flat":
        image = np.full((9, 13, 3), 0.6, np.float32)
        b1 = image.copy()
    elif case == "zero_confidence":  # strong edges, but the stage-1 output equals the input: G_R = 0
        image, _ = synthetic_pair(rng, 24, 40)
        b1 = image.copy()
    elif case == "one_pixel":
        image = np.zeros((11, 9, 3), np.float32)
        image[5, 4] = 1.0
        b1 = np.zeros_like(image)
    elif case == "tiny":
        image = rng.random((2, 3, 3), dtype=np.float32)
        b1 = image * 0.5
    elif case == "thin_lines":  # one-pixel-wide lines: reflection in I only, background in both
        image = np.full((33, 35, 3), 0.2, np.float32)
        image[:, 7] = 0.9
        image[16, :] = 0.7
        b1 = np.full_like(image, 0.2)
        b1[:, 7] = 0.9
    else:
        image = rng.random((17, 40, 3), dtype=np.float32)
        b1 = np.clip(image + 0.05 * rng.standard_normal(image.shape), 0, 1).astype(np.float32)
    ws, out = run_emulated(emulator, image[None], b1[None])
    mb, mr = check_against_reference(ws, out, image[None], b1[None], 0.5, 0.5)
    conf = confidence_map(image, b1)[0]
    if case in ("flat", "zero_confidence"):
        assert not conf.any() and not mb.any() and not mr.any()
        assert ws.result[0, :2].tolist() == [0.0, 0.0]
    if case == "thin_lines":
        # Sobel is zero on a line's own pixels; its flanks are edges. The line only in I is
        # reflection; the line in both gives G_R = 0 (no confidence); their crossing is background.
        assert mr[15, 20] and mr[17, 20] and not mr[16, 20] and mb[14:19, 5:10].any() and conf[10, 6] == 0


# ---- the cupy launcher, on the emulator and on a real GPU ------------------------------------


class _FakeRawModule:
    """cupy.RawModule stand-in whose functions run on the emulator."""

    lib = None

    def __init__(self, code: str, options=()):
        assert code == cc.kernel_source() and set(cc.kernel_defines()) <= set(options)

    def get_function(self, name: str):
        assert name in cc.KERNELS
        return lambda grid, block, args: launch(self.lib, name, grid, block, args)


def test_cupy_launcher_on_the_emulator(emulator, monkeypatch):
    fake = types.SimpleNamespace(
        ndarray=np.ndarray, zeros=np.zeros, empty=np.empty, float32=np.float32, float64=np.float64,
        int32=np.int32, uint32=np.uint32, uint8=np.uint8, RawModule=_FakeRawModule,
    )
    monkeypatch.setattr(_FakeRawModule, "lib", emulator)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    runner = cc.CupyConfidence()
    image, b1 = synthetic_pair(np.random.default_rng(5), 21, 34)
    result = runner(to_nchw(image), to_nchw(b1), return_masks=True)
    ref = middle_step_reference(image, b1)
    assert result.stage2_input.shape == (1, 9, 21, 34)
    np.testing.assert_allclose(result.confidence[0], ref.confidence, rtol=1e-6)
    np.testing.assert_array_equal(result.gradient_mask[0], ref.gradient_mask)
    low, high = two_means_threshold_histogram(ref.confidence)
    assert result.result[0, 0] == pytest.approx(low, rel=1e-5)
    assert result.result[0, 1] == pytest.approx(high, rel=1e-5)
    np.testing.assert_array_equal(result.stage2_input[0, :3], to_nchw(image))
    first = result.stage2_input
    # Second call, no masks (null pointers), float16 stage-1 and output; buffers reused.
    half = runner(to_nchw(image)[None], to_nchw(b1).astype(np.float16)[None], c1=0.2, c2=0.8, dtype="float16")
    assert half.mask_background is None and half.stage2_input.dtype == np.float16
    assert runner(to_nchw(image), to_nchw(b1)).stage2_input is first
    out = np.empty((1, 9, 21, 34), np.float32)
    assert runner(to_nchw(image), to_nchw(b1), out_dev=out).stage2_input is out
    np.testing.assert_array_equal(out, first)
    with pytest.raises(InputError, match="shape"):
        runner(to_nchw(image), to_nchw(b1), out_dev=np.empty((1, 9, 21, 33), np.float32))
    with pytest.raises(InputError, match="float32"):
        runner(to_nchw(image).astype(np.float64), to_nchw(b1))
    with pytest.raises(InputError, match="contiguous"):
        runner(to_nchw(image)[:, :, ::2], to_nchw(b1)[:, :, ::2])
    with pytest.raises(InputError, match="dtype"):
        runner(to_nchw(image), to_nchw(b1), dtype="bfloat16")


def _cupy_gpu():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # noqa: BLE001 - no cupy, no driver or no device all mean "skip"
        return None


CUPY = _cupy_gpu()
needs_gpu = pytest.mark.skipif(CUPY is None, reason="needs cupy and a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", ["random", "flat", "one_pixel", "odd_batch"])
def test_cupy_kernels_match_reference(case):
    cp = CUPY
    rng = np.random.default_rng(7)
    if case == "random":
        pairs = [synthetic_pair(rng, 64, 96)]
    elif case == "flat":
        flat = np.full((16, 16, 3), 0.5, np.float32)
        pairs = [(flat, flat)]
    elif case == "one_pixel":
        dot = np.zeros((9, 11, 3), np.float32)
        dot[4, 5] = 1.0
        pairs = [(dot, np.zeros_like(dot))]
    else:
        pairs = [synthetic_pair(rng, 37, 53) for _ in range(3)]
    images = np.stack([p[0] for p in pairs])
    stage1 = np.stack([p[1] for p in pairs])
    runner = cc.CupyConfidence()
    stream = cp.cuda.Stream(non_blocking=True)
    for dtype in ("float32", "float16"):
        image_dev = cp.asarray(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        stage1_dev = cp.asarray(np.ascontiguousarray(stage1.transpose(0, 3, 1, 2)))
        result = runner(image_dev, stage1_dev, stream=stream, dtype=dtype, return_masks=True)
        stream.synchronize()
        fields = ("confidence", "gradient_mask", "result", "mask_background", "mask_reflection")
        arrays = {name: cp.asnumpy(getattr(result, name)) for name in fields}
        for name in ("max_bits", "hist_count", "hist_sum"):
            arrays[name] = cp.asnumpy(runner.workspace[name])
        ws = types.SimpleNamespace(**arrays)
        out = cp.asnumpy(result.stage2_input)
        for i in range(len(pairs)):
            check_against_reference(ws, out, images, stage1, 0.5, 0.5, i=i, half_out=dtype == "float16")
