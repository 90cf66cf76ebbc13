"""A CPU stand-in for the `deep_gemm` module (DeepGEMM 2.6.1, SM90) and an independent float64
reference of DeepSeek-V3's blockwise FP8 GEMMs, for tests/test_deepgemm_experts*.py.

`emulator()` returns a module with exactly the functions megatron_dualpipe.fp8.deepgemm calls,
with DeepGEMM's argument conventions and the host-side checks its C++ API makes (dtypes, shapes,
K-major operands, MN-major TMA-aligned 1x128 scales, 128-row expert segments, ks multiples of
128, c given and equal to d): it dequantizes the FP8 operands with their scales and multiplies
in float64. Rows tagged -1 are filled with NaN (the kernel leaves them unspecified). Nothing
here imports the code under test.
"""

from __future__ import annotations

import types

import torch

FP8 = torch.float8_e4m3fn
ALIGN = 128


def _tma(n: int) -> int:
    return -(-n // 4) * 4


def _check(cond, what: str) -> None:
    if not cond:
        raise AssertionError(f"DeepGEMM emulator: {what}")


def _deq_rows(q, sf):
    """FP8 [m, k] with one scale per row and 128 columns."""
    return q.double() * sf.double().repeat_interleave(ALIGN, dim=1)


def _deq_blocks(q, sf):
    """FP8 [n, k] with one scale per 128x128 block."""
    return q.double() * sf.double().repeat_interleave(ALIGN, 0).repeat_interleave(ALIGN, 1)


def get_mk_alignment_for_contiguous_layout() -> int:
    return ALIGN


def get_mn_major_tma_aligned_tensor(sf):
    mn, blocks = sf.shape
    if sf.stride(0) == 1 and sf.stride(1) == _tma(mn):
        return sf
    out = torch.empty_strided((mn, blocks), (1, _tma(mn)), dtype=sf.dtype)
    out.copy_(sf)
    return out


def m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout, recipe=None, recipe_a=None,
                                     recipe_b=None, compiled_dims="nk", disable_ue8m0_cast=False,
                                     use_psum_layout=False, ensure_zero_padding=True,
                                     expected_m_for_psum_layout=None):
    (qa, sfa), (qb, sfb) = a, b
    M, K = qa.shape
    G, N, K_ = qb.shape
    _check(disable_ue8m0_cast, "disable_ue8m0_cast=True expected (FP32 scales)")
    _check(not use_psum_layout and recipe is None, "plain contiguous layout expected")
    _check(qa.dtype == FP8 and qb.dtype == FP8, "FP8 E4M3 operands")
    _check(qa.stride(1) == 1 and qb.stride(2) == 1, "K-major A and B")
    _check(K == K_ and K % ALIGN == 0 and N % ALIGN == 0, f"shapes {qa.shape} {qb.shape}")
    _check(sfa.dtype == torch.float32 and tuple(sfa.shape) == (M, K // ALIGN), "SFA shape")
    _check(sfa.stride(0) == 1 and sfa.stride(1) == _tma(M), "SFA MN-major, TMA-aligned")
    _check(sfb.dtype == torch.float32 and tuple(sfb.shape) == (G, N // ALIGN, K // ALIGN),
           "SFB shape")
    _check(sfb.is_contiguous() or sfb.transpose(1, 2).is_contiguous(), "SFB layout")
    _check(d.dtype == torch.bfloat16 and tuple(d.shape) == (M, N) and d.is_contiguous(), "D")
    _check(grouped_layout.dtype == torch.int32 and grouped_layout.is_contiguous()
           and tuple(grouped_layout.shape) == (M,), "grouped_layout int32 [M]")
    _check(M % ALIGN == 0, "M a multiple of the alignment")
    idx = grouped_layout.tolist()
    for start in range(0, M, ALIGN):
        block = idx[start:start + ALIGN]
        first = block[0]
        _check(all(e == first for e in block if e >= 0), f"one expert per block at row {start}")
        _check(first >= 0 or all(e < 0 for e in block), f"block at row {start} starts with -1")
        _check(all(block[i] >= 0 or block[i + 1] < 0 for i in range(len(block) - 1)),
               f"padding rows only at the end of a segment (row {start})")
        _check(first < G, f"expert {first} of {G}")
    xa = _deq_rows(qa, sfa)
    out = torch.full((M, N), float("nan"), dtype=torch.float64)
    for e in range(G):
        sel = grouped_layout == e
        if sel.any():
            out[sel] = xa[sel] @ _deq_blocks(qb[e], sfb[e]).t()
    d.copy_(out.to(torch.bfloat16))


def k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks_cpu, grouped_layout, c=None,
                                     recipe=(1, 1, 128), compiled_dims="mn",
                                     use_psum_layout=False):
    (qa, sfa), (qb, sfb) = a, b
    G, m, n = d.shape
    _check(tuple(recipe) == (1, 1, 128), "recipe (1, 1, 128)")
    _check(not use_psum_layout and ks_cpu, "ks_cpu given")
    _check(len(ks_cpu) == G and all(k % ALIGN == 0 and k >= 0 for k in ks_cpu), f"ks {ks_cpu}")
    _check(grouped_layout.dtype == torch.int32 and grouped_layout.tolist() == list(ks_cpu),
           "grouped_layout = ks as int32")
    _check(d.dtype == torch.float32 and d.is_contiguous(), "D FP32 contiguous")
    _check(c is not None and c.is_contiguous() and c.shape == d.shape, "c given (SM90)")
    sum_k = sum(ks_cpu)
    for q, sf, mn in ((qa, sfa, m), (qb, sfb, n)):
        _check(q.dtype == FP8 and q.is_contiguous() and q.numel() == sum_k * mn, "flat operand")
        _check(sf.dtype == torch.float32 and tuple(sf.shape) == (mn, sum_k // ALIGN), "SF shape")
    if c.data_ptr() != d.data_ptr():
        d.copy_(c)
    off = 0
    for g, k in enumerate(ks_cpu):
        if k == 0:
            continue
        s0 = off // ALIGN
        xa = _deq_rows(qa[off * m:(off + k) * m].view(m, k), sfa[:, s0:s0 + k // ALIGN])
        xb = _deq_rows(qb[off * n:(off + k) * n].view(n, k), sfb[:, s0:s0 + k // ALIGN])
        d[g] = (d[g].double() + xa @ xb.t()).float()
        off += k


def emulator() -> types.ModuleType:
    """A fresh module object named `deep_gemm` with the emulated API; `calls` records the
    GEMM calls as (name, args, kwargs)."""
    mod = types.ModuleType("deep_gemm")
    mod.__version__ = "2.6.1-emulated"
    mod.calls = []

    def recorded(fn):
        def call(*args, **kwargs):
            mod.calls.append((fn.__name__, args, kwargs))
            return fn(*args, **kwargs)
        return call

    mod.get_mk_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
    mod.get_mn_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor
    mod.m_grouped_fp8_gemm_nt_contiguous = recorded(m_grouped_fp8_gemm_nt_contiguous)
    mod.k_grouped_fp8_gemm_nt_contiguous = recorded(k_grouped_fp8_gemm_nt_contiguous)
    return mod


# Reference: DeepSeek-V3's recipe written out directly (scale = max(amax, 1e-4) / 448).

def ref_quant(t, tile_rows: int, tile_cols: int):
    """Fake-quantize a 2-D tensor with one FP32 scale per tile; float64 result. The arithmetic
    of DeepGEMM's own reference casts (deep_gemm/utils/math.py: `sf = amax / 448.0`, then
    `x * (1.0 / sf)`), with the scale division written as the multiplication by fl32(1/448)
    that it is on the GPU (torch multiplies by the reciprocal there; on CPU it divides)."""
    r, c = t.shape
    v = t.float().view(r // tile_rows, tile_rows, c // tile_cols, tile_cols)
    scale = v.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) * (1.0 / 448.0)
    return ((v * (1.0 / scale)).to(FP8).double() * scale.double()).view(r, c)


def ref_grouped(x, dy, ws, splits):
    """float64 y, dx, dW of the dequantized operands: x and dy 1x128 (rows, for fwd/dgrad),
    x and dy 128x1 per expert with rows zero-padded to 128 (wgrad), W 128x128."""
    ys, dxs, dws = [], [], []
    start = 0
    for w, s in zip(ws, splits, strict=True):
        xg, dyg = x[start:start + s], dy[start:start + s]
        wq = ref_quant(w, 128, 128)
        ys.append(ref_quant(xg, 1, 128) @ wq.t() if s else xg.new_zeros(0, w.size(0)).double())
        dxs.append(ref_quant(dyg, 1, 128) @ wq if s else dyg.new_zeros(0, w.size(1)).double())
        pad = -(-s // ALIGN) * ALIGN
        xp = torch.zeros(pad, x.size(1), dtype=x.dtype, device=x.device)
        dyp = torch.zeros(pad, dy.size(1), dtype=dy.dtype, device=dy.device)
        xp[:s], dyp[:s] = xg, dyg
        dws.append(ref_quant(dyp, 128, 1).t() @ ref_quant(xp, 128, 1) if s
                   else torch.zeros(w.shape, dtype=torch.float64, device=w.device))
        start += s
    return torch.cat(ys), torch.cat(dxs), torch.stack(dws)


def bf16_grouped(x, dy, ws, splits):
    """float64 y, dx, dW of the unquantized BF16 operands."""
    ys, dxs, dws, start = [], [], [], 0
    for w, s in zip(ws, splits, strict=True):
        xg, dyg, wd = x[start:start + s].double(), dy[start:start + s].double(), w.double()
        ys.append(xg @ wd.t())
        dxs.append(dyg @ wd)
        dws.append(dyg.t() @ xg)
        start += s
    return torch.cat(ys), torch.cat(dxs), torch.stack(dws)


def rel_err(a, b) -> float:
    """Relative Frobenius error of a against b (float64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
