"""DeepSeek-V3 blockwise FP8 quantization in the operand layouts of DeepGEMM's SM90 kernels.

Activations and gradients: 1x128 tiles along the reduction dimension; weights: 128x128 blocks;
E4M3 values, FP32 scales (amax / 448, amax floored at 1e-4), no power-of-two rounding; values
x * (1 / scale), DeepGEMM's reference arithmetic (blocks.scales). Two
implementations of the activation side:

* `torch`: plain torch ops (CPU and GPU; several passes over an FP32 copy, so slow on the GPU);
* `te`: Transformer Engine's fused `Float8BlockQuantizer` (GPU), one kernel giving the rowwise
  1x128 copy (forward / dgrad operand) and the columnwise copy (1x128 along the tokens), which
  is regrouped per expert into the wgrad operand;
* `te-rows`: TE's kernel for the rowwise copy only (the layout benchmarks/fp8 validated on the
  H200), the wgrad operand by the torch path;
* `triton`: one Triton kernel (triton_quant.py) writing both operands in DeepGEMM's layouts from
  one read, bit for bit the torch path's values (no regrouping copy of the wgrad operand).

Weights are quantized once per optimizer step, W and W^T from one pass (128x128 blocks are
square, so W^T's quantization is W's transposed): by TE's fused 128x128 kernel with the `te`
and `triton` activation quantizers (`weight_quantizer`), else by the torch path.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from megatron_dualpipe.fp8.deepgemm.blocks import BLOCK, scales, tma_aligned

QUANTIZERS = ("torch", "te", "te-rows", "triton")


def _mn_major(sf):
    """[mn, blocks] FP32 scales re-laid MN-major with a TMA-aligned column stride."""
    import torch

    mn, blocks = sf.shape
    out = torch.empty_strided((mn, blocks), (1, tma_aligned(mn)), dtype=torch.float32,
                              device=sf.device)
    out.copy_(sf)
    return out


def quantize_rows(x):
    """x [m, k] (k a multiple of 128) -> (FP8 [m, k], scales [m, k/128] MN-major)."""
    import torch

    m, k = x.shape
    v = x.float().view(m, k // BLOCK, BLOCK)
    sf = scales(v.abs().amax(-1))
    q = (v * sf.reciprocal().unsqueeze(-1)).to(torch.float8_e4m3fn).view(m, k)
    return q, _mn_major(sf)


def quantize_k_major(x, ks: list[int], order: list[int]):
    """Wgrad operand of the k-grouped kernel from x [sum(ks), mn], whose groups of ks[g] rows
    (multiples of 128) follow one another: for each group g in `order` (empty ones skipped),
    its rows quantized with 128x1 tiles along the rows and stored transposed ([mn, ks[g]],
    K-major), one after the other in one flat FP8 tensor; scales [mn, sum(ks)/128]."""
    import torch

    mn = x.size(1)
    starts = _starts(ks)
    data = torch.empty(x.size(0) * mn, dtype=torch.float8_e4m3fn, device=x.device)
    sfs, off = [], 0
    for g in order:
        k = ks[g]
        if k == 0:
            continue
        v = x[starts[g]:starts[g] + k].float().view(k // BLOCK, BLOCK, mn)
        sf = scales(v.abs().amax(1))
        q = (v * sf.reciprocal().unsqueeze(1)).to(torch.float8_e4m3fn).view(k, mn)
        data[off * mn:(off + k) * mn].view(mn, k).copy_(q.t())
        sfs.append(sf)
        off += k
    sf = torch.cat(sfs) if sfs else torch.empty(0, mn, device=x.device)
    return data, sf.t()


@dataclass(frozen=True)
class QuantizedWeights:
    """One optimizer step's FP8 expert weights: `w` = (FP8 [G, N, K], scales [G, N/128, K/128])
    for the forward, `wt` = the same for W^T ([G, K, N]) for dgrad."""

    w: tuple
    wt: tuple


def quantize_weights(w) -> QuantizedWeights:
    """w [G, N, K] (N, K multiples of 128) -> W and W^T in 128x128 blocks, one pass."""
    import torch

    G, N, K = w.shape
    v = w.float().view(G, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    sf = scales(v.abs().amax(dim=(2, 4)))
    q = (v * sf.reciprocal()[:, :, None, :, None]).to(torch.float8_e4m3fn).view(G, N, K)
    return QuantizedWeights(w=(q, sf), wt=(q.transpose(1, 2).contiguous(),
                                           sf.transpose(1, 2).contiguous()))


def quantize_weights_te(w) -> QuantizedWeights:
    """`quantize_weights` by TE's fused 128x128 `Float8BlockQuantizer` (one kernel for W and
    its transposed copy; DeepSeek-V3's plain FP32 scales)."""
    import torch

    G, N, K = w.shape
    t = _te_block_quantizer(True, 2).quantize(w.reshape(G * N, K))
    row_sf, col, col_sf = t._rowwise_scale_inv, t._columnwise_data, t._columnwise_scale_inv
    _check_shape("128x128 rowwise", row_sf, (G * N // BLOCK, tma_aligned(K // BLOCK)))
    _check_shape("128x128 columnwise data", col, (K, G * N))
    _check_shape("128x128 columnwise", col_sf, (K // BLOCK, tma_aligned(G * N // BLOCK)))
    q = t._rowwise_data.view(torch.float8_e4m3fn).view(G, N, K)
    sf = row_sf[:, :K // BLOCK].reshape(G, N // BLOCK, K // BLOCK).contiguous()
    qt = col.view(torch.float8_e4m3fn).view(K, G, N).permute(1, 0, 2).contiguous()
    sft = col_sf[:, :G * N // BLOCK].reshape(K // BLOCK, G, N // BLOCK).permute(1, 0, 2)
    return QuantizedWeights(w=(q, sf), wt=(qt, sft.contiguous()))


def weight_quantizer(activation_quantizer: str):
    """The weights' quantization that goes with an activation quantizer: TE's fused kernel for
    `te` and (where TE imports) `triton`, the torch path otherwise."""
    from megatron_dualpipe.te import te_available

    if activation_quantizer == "te" or (activation_quantizer == "triton" and te_available()):
        return quantize_weights_te
    return quantize_weights


class ActivationQuantizer:
    """Quantizes an expert-padded activation x [Mp, K] into the forward/dgrad operand (rows)
    and, when asked, the wgrad operand (k-major per expert), with the `torch` or `te` kernels."""

    def __init__(self, kind: str = "torch"):
        if kind not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {kind!r}")
        self.kind = kind

    def __call__(self, x, ks: list[int], order: list[int] | None):
        """(rows pair, k-major pair or None when `order` is None)."""
        if self.kind == "te":
            return _te_quantize(x, ks, order)
        if self.kind == "triton":
            from megatron_dualpipe.fp8.deepgemm.triton_quant import quantize_rows_k_major

            return quantize_rows_k_major(x, ks, order)
        rows = quantize_rows(x) if self.kind == "torch" else _te_quantize(x, ks, None)[0]
        return rows, (None if order is None else quantize_k_major(x, ks, order))


def make_te_block_quantizer(columnwise: bool, block_scaling_dim: int = 1):
    """TE's `Float8BlockQuantizer`, 1x128 tiles (`block_scaling_dim` 1) or 128x128 blocks (2),
    rowwise and, with `columnwise`, the transposed copy, with DeepSeek-V3's plain FP32
    scales."""
    import transformer_engine.pytorch  # noqa: F401 - loads TE's core library first
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.tensor.float8_blockwise_tensor import Float8BlockQuantizer

    params = inspect.signature(Float8BlockQuantizer.__init__).parameters
    kwargs = {"rowwise": True, "columnwise": columnwise, "block_scaling_dim": block_scaling_dim}
    if "force_pow_2_scales" in params:
        kwargs["force_pow_2_scales"] = False  # DeepSeek-V3: plain FP32 scales
    return Float8BlockQuantizer(tex.DType.kFloat8E4M3, **kwargs)


_te_block_quantizer = functools.cache(make_te_block_quantizer)


def _te_quantize(x, ks: list[int], order: list[int] | None):
    """TE's fused 1x128 quantizer. Its GEMM-ready scale buffers are [k/128, tma(m)] row-major,
    i.e. transposed exactly DeepGEMM's MN-major layout; the columnwise copy (x^T [K, Mp], 1x128
    along the tokens) equals the k-grouped operand once each expert's columns are made
    contiguous (expert boundaries are multiples of 128, so the scale tiles coincide)."""
    import torch

    quantizer = _te_block_quantizer(order is not None)
    t = quantizer.quantize(x) if hasattr(quantizer, "quantize") else quantizer(x)
    m, k = x.shape
    row_sf = t._rowwise_scale_inv
    _check_shape("rowwise", row_sf, (k // BLOCK, tma_aligned(m)))
    rows = (t._rowwise_data.view(torch.float8_e4m3fn), row_sf.t()[:m])
    if order is None:
        return rows, None
    col = t._columnwise_data.view(torch.float8_e4m3fn)
    col_sf = t._columnwise_scale_inv
    _check_shape("columnwise data", col, (k, m))
    _check_shape("columnwise", col_sf, (m // BLOCK, tma_aligned(k)))
    starts = _starts(ks)
    data = torch.empty(m * k, dtype=torch.float8_e4m3fn, device=x.device)
    sfs, off = [], 0
    for g in order:
        a = ks[g]
        if a == 0:
            continue
        data[off * k:(off + a) * k].view(k, a).copy_(col[:, starts[g]:starts[g] + a])
        sfs.append(col_sf[starts[g] // BLOCK:(starts[g] + a) // BLOCK, :k])
        off += a
    sf = torch.cat(sfs) if sfs else torch.empty(0, k, device=x.device)
    return rows, (data, sf.t())


def _check_shape(what: str, t, expected: tuple) -> None:
    if tuple(t.shape) != expected:
        raise RuntimeError(f"unexpected TE {what} shape {tuple(t.shape)}, expected {expected} "
                           "(use the `torch` quantizer)")


def _starts(ks: list[int]) -> list[int]:
    out, s = [], 0
    for k in ks:
        out.append(s)
        s += k
    return out
