"""Target: `DistributedOptimizer.__init__`, run with CUDA type names for CPU parameters."""

from __future__ import annotations

from megatron_dualpipe.patches.base import Patch
from megatron_dualpipe.patches.cpu_tensor_types import with_cuda_type_names


def make_patch() -> Patch:
    return Patch(
        name="distrib_optimizer_init",
        module="megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        replacements={"__init__": with_cuda_type_names},
    )
