"""Fused weight-gradient accumulation for TE GEMMs (`model.gradient_accumulation_fusion`).

Without it every TE weight GEMM writes a BF16 gradient that Megatron's DDP hook then adds into
the FP32 `main_grad` buffer: one extra elementwise pass per weight and micro-batch (about 8% of
a DeepSeek-sized proxy step on an H200, see docs/benchmarks.md). Transformer Engine can instead
accumulate the GEMM straight into `weight.main_grad` (`fuse_wgrad_accumulation`), marking the
weight `grad_added_to_main_grad` so the DDP hook skips the add.

Megatron enables this only through `TransformerConfig.gradient_accumulation_fusion`, which also
switches its own linears (the output head) to apex's `fused_weight_gradient_mlp_cuda` and fails
at build time without apex. Here only the TE modules are switched, after DDP has created the
`main_grad` buffers; TE reads the switch at every forward.
"""

from __future__ import annotations

from collections.abc import Iterable

from megatron_dualpipe.fp8.modules import is_te_gemm
from megatron_dualpipe.schedules.te_wgrad import weight_params


def fuse_te_wgrad_accumulation(chunks: Iterable) -> list[str]:
    """Switch every TE GEMM module of the DDP-wrapped `chunks` whose weights have a
    `main_grad` to fused accumulation; returns the module names."""
    names = []
    for i, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            if not is_te_gemm(module) or not hasattr(module, "fuse_wgrad_accumulation"):
                continue
            weights = weight_params(module)
            if weights and all(hasattr(w, "main_grad") for w in weights):
                module.fuse_wgrad_accumulation = True
                names.append(f"chunk{i}.{name}")
    return names
