"""Megatron's own linear layers with a deferrable weight gradient (zero-bubble W split).

Target: `megatron.core.tensor_parallel.layers.linear_with_grad_accumulation_and_async_allreduce`,
the function Column/RowParallelLinear call at every forward. For the plain case (no sequence
parallelism, no gradient-accumulation fusion, no grad-output buffer, no GTP) it runs
`DeferrableLinear`, whose backward queues the weight GEMM while a DualPipe B is collecting and
otherwise computes it at once, with the same numerics; every other case calls the original.
Applied by the DualPipe schedules on CPU and GPU (TE linears use their own `backward_dw`).
"""

from __future__ import annotations

from megatron_dualpipe.patches.base import Patch
from megatron_dualpipe.schedules.wgrad import DeferrableLinear


def _make(original):
    def linear_with_grad_accumulation_and_async_allreduce(
        input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
        grad_output_buffer=None, wgrad_deferral_limit=0, tp_group=None, gtp_remat_size=1,
    ):
        plain = not (
            sequence_parallel or gradient_accumulation_fusion or grad_output_buffer is not None
            or gtp_remat_size > 1
        )
        if plain and weight.requires_grad:
            return DeferrableLinear.apply(input, weight, bias, allreduce_dgrad, tp_group)
        return original(
            input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
            sequence_parallel, grad_output_buffer, wgrad_deferral_limit, tp_group,
            gtp_remat_size,
        )

    linear_with_grad_accumulation_and_async_allreduce.warned = True
    return linear_with_grad_accumulation_and_async_allreduce


def make_patch() -> Patch:
    return Patch(
        name="deferred_wgrad_linear",
        module="megatron.core.tensor_parallel.layers",
        replacements={"linear_with_grad_accumulation_and_async_allreduce": _make},
    )
