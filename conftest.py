"""Test-suite setup of tests/ and benchmarks/tests/: `gpu` tests are skipped without CUDA;
`slow` is only a marker.

    python -m pytest -q            # everything this machine can run
    python -m pytest -q -m "not slow"
    python -m pytest -q -m gpu     # on a GPU machine

The repository root is on `sys.path` (pytest's `pythonpath = .` in pyproject.toml), so the
suite runs from a checkout without installing the package.
"""

from __future__ import annotations

import functools
import os

import pytest

# One intra-op thread per process, as a real multi-rank job (and the CLI's local launcher)
# has: the gloo workers of `testing.run_distributed` import torch before they could read
# OMP_NUM_THREADS themselves, so they inherit it from here. Without it N workers each start
# one thread per core (measured on 2 cores: a 2-process DualPipe test used 73 s of CPU instead
# of 43 s). An OMP_NUM_THREADS already set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """None when a CUDA device can be used, otherwise why not."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is a hard dependency
        return f"needs CUDA: torch is not importable ({err})"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"needs CUDA: torch {torch.__version__} ({build}) sees no CUDA device"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(skip)


def pytest_report_header(config):
    reason = cuda_unavailable_reason()
    return "gpu tests: " + ("run (CUDA available)" if reason is None else f"skipped ({reason})")
