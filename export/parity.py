"""Parity of an exported ONNX file with the PyTorch module it came from (ONNX Runtime, CPU).

Both run in float32 on the same inputs: uniform random images at several sizes (odd sizes
and sizes that are not multiples of the network's stride, so the in-graph padding and crop
are exercised) and natural-looking images. The tolerance is on the largest absolute
difference divided by the output's value range: :data:`FP32_TOLERANCE` (1e-4) by default.
Measured on the project's models it is about 1e-6 (different kernels sum in different orders).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
from dereflect.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

FP32_TOLERANCE = 1e-4
#: (N, H, W) of the random-image cases.
DEFAULT_SIZES = ((1, 96, 128), (2, 77, 101), (1, 45, 150))

Case = Tuple[str, Dict[str, np.ndarray]]


@dataclass
class ParityRow:
    network: str
    kind: str
    shape: Tuple[int, ...]
    output: str
    max_abs: float
    mean_abs: float
    passed: bool


@dataclass
class ParityReport:
    """Rows per network, case and output; ``passed`` when every row is within tolerance."""

    tolerance: float
    rows: List[ParityRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def worst(self) -> float:
        return max((r.max_abs for r in self.rows), default=0.0)

    def format(self) -> str:
        header = (f"{'network':<10} {'inputs':<8} {'shape':<18} {'output':<12} {'max abs':>10} "
                  f"{'mean abs':>10}  result")
        title = f"parity: ONNX Runtime (CPU, FP32) vs PyTorch; max |diff| / range <= {self.tolerance:g}"
        lines = [title, header]
        for r in self.rows:
            lines.append(f"{r.network:<10} {r.kind:<8} {str(list(r.shape)):<18} {r.output:<12} "
                         f"{r.max_abs:>10.2e} {r.mean_abs:>10.2e}  {'pass' if r.passed else 'FAIL'}")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, object]:
        return {"tolerance": self.tolerance, "passed": self.passed, "worst_max_abs": self.worst,
                "cases": len({(r.network, r.kind, r.shape) for r in self.rows})}


def random_cases(input_name: str, channels: int, sizes: Sequence[Tuple[int, int, int]] = DEFAULT_SIZES,
                 seed: int = 0) -> List[Case]:
    """Uniform [0, 1) inputs at each (N, H, W) of ``sizes``."""
    rng = np.random.default_rng(seed)
    return [("random", {input_name: rng.random((n, channels, h, w), dtype=np.float32)}) for n, h, w in sizes]


def _torch_outputs(module: nn.Module, feed: Dict[str, np.ndarray], names: Sequence[str]) -> Dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        result = module(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feed.values()])
    if isinstance(result, torch.Tensor):
        result = (result,)
    if len(result) != len(names):
        raise ModelError(f"the PyTorch module returned {len(result)} outputs, the ONNX file has {len(names)}")
    return {name: value.detach().cpu().numpy() for name, value in zip(names, result)}


def check_parity(
    network: str,
    module: nn.Module,
    onnx_path: str,
    cases: Sequence[Case],
    data_ranges: Optional[Dict[str, float]] = None,
    tolerance: float = FP32_TOLERANCE,
    report: Optional[ParityReport] = None,
) -> ParityReport:
    """Compare ``module`` (eval mode, the same wrapper that was exported) with ``onnx_path`` on ``cases``.

    Appends to ``report`` when given (one report for all networks of an export).
    """
    from dereflect.backends.onnxruntime import OnnxRuntimeRunner
    from dereflect.tools.compare import compare_outputs

    runner = OnnxRuntimeRunner(onnx_path, device="cpu", name=network).activate()
    report = report if report is not None else ParityReport(tolerance=tolerance)
    ranges = data_ranges or {}
    for kind, feed in cases:
        expected = _torch_outputs(module, feed, runner.output_names)
        shape = tuple(next(iter(feed.values())).shape)
        try:
            differences = compare_outputs(expected, runner.infer(feed), ranges)
        except ModelError as exc:
            raise ModelError(f"{network}: ONNX Runtime and PyTorch differ for input {shape}: {exc}") from None
        for name, diff in differences.items():
            ok = bool(np.isfinite(diff.max_abs) and diff.max_error <= tolerance)
            report.rows.append(ParityRow(network, kind, shape, name, diff.max_abs, diff.mean_abs, ok))
    return report
