"""Target: `Float16OptimizerWithFloat16Params.__init__`, with CUDA type names for CPU params."""

from __future__ import annotations

from megatron_dualpipe.patches.base import Patch
from megatron_dualpipe.patches.cpu_tensor_types import with_cuda_type_names


def make_patch() -> Patch:
    return Patch(
        name="float16_optimizer_init",
        module="megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params",
        replacements={"__init__": with_cuda_type_names},
    )
