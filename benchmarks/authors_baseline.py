"""The authors' structure, for the side-by-side: same weights, their way of running them.

What the authors' released code does: both networks in PyTorch eager FP32; the
stage-1 output goes to the host (``.cpu()``), the middle step runs there with OpenCV Sobel
(``ksize=5``) and scikit-learn ``KMeans(n_clusters=2)`` on the non-zero confidence values,
the 9-channel stage-2 input goes back to the device, and stage 2 runs. Each of those is a
timed stage (:data:`AuthorsPipeline.stages`), with the device synchronised at every boundary,
as their ``.cpu()`` calls do anyway.

Also the middle step alone, four ways (:func:`middle_step_samples`): the fused CUDA kernel
(cupy, GPU only), this SDK's CPU step (``middle_step_cpu``), the plain torch implementation
(``dereflect.middle_step.torch_ops``) and the authors' OpenCV + scikit-learn step.

The side-by-side on any machine, SDK and authors' frames interleaved run by run so both see
the same machine load (:func:`side_by_side`)::

    python benchmarks/authors_baseline.py EXPORT_DIR --sizes 256,720p --device cpu --runs 5

Needs the ``train`` extra (torch, scikit-learn). Used by ``gpu_suite.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from dereflect.methods.base import CudaEventTimer, MonotonicTimer
from dereflect.methods.base import Timer as StageTimer
from dereflect.models import open_source
from dereflect.tools.bench import BenchPipeline, parse_sizes, summarize, synthetic_frame

# Their code's grey weights, typed out as their code has them: this file re-implements their step on
# purpose, apart from the SDK's (the SDK's are the same numbers, dereflect.middle_step.reference.LUMA).
LUMA = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
EPS = 1e-7
#: scikit-learn's KMeans default before 1.4 (then "auto", one k-means++ run): what code of the
#: authors' time ran with.
AUTHORS_N_INIT = 10


def _gray(image: np.ndarray) -> np.ndarray:
    return (image @ LUMA).astype(np.float32)


def _sobel_magnitude(gray: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=5)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=5)
    return np.sqrt(gx * gx + gy * gy)


def authors_middle_step(
    image: np.ndarray, stage1: np.ndarray, c1: float = 0.5, c2: float = 0.5,
    n_init: int = AUTHORS_N_INIT, seed: int = 0,
) -> Tuple[np.ndarray, Dict[str, float]]:
    """HxWx3 float32 I and B1 in [0, 1] -> HxWx9 stage-2 input, and the K-means centres."""
    from sklearn.cluster import KMeans

    g_i = _sobel_magnitude(_gray(image))
    g_b = _sobel_magnitude(_gray(stage1))
    g_r = _sobel_magnitude(_gray(image - stage1))
    confidence = np.log(g_r / (g_b + EPS) + 1) * (g_i > 1)
    values = confidence[confidence != 0].reshape(-1, 1)
    if np.unique(values).size < 2:
        high = low = float(values.mean()) if values.size else 0.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            centres = KMeans(n_clusters=2, n_init=n_init, random_state=seed).fit(values).cluster_centers_
        high, low = float(centres.max()), float(centres.min())
    mask_reflection = confidence > high - c1 * (high - low)
    mask_background = (confidence > 0) & (confidence < low + c2 * (high - low))
    stage2_input = np.concatenate(
        [image, image * mask_background[:, :, None], image * mask_reflection[:, :, None]], axis=2
    )
    return stage2_input.astype(np.float32), {"high": high, "low": low, "edges": float(values.size)}


def _checkpoint_networks(checkpoint: Any) -> Tuple[Any, Any]:
    from dereflect.train.checkpoint import load_checkpoint
    from dereflect.train.models.common import PaddedModel

    loaded = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    have = loaded.metadata["networks"]
    second = "stage2" if "stage2" in have else "generator"
    return PaddedModel(loaded.build("stage1")), PaddedModel(loaded.build(second))


class AuthorsPipeline:
    """Stage 1 -> host -> OpenCV + scikit-learn -> device -> stage 2, eager FP32, one frame at a time."""

    stages = ("upload", "stage1", "to_host", "middle", "to_device", "stage2", "download")

    def __init__(self, checkpoint: Any, device: str = "cuda", c1: float = 0.5, c2: float = 0.5,
                 n_init: int = AUTHORS_N_INIT) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        stage1, stage2 = _checkpoint_networks(checkpoint)
        self.stage1 = stage1.float().eval().to(self.device)
        self.stage2 = stage2.float().eval().to(self.device)
        self.c1, self.c2, self.n_init = c1, c2, n_init

    def timer(self) -> StageTimer:
        cuda = self.device.type == "cuda"
        return MonotonicTimer(sync=self._torch.cuda.synchronize if cuda else None)

    def run(self, image: np.ndarray, timer: StageTimer) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            with timer.stage("upload"):
                frame = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None])).to(self.device)
            with timer.stage("stage1"):
                stage1 = self.stage1(frame)
            with timer.stage("to_host"):
                stage1_host = stage1.clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
            with timer.stage("middle"):
                stage2_input, _ = authors_middle_step(image, stage1_host, self.c1, self.c2, self.n_init)
            with timer.stage("to_device"):
                batch = torch.from_numpy(np.ascontiguousarray(stage2_input.transpose(2, 0, 1)[None]))
                batch = batch.to(self.device)
            with timer.stage("stage2"):
                out = self.stage2(batch)
            with timer.stage("download"):
                return out.clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()


def time_calls(call: Callable[[], Any], warmup: int, runs: int) -> List[float]:
    """Host-clock samples (ms) of ``call`` after ``warmup`` untimed calls."""
    import time

    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _device_samples(call: Callable[[], Any], make_timer: Callable[[], StageTimer], warmup: int,
                    runs: int) -> List[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        timer = make_timer()
        with timer.stage("call"):
            call()
        samples.append(timer.read()["call"])
    return samples


def middle_step_samples(
    image: np.ndarray, stage1: np.ndarray, device: str, warmup: int, runs: int,
    authors_runs: Optional[int] = None, c1: float = 0.5, c2: float = 0.5,
) -> Dict[str, Any]:
    """Samples (ms) of the middle step on one frame, per implementation; None where unavailable.

    GPU implementations are timed with CUDA events (device time, tensors already on the GPU);
    CPU ones with the host clock. ``authors_runs`` (default ``runs``) bounds the slow
    scikit-learn step.
    """
    import torch
    from dereflect.middle_step.cpu import middle_step_cpu
    from dereflect.middle_step.torch_ops import stage2_input_torch

    results: Dict[str, Any] = {
        "cpu step (middle_step_cpu)": time_calls(lambda: middle_step_cpu(image, stage1, c1, c2), warmup, runs),
        "authors (OpenCV + scikit-learn)": time_calls(
            lambda: authors_middle_step(image, stage1, c1, c2), min(warmup, 1), authors_runs or runs),
    }
    target = torch.device(device)
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None])).to(target)
    stage1_t = torch.from_numpy(np.ascontiguousarray(stage1.transpose(2, 0, 1)[None])).to(target)
    if target.type == "cuda":
        def make_timer() -> StageTimer:
            return CudaEventTimer(torch)
    else:
        make_timer = MonotonicTimer
    results[f"torch step ({target.type})"] = _device_samples(
        lambda: stage2_input_torch(image_t, stage1_t, c1, c2), make_timer, warmup, runs)
    results["fused kernel (cupy)"] = None
    if target.type == "cuda":
        try:
            import cupy
            from dereflect.middle_step.cuda import CupyConfidence
        except ImportError:
            return results
        kernel = CupyConfidence()
        image_c, stage1_c = cupy.asarray(image_t), cupy.asarray(stage1_t)
        stream = torch.cuda.current_stream().cuda_stream
        results["fused kernel (cupy)"] = _device_samples(
            lambda: kernel(image_c, stage1_c, c1=c1, c2=c2, stream=stream), make_timer, warmup, runs)
    return results


def side_by_side(
    export_dir: os.PathLike, sizes: Sequence[Tuple[str, int, int]], checkpoint: Optional[os.PathLike] = None,
    backend: str = "onnxruntime", device: str = "cpu", precision: str = "auto", warmup: int = 1, runs: int = 5,
) -> Dict[str, Any]:
    """Per size: stats per stage of this SDK's staged pipeline and of the authors' structure, interleaved.

    ``checkpoint`` defaults to the file the manifest names, looked up in the export directory; an
    export without it (the bundled models) is brought back as one (``dereflect train from-export``).
    """
    from dereflect.errors import InputError

    manifest = open_source(export_dir).manifest
    if manifest.method != "rm2s":
        raise InputError(f"{export_dir}: a {manifest.method} model; the authors' structure is RM2S's "
                         "(stage 1, host middle step, stage 2): give an RM2S export such as rm2s-lite")
    checkpoint = Path(checkpoint) if checkpoint else manifest.directory / manifest.checkpoint.get("file", "")
    with tempfile.TemporaryDirectory(prefix="dereflect-authors-") as work:
        # Opened first where it needs no checkpoint: a wrong device or backend is refused in a moment.
        sdk = None if backend == "torch" else BenchPipeline(export_dir, backend, device=device, precision=precision)
        if not checkpoint.is_file():
            from dereflect.export.to_checkpoint import checkpoint_from_export

            checkpoint, _ = checkpoint_from_export(export_dir, Path(work) / "from_export.safetensors")
        # Both read the checkpoint as they open: the rebuilt one may go after.
        if sdk is None:
            sdk = BenchPipeline(export_dir, backend, device=device, precision=precision, checkpoint=checkpoint)
        authors = AuthorsPipeline(checkpoint, device=device if device != "auto" else "cuda")
    results: Dict[str, Any] = {"sdk_backend": sdk.description}
    try:
        for label, height, width in sizes:
            image = synthetic_frame(height, width)
            samples: Dict[str, Dict[str, List[float]]] = {"sdk": {}, "authors": {}}
            for index in range(warmup + runs):
                for name, pipeline in (("sdk", sdk), ("authors", authors)):
                    timer = pipeline.timer()
                    pipeline.run(image, timer)
                    if index >= warmup:
                        for stage, value in timer.read().items():
                            samples[name].setdefault(stage, []).append(value)
            stats = {name: {stage: summarize(v) for stage, v in values.items()} for name, values in samples.items()}
            stats["ratio"] = stats["authors"]["total"]["median_ms"] / stats["sdk"]["total"]["median_ms"]
            results[label] = stats
    finally:
        sdk.close()
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="This SDK's pipeline vs the authors' structure, same weights.")
    parser.add_argument("export_dir", help="export directory (its checkpoint is used for the authors' side)")
    parser.add_argument("--checkpoint", help="checkpoint file (default: the one the manifest names, in EXPORT_DIR)")
    parser.add_argument("--sizes", default="256,720p", help="frame sizes, as bench takes them (default 256,720p)")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "tensorrt"])
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda or cuda:N (default cpu; the tensorrt "
                        "backend needs a GPU)")
    parser.add_argument("--precision", default="auto", help="the SDK side's precision: auto, fp32 or fp16 "
                        "(default auto; the authors' side is FP32)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per side and size (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side and size, interleaved (default 5)")
    args = parser.parse_args(argv)
    from dereflect.errors import DereflectError

    try:
        if args.runs < 1 or args.warmup < 0:
            raise DereflectError(f"--runs must be at least 1 and --warmup at least 0, got {args.runs} and "
                                 f"{args.warmup}")
        results = side_by_side(args.export_dir, parse_sizes(args.sizes), args.checkpoint, args.backend,
                               args.device, args.precision, args.warmup, args.runs)
    except DereflectError as exc:
        print(f"authors_baseline: error: {exc}", file=sys.stderr)
        return 2
    print(f"SDK: {results.pop('sdk_backend')}; authors: eager FP32 on {args.device}, OpenCV + scikit-learn "
          f"KMeans(n_init={AUTHORS_N_INIT}) on the host; medians in ms over {args.runs} interleaved runs")
    print("| size | side | " + " | ".join(AuthorsPipeline.stages) + " | total | authors / SDK |")
    print("|---" * (len(AuthorsPipeline.stages) + 4) + "|")
    for label, stats in results.items():
        for side in ("sdk", "authors"):
            cells = [f"{stats[side][stage]['median_ms']:.3g}" if stage in stats[side] else "-"
                     for stage in AuthorsPipeline.stages]
            ratio = f"{stats['ratio']:.2f}x" if side == "authors" else ""
            print(f"| {label} | {side} | " + " | ".join(cells) + f" | {stats[side]['total']['median_ms']:.3g} | "
                  f"{ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
