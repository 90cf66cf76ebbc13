"""What the blockwise-FP8 GPU tests need, in one place (imported by the test modules)."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def hopper_with_te() -> str | None:
    """Why the Hopper + Transformer Engine GPU tests cannot run here (None: they can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability(0) < (9, 0):
        return "blockwise FP8 needs a Hopper GPU"
    if importlib.util.find_spec("transformer_engine") is None:
        return "Transformer Engine is not installed"
    return None


REASON = hopper_with_te()
needs_hopper = pytest.mark.skipif(REASON is not None, reason=str(REASON))
