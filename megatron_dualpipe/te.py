"""Transformer Engine probes: every question "is TE here, which version" asks this module.

Transformer Engine is optional (`pip install 'megatron_dualpipe[gpu]'`); on a CPU machine none
of these import it successfully and the callers fall back to Megatron-Core's local layers.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util


def te_available() -> bool:
    """`transformer_engine.pytorch` imports (TE layer specs, recompute, FP8)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def te_installed() -> bool:
    """Whether `transformer_engine` is installed, looked up without importing it (launcher
    checks, which must not pay TE's import)."""
    return importlib.util.find_spec("transformer_engine") is not None


def te_fused_adam_available() -> bool:
    """Transformer Engine's FusedAdam (the only Adam with BF16 moments in Megatron-Core 0.19)."""
    try:
        from transformer_engine.pytorch.optimizers import FusedAdam  # noqa: F401
    except Exception:
        return False
    return True


def te_version() -> str | None:
    """Transformer Engine's version from the installed distribution, None if not installed."""
    if not te_installed():
        return None
    for dist in ("transformer-engine", "transformer_engine", "transformer-engine-torch",
                 "transformer-engine-cu13", "transformer-engine-cu12"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0"  # importable but no metadata: treat as unknown/too old


def fp8_state_manager():
    """TE's `FP8GlobalStateManager` (moved from `.fp8` to `.quantization` in TE 2.x)."""
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    return FP8GlobalStateManager
