"""One comparator for every "does this run match that one" question.

Export parity (ONNX Runtime against PyTorch), the FP16 file against the FP32 one, and
``dereflect export verify`` (a backend on this device against the goldens or against ONNX
Runtime on the user's images) all reduce to the same measurement: per output, over cases,
the worst PSNR and the largest absolute difference, both relative to the output's value
range. :func:`compare_outputs` measures one case; :class:`Comparison` accumulates cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

import numpy as np
from dereflect.errors import ModelError
from dereflect.tools.metrics import psnr


@dataclass
class OutputDifference:
    """One output of one case: PSNR (dB; -inf where the tested run is not finite) and differences."""

    psnr_db: float
    max_abs: float
    mean_abs: float
    #: ``max_abs`` as a fraction of the output's value range
    max_error: float


def compare_outputs(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray],
                    ranges: Optional[Mapping[str, float]] = None) -> Dict[str, OutputDifference]:
    """Per output name of ``expected``: how far ``actual`` is from it (see :class:`OutputDifference`)."""
    result = {}
    for name, reference in expected.items():
        if name not in actual:
            raise ModelError(f"output {name!r} is missing from the run compared (it has {sorted(actual)})")
        value = np.asarray(actual[name])
        if value.shape != np.asarray(reference).shape:
            raise ModelError(f"output {name!r} has shape {value.shape}, expected {np.asarray(reference).shape}")
        peak = float((ranges or {}).get(name, 1.0)) or 1.0
        diff = np.abs(np.asarray(reference, np.float64) - value.astype(np.float64))
        finite = bool(np.all(np.isfinite(value)))
        max_abs = float(diff.max()) if diff.size else 0.0
        result[name] = OutputDifference(
            psnr_db=psnr(reference, value, peak) if finite else float("-inf"),
            max_abs=max_abs if finite else float("inf"),
            mean_abs=float(diff.mean()) if diff.size and finite else (0.0 if finite else float("inf")),
            max_error=(max_abs / peak) if finite else float("inf"),
        )
    return result


@dataclass
class Comparison:
    """The worst of each output over many cases."""

    worst: Dict[str, OutputDifference] = field(default_factory=dict)

    def add(self, case: Mapping[str, OutputDifference]) -> None:
        for name, diff in case.items():
            seen = self.worst.get(name)
            if seen is None:
                self.worst[name] = OutputDifference(diff.psnr_db, diff.max_abs, diff.mean_abs, diff.max_error)
                continue
            seen.psnr_db = min(seen.psnr_db, diff.psnr_db)
            seen.max_abs = max(seen.max_abs, diff.max_abs)
            seen.mean_abs = max(seen.mean_abs, diff.mean_abs)
            seen.max_error = max(seen.max_error, diff.max_error)

    def to_dict(self) -> Dict[str, Dict[str, float]]:
        return {name: {"psnr_db": d.psnr_db, "max_abs": d.max_abs} for name, d in self.worst.items()}
