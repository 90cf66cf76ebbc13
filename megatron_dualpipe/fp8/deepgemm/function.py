"""The routed experts' grouped GEMM y_e = x_e W_e^T on DeepGEMM's FP8 kernels, as one autograd
function for all local experts.

* forward: x (BF16, rows grouped by expert) padded per expert to the M alignment, quantized
  1x128, `m_grouped_fp8_gemm_nt_contiguous` against the cached 128x128 W, padding sliced off;
  the wgrad operand (x in 128x1 tiles along the tokens, per expert, K-major) is quantized here
  too and saved instead of x (FP8, like TE's columnwise copy);
* dgrad: dy padded and quantized 1x128, the same m-grouped kernel against W^T;
* wgrad: `k_grouped_fp8_gemm_nt_contiguous` accumulating dW_e = dy_e^T x_e in FP32 into the
  experts' `main_grad` (fused accumulation) or into a zeroed buffer returned as `param.grad`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dualpipe.fp8.deepgemm import grads as grads_mod
from megatron_dualpipe.fp8.deepgemm import kernels
from megatron_dualpipe.fp8.deepgemm.layout import ExpertRows
from megatron_dualpipe.fp8.deepgemm.quantize import ActivationQuantizer, QuantizedWeights


@dataclass(frozen=True)
class GemmOptions:
    """`accumulate`: add weight gradients into `main_grad` (TE's `fuse_wgrad_accumulation`);
    `quantizer`: activation quantization kernels, `torch`, `te`, `te-rows` or `triton`
    (quantize.py)."""

    accumulate: bool = False
    quantizer: str = "torch"


def grouped_fp8_gemm(x, m_splits, weights, quantized: QuantizedWeights,
                     options: GemmOptions = GemmOptions()):
    """y [..., N] with y_e = x_e W_e^T for the rows of each expert e.

    x: [..., K] BF16 whose flattened rows are grouped by expert, `m_splits` (host ints) rows
    each; weights: G parameters [N, K] or one [G, N, K]; `quantized`: their FP8 copy
    (`WeightCache.get`)."""
    weights = tuple(weights)
    q, _ = quantized.w
    G, N, K = q.shape
    if x.dtype != torch.bfloat16:
        raise TypeError(f"DeepGEMM experts take BF16 activations, got {x.dtype}")
    if x.size(-1) != K or len(m_splits) != G:
        raise ValueError(f"x {tuple(x.shape)} / {len(m_splits)} splits do not match "
                         f"{G} experts of [{N}, {K}]")
    rows = x.reshape(-1, K)
    if sum(int(s) for s in m_splits) != rows.size(0):
        raise ValueError(f"m_splits {list(m_splits)} do not add up to {rows.size(0)} rows")
    plan = ExpertRows.build(m_splits, kernels.alignment(), x.device)
    y = ExpertGemm.apply(rows, plan, quantized, options, *weights)
    return y.view(*x.shape[:-1], N)


class ExpertGemm(torch.autograd.Function):
    """autograd of `grouped_fp8_gemm` (inputs: x, ExpertRows, QuantizedWeights, GemmOptions,
    *weights)."""

    @staticmethod
    def forward(ctx, x, plan, quantized, options, *weights):
        dg = kernels.deep_gemm()
        G, N, _ = quantized.w[0].shape
        need_wgrad = any(ctx.needs_input_grad[4:])
        order, ctx.target = (grads_mod.wgrad_target(weights, options.accumulate, G)
                             if need_wgrad else (None, None))
        ctx.plan, ctx.quantized, ctx.options, ctx.order = plan, quantized, options, order
        ctx.weights = weights
        ctx.x_k = None
        y = torch.empty(plan.num_padded, N, dtype=torch.bfloat16, device=x.device)
        if plan.num_padded:
            quantizer = ActivationQuantizer(options.quantizer)
            xq, ctx.x_k = quantizer(plan.pad(x), plan.padded, order)
            kernels.m_grouped_nt(xq, quantized.w, y, plan.m_indices, dg)
        return plan.unpad(y)

    @staticmethod
    def backward(ctx, dy):
        dg = kernels.deep_gemm()
        plan, quantized = ctx.plan, ctx.quantized
        G, N, K = quantized.w[0].shape
        dx = dyq = dy_k = None
        if plan.num_padded:
            quantizer = ActivationQuantizer(ctx.options.quantizer)
            dyq, dy_k = quantizer(plan.pad(dy.to(torch.bfloat16)), plan.padded, ctx.order)
        if ctx.needs_input_grad[0]:
            dxp = torch.empty(plan.num_padded, K, dtype=torch.bfloat16, device=dy.device)
            if plan.num_padded:
                kernels.m_grouped_nt(dyq, quantized.wt, dxp, plan.m_indices, dg)
            dx = plan.unpad(dxp)
        wgrads = [None] * len(ctx.weights)
        if ctx.order is not None:
            wgrads = _wgrad(ctx, dy_k, (G, N, K), dg, dy.device)
        ctx.x_k = None
        return (dx, None, None, None, *wgrads)


def _wgrad(ctx, dy_k, shape, dg, device) -> list:
    """Run the k-grouped wgrad into main_grad or a fresh buffer; autograd's weight grads."""
    plan, order, weights, target = ctx.plan, ctx.order, ctx.weights, ctx.target
    ks, ks_tensor = plan.group_sizes(order)
    buffer = target if target is not None else torch.zeros(shape, dtype=torch.float32,
                                                           device=device)
    if plan.num_padded:
        kernels.k_grouped_nt_accumulate(dy_k, ctx.x_k, buffer, ks, ks_tensor, dg)
    if ctx.options.accumulate:
        if target is None:
            main_grads = grads_mod.expert_main_grads(weights)
            for i, g in enumerate(order):
                main_grads[g].add_(buffer[i])
        return grads_mod.finish_fused(weights)
    if len(weights) == 1 and weights[0].dim() == 3:
        return [buffer.to(weights[0].dtype)]
    return [buffer[g].to(w.dtype) for g, w in enumerate(weights)]
