"""Test-suite setup: `gpu` tests are skipped without CUDA; `slow` is only a marker.

    python -m pytest -q            # everything this machine can run
    python -m pytest -q -m "not slow"
    python -m pytest -q -m gpu     # on a GPU machine

The repository root is on `sys.path` (pytest's `pythonpath = .` in pyproject.toml), so the
suite runs from a checkout without installing the package.
"""

from __future__ import annotations

import functools

import pytest


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
