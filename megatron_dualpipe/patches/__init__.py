"""The few places Megatron-Core must be patched.

Each file holds one target; every patch is version-guarded (megatron-core 0.19.x) and
reversible. The CPU patches (gloo) are applied only when CUDA is absent: `apply_cpu_patches()`
applies them all, `revert_cpu_patches()` restores Megatron-Core as it was. Feature patches
(`enable_*`) are applied by the features that need them; `revert_feature_patches()` undoes them.
"""

from __future__ import annotations

import torch

from megatron_dualpipe.patches import (
    alltoall_splits,
    clip_grads,
    cuda_calls,
    distrib_optimizer_init,
    float16_optimizer_init,
    rng_tracker,
)
from megatron_dualpipe.patches.base import Patch

_PATCHES: list[Patch] = []


def cpu_patches() -> list[Patch]:
    """The CPU patches, created once (applying is idempotent)."""
    if not _PATCHES:
        _PATCHES.extend(cuda_calls.make_patches())
        _PATCHES.append(rng_tracker.make_patch())
        _PATCHES.append(alltoall_splits.make_patch())
        _PATCHES.append(clip_grads.make_patch())
        _PATCHES.append(distrib_optimizer_init.make_patch())
        _PATCHES.append(float16_optimizer_init.make_patch())
    return _PATCHES


def apply_cpu_patches(force: bool = False) -> bool:
    """Apply the CPU patches when CUDA is absent (or `force`). Returns whether they are on."""
    if torch.cuda.is_available() and not force:
        return False
    for patch in cpu_patches():
        patch.apply()
    return True


_FEATURE_PATCHES: dict[str, list[Patch]] = {}


def _feature(name: str, make) -> list[Patch]:
    if name not in _FEATURE_PATCHES:
        _FEATURE_PATCHES[name] = make()
    for patch in _FEATURE_PATCHES[name]:
        patch.apply()
    return _FEATURE_PATCHES[name]


def enable_deferred_wgrad() -> None:
    """Megatron linears defer their weight GEMM inside a DualPipe zero-bubble B (CPU and GPU)."""
    from megatron_dualpipe.patches import deferred_wgrad_linear

    _feature("deferred_wgrad_linear", lambda: [deferred_wgrad_linear.make_patch()])


def enable_schedule_selection() -> None:
    """Megatron's get_forward_backward_func() answers with the selected DualPipe schedule."""
    from megatron_dualpipe.patches import forward_backward_func

    _feature("forward_backward_func", forward_backward_func.make_patches)


def enable_routing_map_copy() -> None:
    """Router padding for FP8 pads a copy of the routing map (needed with the fused router)."""
    from megatron_dualpipe.patches import pad_routing_map

    _feature("pad_routing_map", lambda: [pad_routing_map.make_patch()])


def revert_feature_patches() -> None:
    for patches in _FEATURE_PATCHES.values():
        for patch in reversed(patches):
            patch.revert()


def revert_cpu_patches() -> None:
    for patch in reversed(cpu_patches()):
        patch.revert()
