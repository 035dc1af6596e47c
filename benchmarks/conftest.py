"""pytest-benchmark suites for the CPU parts; ``--bench-quick`` keeps only the smallest size.

    python -m pytest benchmarks --benchmark-enable                      # measure
    python -m pytest benchmarks --bench-quick --benchmark-enable \\
        --benchmark-min-rounds=2 --benchmark-max-time=0 --benchmark-warmup=off   # CI: prove they run

The project's pytest options disable benchmarks by default (``--benchmark-disable`` runs each
function once), hence ``--benchmark-enable``.
"""

from __future__ import annotations

import pytest

SIZES = {"256": (256, 256), "720p": (720, 1280)}
QUICK_SIZES = ("256",)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-quick", action="store_true", help="benchmark the smallest size only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "size" in metafunc.fixturenames:
        labels = QUICK_SIZES if metafunc.config.getoption("--bench-quick") else tuple(SIZES)
        metafunc.parametrize("size", [SIZES[label] for label in labels], ids=list(labels))
