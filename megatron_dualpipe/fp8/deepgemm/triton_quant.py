"""Both DeepGEMM operands of an expert activation from one read: a Triton kernel that quantizes
each 128x128 tile of x [Mp, K] (BF16, rows grouped by expert, every group a multiple of 128
rows) into

* the forward / dgrad operand: 1x128 tiles along K, FP8 [Mp, K] with FP32 scales [Mp, K/128]
  MN-major (TMA-aligned column stride), as `quantize.quantize_rows`;
* the wgrad operand: 128x1 tiles along the tokens, each expert's block stored transposed
  ([K, k_g], K-major) one after the other in `order`, FP32 scales [K, sum(k)/128] MN-major, as
  `quantize.quantize_k_major`,

with the same arithmetic as the torch path (blocks.scales: amax floored at 1e-4, scale = amax x
fl32(1/448), x x (1 / scale) rounded to E4M3), so the results are bit for bit the torch path's.
TE's quantizer writes the wgrad copy as one [K, Mp] matrix, which then has to be regrouped per
expert (a copy of the whole operand); this kernel writes it in place.

The kernel (triton_kernels.py) is compiled at first use. With `TRITON_INTERPRET=1` set before
triton is imported it runs on CPU tensors in Triton's interpreter (tests/triton_interpret_
checks.py), with `store_fp32`, which writes the scaled values before rounding, since the
interpreter's FP8 cast does not round like the GPU.
"""

from __future__ import annotations

import functools

from megatron_dualpipe.fp8.deepgemm.blocks import AMAX_FLOOR, BLOCK, FP8_MAX, tma_aligned

NUM_WARPS = 8  # per 128x128 tile (benchmarks/fp8/quantizer.py compares 4, 8, 16)
# the wgrad copy's transpose on the BF16 input instead of the FP8 result (same values; on one
# H200 both run equally fast, benchmarks/fp8/quantizer.py's `triton-tbf16` variant)
TRANSPOSE_BF16 = False


@functools.cache
def _kernel():
    from megatron_dualpipe.fp8.deepgemm.triton_kernels import quantize_tiles  # imports triton

    return quantize_tiles


def k_major_tables(ks: list[int], order: list[int], k: int, device):
    """Per 128-row block of x [sum(ks), k]: where its transposed tile starts in the flat wgrad
    operand (`base`, in elements), that operand's row length there (`ld`: its expert's k_g) and
    its row of the wgrad scales (`sfrow`); int64 tensors [sum(ks)/128]."""
    import torch

    dest, off = {}, 0
    for g in order:
        dest[g] = off
        off += ks[g]
    base, ld, sfrow = [], [], []
    for g, rows in enumerate(ks):
        for local in range(0, rows, BLOCK):
            base.append(dest[g] * k + local)
            ld.append(rows)
            sfrow.append((dest[g] + local) // BLOCK)
    return [torch.tensor(v, dtype=torch.int64, device=device) for v in (base, ld, sfrow)]


@functools.lru_cache(maxsize=32)
def _cached_tables(ks: tuple, order: tuple, k: int, device: str):
    return k_major_tables(list(ks), list(order), k, device)


def quantize_rows_k_major(x, ks: list[int], order: list[int] | None, store_fp32: bool = False):
    """(rows pair, k-major pair or None when `order` is None) of x [Mp, K] (module doc)."""
    import torch

    m, k = x.shape
    if m % BLOCK or k % BLOCK or sum(ks) != m or any(g % BLOCK for g in ks):
        raise ValueError(f"x {tuple(x.shape)} / groups {ks}: rows, K and every group must be "
                         f"multiples of {BLOCK}")
    x = x.contiguous()
    dtype = torch.float32 if store_fp32 else torch.float8_e4m3fn
    q = torch.empty(m, k, dtype=dtype, device=x.device)
    sf = torch.empty_strided((m, k // BLOCK), (1, tma_aligned(m)), dtype=torch.float32,
                             device=x.device)
    with_k = order is not None
    if with_k:
        base, ld, sfrow = _cached_tables(tuple(ks), tuple(order), k, str(x.device))
        qk = torch.empty(m * k, dtype=dtype, device=x.device)
        sfk = torch.empty(m // BLOCK, k, dtype=torch.float32, device=x.device)
    else:
        base = ld = sfrow = qk = sfk = sf  # unused
    if m:
        _kernel()[(m // BLOCK, k // BLOCK)](
            x, q, sf, qk, sfk, base, ld, sfrow, k, tma_aligned(m), AMAX_FLOOR, 1.0 / FP8_MAX,
            WITH_K=with_k, STORE_FP32=store_fp32, BLOCK=BLOCK, TRANSPOSE_BF16=TRANSPOSE_BF16,
            num_warps=NUM_WARPS)
    rows = (q, sf)
    return rows, ((qk, sfk.t()) if with_k else None)

