"""Grouped (MoE expert) GEMM routes of `gemm_routes`: G local experts with weights [G, N, K],
tokens sorted by expert (uneven splits, +-30%): fwd y = x W_g^T, dgrad dx = dy W_g, wgrad
dW_g = dy_g^T x_g, through BF16 torch._grouped_mm, Transformer Engine's GroupedLinear, DeepGEMM's
m-grouped / k-grouped contiguous kernels and torch's scaled_grouped_mm. Specs as in routes_dense.
"""

from __future__ import annotations

import math

from .blockwise_quant import (
    quant_1x128,
    quant_groups_128x128,
    quant_k_major_groups,
    te_block_quantizer,
    te_quantize_1x128,
)
from .common import rel_err
from .routes_dense import BF16_BOUND, FP8_BOUND, _spec, _with_scale_view, te_specs


class GroupedCase:
    """Expert weights, routed tokens and float32 references of one grouped shape."""

    def __init__(self, G: int, splits: list[int], K: int, N: int, seed: int, refs: bool = True):
        import torch

        g = torch.Generator(device="cuda").manual_seed(seed)
        self.G, self.K, self.N, self.splits = G, K, N, list(splits)
        self.M = sum(splits)
        self.Ws = (torch.randn(G, N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
        self.x = torch.randn(self.M, K, device="cuda", generator=g, dtype=torch.bfloat16)
        self.dy = torch.randn(self.M, N, device="cuda", generator=g, dtype=torch.bfloat16)
        self.offs = torch.tensor(_ends(splits), device="cuda", dtype=torch.int32)
        self.flops = 2.0 * self.M * K * N
        if refs:
            ys, dxs, dws = [], [], []
            for w, s0, s in zip(self.Ws, _starts(splits), splits, strict=True):
                xg, dyg, wd = self.x[s0:s0 + s].double(), self.dy[s0:s0 + s].double(), w.double()
                ys.append((xg @ wd.t()).float())
                dxs.append((dyg @ wd).float())
                dws.append((dyg.t() @ xg).float())
            self.y_ref, self.dx_ref = torch.cat(ys), torch.cat(dxs)
            self.dw_ref = torch.stack(dws)


def _starts(splits):
    return [sum(splits[:i]) for i in range(len(splits))]


def _ends(splits):
    return [sum(splits[:i + 1]) for i in range(len(splits))]


def bf16_grouped_mm(c: GroupedCase) -> dict:
    import torch

    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm")
    out = {}

    def fwd():
        out["y"] = torch._grouped_mm(c.x, c.Ws.transpose(-2, -1), offs=c.offs)

    def dgrad():
        out["dx"] = torch._grouped_mm(c.dy, c.Ws, offs=c.offs)

    def wgrad():  # 2d x 2d with offsets along the reduction (token) dimension -> [G, N, K]
        out["dw"] = torch._grouped_mm(c.dy.t(), c.x, offs=c.offs)

    return {
        "fwd": _spec(fwd, lambda: rel_err(out["y"], c.y_ref), c.flops, BF16_BOUND),
        "dgrad": _spec(dgrad, lambda: rel_err(out["dx"], c.dx_ref), c.flops, BF16_BOUND),
        "wgrad": _spec(wgrad, lambda: rel_err(out["dw"], c.dw_ref), c.flops, BF16_BOUND),
    }


def te_grouped(c: GroupedCase, recipe_name: str, args) -> dict:
    """TE GroupedLinear (one GEMM per expert) under the recipe's autocast, weights cached
    (gemm._bench_te_grouped for the total)."""
    import torch
    import transformer_engine.pytorch as te

    from .gemm import _bench_te_grouped

    layer = te.GroupedLinear(c.G, c.K, c.N, bias=False, params_dtype=torch.bfloat16,
                             device="cuda")
    params = [p for _, p in layer.named_parameters()]
    with torch.no_grad():
        if len(params) == c.G:
            for p, w in zip(params, c.Ws, strict=True):
                p.copy_(w)
        else:
            params[0].copy_(c.Ws.view_as(params[0]))
    x = c.x.detach().clone().requires_grad_(True)
    variant = {"name": recipe_name, "recipe": recipe_name, "cached": True}
    return te_specs(c, recipe_name,
                    lambda first: layer(c.x, c.splits, is_first_microbatch=first),
                    lambda: _bench_te_grouped(te, c.Ws, x, c.dy, c.splits, variant, args))


def deepgemm_alignment(dg) -> int:
    """Rows per expert are padded to this (DeepGEMM's M/K alignment, and 128 for the k-grouped
    wgrad kernel's 1x128 scales along the tokens)."""
    try:
        align = int(dg.get_mk_alignment_for_contiguous_layout())
    except Exception:  # noqa: BLE001 - older releases: fixed 128
        align = 128
    return math.lcm(align, 128)


def deepgemm_grouped(c: GroupedCase, dg, use_te_quantizer: bool = True) -> dict:
    """DeepGEMM SM90: fwd / dgrad `m_grouped_fp8_gemm_nt_contiguous` (rows padded per expert,
    padding rows tagged -1), wgrad `k_grouped_fp8_gemm_nt_contiguous` into FP32 [G, N, K].
    `fwd+quant` / `dgrad+quant` add the 1x128 quantization of x / dy (all rows, one launch)."""
    import torch

    align = deepgemm_alignment(dg)
    aligned = [-(-s // align) * align for s in c.splits]
    Mp = sum(aligned)
    xp = torch.zeros(Mp, c.K, device="cuda", dtype=torch.bfloat16)
    dyp = torch.zeros(Mp, c.N, device="cuda", dtype=torch.bfloat16)
    m_indices = torch.full((Mp,), -1, device="cuda", dtype=torch.int32)
    valid = torch.zeros(Mp, device="cuda", dtype=torch.bool)
    for e, (s0, s, p0) in enumerate(zip(_starts(c.splits), c.splits, _starts(aligned),
                                         strict=True)):
        xp[p0:p0 + s], dyp[p0:p0 + s] = c.x[s0:s0 + s], c.dy[s0:s0 + s]
        m_indices[p0:p0 + s] = e
        valid[p0:p0 + s] = True
    wq = quant_groups_128x128(c.Ws)
    wtq = quant_groups_128x128(c.Ws.transpose(1, 2).contiguous())
    x1, dy1 = _with_scale_view(dg, quant_1x128(xp)), _with_scale_view(dg, quant_1x128(dyp))
    dy_k, x_k = quant_k_major_groups(dyp, aligned), quant_k_major_groups(xp, aligned)
    ks = torch.tensor(aligned, device="cuda", dtype=torch.int32)
    y = torch.empty(Mp, c.N, device="cuda", dtype=torch.bfloat16)
    dx = torch.empty(Mp, c.K, device="cuda", dtype=torch.bfloat16)
    dw = torch.zeros(c.G, c.N, c.K, device="cuda", dtype=torch.float32)
    flags = {"disable_ue8m0_cast": True}

    def fwd():
        dg.m_grouped_fp8_gemm_nt_contiguous(x1, wq, y, m_indices, **flags)

    def dgrad():
        dg.m_grouped_fp8_gemm_nt_contiguous(dy1, wtq, dx, m_indices, **flags)

    def wgrad():
        dg.k_grouped_fp8_gemm_nt_contiguous(dy_k, x_k, dw, aligned, ks, c=dw)

    def wgrad_check():
        dw.zero_()
        wgrad()
        torch.cuda.synchronize()
        return rel_err(dw, c.dw_ref)

    quant, note = _row_quantizer(dg, use_te_quantizer)

    def fwd_q():
        dg.m_grouped_fp8_gemm_nt_contiguous(quant(xp), wq, y, m_indices, **flags)

    def dgrad_q():
        dg.m_grouped_fp8_gemm_nt_contiguous(quant(dyp), wtq, dx, m_indices, **flags)

    return {
        "fwd": _spec(fwd, lambda: rel_err(y[valid], c.y_ref), c.flops, FP8_BOUND),
        "dgrad": _spec(dgrad, lambda: rel_err(dx[valid], c.dx_ref), c.flops, FP8_BOUND),
        "wgrad": _spec(wgrad, wgrad_check, c.flops, FP8_BOUND,
                       note="k-grouped operands pre-quantized (per-expert transposed layout)"),
        "fwd+quant": _spec(fwd_q, lambda: rel_err(y[valid], c.y_ref), c.flops, FP8_BOUND,
                           note=note),
        "dgrad+quant": _spec(dgrad_q, lambda: rel_err(dx[valid], c.dx_ref), c.flops, FP8_BOUND,
                             note=note),
    }


def _row_quantizer(dg, use_te_quantizer: bool):
    if use_te_quantizer:
        try:
            quantizer = te_block_quantizer(columnwise=False)
            return (lambda t: te_quantize_1x128(quantizer, t)["row"],
                    "activation quantization: TE Float8BlockQuantizer (rowwise only; the "
                    "k-grouped wgrad operands need a per-expert transposed layout TE does not "
                    "produce)")
        except Exception as err:  # noqa: BLE001
            note = f"TE quantizer unavailable ({type(err).__name__}); plain torch quantizer"
    else:
        note = "activation quantization: plain torch ops (slow reference quantizer)"
    return (lambda t: _with_scale_view(dg, quant_1x128(t))), note


def torch_scaled_grouped_mm(c: GroupedCase) -> dict:
    """torch.nn.functional.scaled_grouped_mm, forward only, BlockWise1x128 x BlockWise128x128
    (DeepSeek's recipe; on SM90 torch may support only rowwise: the error text says so)."""
    import torch
    import torch.nn.functional as F

    if not hasattr(F, "scaled_grouped_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no F.scaled_grouped_mm")
    ST, SW = F.ScalingType, F.SwizzleType
    xq, xs = quant_1x128(c.x)
    wq, ws = quant_groups_128x128(c.Ws)
    xs_cm = xs.t().contiguous().t()
    ws_b = ws.transpose(1, 2).contiguous().transpose(1, 2)
    out = {}

    def fwd():
        out["y"] = F.scaled_grouped_mm(xq, wq.transpose(-2, -1), xs_cm, ST.BlockWise1x128, ws_b,
                                       ST.BlockWise128x128, swizzle_a=SW.NO_SWIZZLE,
                                       swizzle_b=SW.NO_SWIZZLE, offs=c.offs,
                                       output_dtype=torch.bfloat16)

    return {"fwd": _spec(fwd, lambda: rel_err(out["y"], c.y_ref), c.flops, FP8_BOUND)}


def torch_scaled_grouped_mm_rowwise(c: GroupedCase) -> dict:
    """torch._scaled_grouped_mm with per-row (token) x per-column (output channel) FP32 scales:
    not DeepSeek's recipe (coarser scales), the FP8 grouped GEMM torch runs on SM90."""
    import torch

    if not hasattr(torch, "_scaled_grouped_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._scaled_grouped_mm")
    xs = c.x.float().abs().amax(1).clamp(min=1e-4) / 448.0
    xq = (c.x.float() / xs[:, None]).to(torch.float8_e4m3fn)
    ws = c.Ws.float().abs().amax(2).clamp(min=1e-4) / 448.0  # [G, N]
    wq = (c.Ws.float() / ws[:, :, None]).to(torch.float8_e4m3fn)
    out = {}

    def fwd():
        out["y"] = torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, ws, offs=c.offs,
                                            out_dtype=torch.bfloat16)

    return {"fwd": _spec(fwd, lambda: rel_err(out["y"], c.y_ref), c.flops, FP8_BOUND)}
