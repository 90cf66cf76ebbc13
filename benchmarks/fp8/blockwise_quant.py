"""DeepSeek-V3 blockwise FP8 quantization for the GEMM benchmarks: 1x128 tiles for activations
and gradients, 128x128 blocks for weights, E4M3 with FP32 scales (SM90 layout), plus the
views that feed Transformer Engine's quantizer output straight into DeepGEMM.

Plain torch ops (reference quantizers, not fast): the benchmarks time them only where they say
so; `te_quantize_1x128` is the fused-kernel path (TE's Float8BlockQuantizer).
"""

from __future__ import annotations

FP8_MAX = 448.0
BLOCK = 128


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def quant_1x128(x):
    """[m, k] -> (fp8 [m, k], fp32 scales [m, ceil(k/128)]): one scale per row and 128 columns
    (k is zero-padded to a multiple of 128 for the scales, as DeepGEMM's `per_token_cast`)."""
    import torch

    m, k = x.shape
    kp = ceil_div(k, BLOCK) * BLOCK
    padded = torch.zeros(m, kp, device=x.device, dtype=torch.float32)
    padded[:, :k] = x.float()
    v = padded.view(m, kp // BLOCK, BLOCK)
    sf = v.abs().amax(-1).clamp(min=1e-4) / FP8_MAX
    q = (v / sf.unsqueeze(-1)).to(torch.float8_e4m3fn).view(m, kp)[:, :k].contiguous()
    return q, sf


def quant_128x128(w):
    """[n, k] -> (fp8 [n, k], fp32 scales [ceil(n/128), ceil(k/128)]): 128x128 blocks. The
    transpose of the result is the 128x128 quantization of w.t() (blocks are square)."""
    import torch

    n, k = w.shape
    npad, kp = ceil_div(n, BLOCK) * BLOCK, ceil_div(k, BLOCK) * BLOCK
    padded = torch.zeros(npad, kp, device=w.device, dtype=torch.float32)
    padded[:n, :k] = w.float()
    v = padded.view(npad // BLOCK, BLOCK, kp // BLOCK, BLOCK)
    sf = v.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) / FP8_MAX
    q = (v / sf).to(torch.float8_e4m3fn).view(npad, kp)[:n, :k].contiguous()
    return q, sf.view(npad // BLOCK, kp // BLOCK)


def quant_groups_128x128(ws):
    """[g, n, k] -> (fp8 [g, n, k], fp32 [g, ceil(n/128), ceil(k/128)])."""
    import torch

    qs, sfs = zip(*(quant_128x128(w) for w in ws), strict=True)
    return torch.stack(qs), torch.stack(sfs)


def dequant_1x128(q, sf):
    m, k = q.shape
    return (q.double() * sf.double().repeat_interleave(BLOCK, dim=1)[:, :k])


def dequant_128x128(q, sf):
    n, k = q.shape
    full = sf.double().repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
    return q.double() * full[:n, :k]


def quant_k_major_groups(x, ks):
    """K-grouped operand of DeepGEMM's SM90 wgrad kernel (`k_grouped_fp8_gemm_nt_contiguous`):
    rows [k_g, mn] of each group cast with 128x1 tiles along k (k_g multiples of 128), stored
    transposed (k-major) and flattened; scales [mn, sum k_g/128] (MN-major view). The
    training path's quantizer (`fp8/deepgemm/quantize.py`) with the groups in order."""
    from megatron_dualpipe.fp8.deepgemm.quantize import quantize_k_major

    return quantize_k_major(x, list(ks), list(range(len(ks))))


def te_block_quantizer(columnwise: bool):
    """TE's 1x128 quantizer (rowwise; with `columnwise` also the transposed copy for wgrad), or
    raise if this TE has none (the training path's, `fp8/deepgemm/quantize.py`)."""
    from megatron_dualpipe.fp8.deepgemm.quantize import make_te_block_quantizer

    return make_te_block_quantizer(columnwise)


def te_quantize_1x128(quantizer, x):
    """Quantize x [m, k] with TE's fused kernel; returns {"row": (fp8 [m, k], sf [m, k/128]),
    "col": (fp8 [k, m], sf [k, m/128]) or None}. The scale views are TE's GEMM-ready buffers
    ([k/128, roundup(m, 4)] row-major) transposed: exactly DeepGEMM's MN-major, TMA-aligned
    layout, so no copy is made."""
    import torch

    t = quantizer.quantize(x) if hasattr(quantizer, "quantize") else quantizer(x)
    m, k = x.shape
    row_sf = t._rowwise_scale_inv
    if tuple(row_sf.shape) != (ceil_div(k, BLOCK), ceil_div(m, 4) * 4):
        raise RuntimeError(f"unexpected TE rowwise scale shape {tuple(row_sf.shape)} for {m}x{k}")
    out = {"row": (t._rowwise_data.view(torch.float8_e4m3fn), row_sf.t()[:m]), "col": None}
    if getattr(t, "_columnwise_data", None) is not None:
        col_sf = t._columnwise_scale_inv
        out["col"] = (t._columnwise_data.view(torch.float8_e4m3fn), col_sf.t()[:k])
    return out
