"""The DeepGEMM 2.6.1 calls behind the routed experts (SM90), exactly as
benchmarks/fp8/routes_grouped.py runs them on the H200.

* forward and dgrad: `m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices)`: a = (FP8 [M, K],
  FP32 1x128 scales [M, K/128], MN-major and TMA-aligned), b = (FP8 [G, N, K], FP32 128x128
  scales [G, N/128, K/128]), d = BF16 [M, N]; `m_indices` (int32 [M]) gives each row's expert,
  -1 for padding rows; each expert's rows start at a multiple of `alignment()`.
* wgrad: `k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, ks_tensor, c=d)`: D[g] += A_g B_g^T in
  FP32 with a = (FP8 flat, each group's [N, k_g] block K-major one after the other, FP32 scales
  [N, sum k_g / 128] MN-major), b likewise for [K, k_g]; every k_g a multiple of 128 (0 allowed:
  that group is skipped and D[g] left as it is).

`deep_gemm` is imported at the first call (tests put an emulator in `sys.modules`).
"""

from __future__ import annotations

import math

FLAGS = {"disable_ue8m0_cast": True}  # DeepSeek-V3: plain FP32 scales, no UE8M0 rounding


def deep_gemm():
    """The `deep_gemm` module, or ImportError with how to get it."""
    try:
        import deep_gemm as dg
    except ImportError as err:
        raise ImportError(
            "DeepGEMM behind the routed experts needs the `deep_gemm` module (DeepGEMM 2.6.1 "
            "built from source on the GPU machine: docs/fp8.md, 'Blockwise GEMM routes')"
        ) from err
    return dg


def alignment(dg=None) -> int:
    """Rows per expert are padded to a multiple of this: DeepGEMM's M alignment of the
    contiguous layout, and 128 for the wgrad kernel's 1x128 scales along the tokens."""
    dg = dg or deep_gemm()
    try:
        align = int(dg.get_mk_alignment_for_contiguous_layout())
    except AttributeError:  # older releases: fixed 128
        align = 128
    return math.lcm(align, 128)


def scale_view(sf, dg=None):
    """1x128 scales [mn, k/128] as DeepGEMM wants them: MN-major, TMA-aligned (no copy when
    they already are)."""
    dg = dg or deep_gemm()
    fn = getattr(dg, "get_mn_major_tma_aligned_tensor", None)
    if fn is None:
        fn = dg.utils.get_mn_major_tma_aligned_tensor
    return fn(sf)


def m_grouped_nt(a, b, d, m_indices, dg=None) -> None:
    """d[r] = a[r] b[m_indices[r]]^T for every row r with m_indices[r] >= 0."""
    dg = dg or deep_gemm()
    dg.m_grouped_fp8_gemm_nt_contiguous((a[0], scale_view(a[1], dg)), b, d, m_indices, **FLAGS)


def k_grouped_nt_accumulate(a, b, d, ks: list[int], ks_tensor, dg=None) -> None:
    """d[g] += a_g b_g^T (FP32 d, in place), groups along the reduction dimension."""
    dg = dg or deep_gemm()
    dg.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, ks_tensor, c=d, recipe=(1, 1, 128))
