"""Checks of the DeepGEMM experts' Triton quantizer (fp8/deepgemm/triton_quant.py) in Triton's
CPU interpreter. Run as a script with TRITON_INTERPRET=1 set before triton is imported (Triton
decorates its own library functions, e.g. `tl.max`, at import): prints one JSON object
{check: "ok" or the failure}. tests/test_deepgemm_triton_quant.py runs it and asserts each.

The interpreter's FP8 cast does not round like the GPU's, so the kernel stores the scaled
values in FP32 (`store_fp32`) and torch rounds them; tests/test_deepgemm_experts_gpu.py checks
the real FP8 stores on the GPU.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

CASES = {"uneven-reversed": ([256, 0, 128, 384], [3, 2, 1, 0]),
         "natural": ([128, 256], [0, 1]), "empty": ([0, 0], [1, 0])}


def _x(rows: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g) * 3  # rows of different magnitude
    x = (torch.randn(rows, k, generator=g) * scale).bfloat16()
    if rows:
        x[0, :128] = 0  # an all-zero tile row: amax floored
    return x


def _bits(values):
    return values.to(torch.float8_e4m3fn).view(torch.uint8)


def _scaled_rows(x, sf):
    """x * (1 / scale) per 1x128 tile, FP32, from the torch path's scales [m, k/128]."""
    m, k = x.shape
    return (x.float().view(m, k // 128, 128) * sf.reciprocal().unsqueeze(-1)).view(m, k)


def _scaled_k_major(x, ks, order, sf):
    """The k-major operand's FP32 values (expert blocks in `order`, each [k, ks[g]]) from the
    torch path's scales [k, sum(ks)/128]."""
    starts = [sum(ks[:g]) for g in range(len(ks))]
    blocks, col = [], 0
    for g in order:
        rows = x[starts[g]:starts[g] + ks[g]].float()
        s = sf[:, col:col + ks[g] // 128].t().repeat_interleave(128, 0)  # [ks[g], k]
        blocks.append((rows * s.reciprocal()).t().flatten())
        col += ks[g] // 128
    return torch.cat(blocks) if blocks else torch.empty(0)


def both_operands_equal_the_torch_path(ks, order, transpose_bf16=False):
    from megatron_dualpipe.fp8.deepgemm import triton_quant
    from megatron_dualpipe.fp8.deepgemm.quantize import quantize_k_major, quantize_rows

    x = _x(sum(ks), 256, seed=len(ks))
    triton_quant.TRANSPOSE_BF16 = transpose_bf16
    try:
        (q, sf), (qk, sfk) = triton_quant.quantize_rows_k_major(x, ks, order, store_fp32=True)
    finally:
        triton_quant.TRANSPOSE_BF16 = False
    rq, rsf = quantize_rows(x)
    kq, ksf = quantize_k_major(x, ks, order)
    assert torch.equal(_bits(q), rq.view(torch.uint8)), "rows data"
    assert sf.shape == rsf.shape and sf.stride() == rsf.stride(), (sf.stride(), rsf.stride())
    assert torch.equal(sf, rsf), "rows scales"
    assert torch.equal(_bits(qk), kq.view(torch.uint8)), "k-major data"
    assert sfk.shape == ksf.shape and sfk.stride() == ksf.stride(), (sfk.stride(), ksf.stride())
    assert torch.equal(sfk, ksf), "k-major scales"
    # the FP32 values before rounding too: an arithmetic change (x / s for x * (1 / s)) moves
    # a last bit, which E4M3 rounding mostly hides
    assert torch.equal(q, _scaled_rows(x, rsf)), "rows values before rounding"
    assert torch.equal(qk, _scaled_k_major(x, ks, order, ksf)), "k-major values before rounding"
    rows_only, none = triton_quant.quantize_rows_k_major(x, ks, None, store_fp32=True)
    assert none is None and torch.equal(rows_only[0], q) and torch.equal(rows_only[1], sf)


def quantizer_inside_the_expert_gemm():
    from deepgemm_emulator import emulator, ref_grouped, rel_err

    from megatron_dualpipe.fp8.deepgemm import triton_quant
    from megatron_dualpipe.fp8.deepgemm.function import GemmOptions, grouped_fp8_gemm
    from megatron_dualpipe.fp8.deepgemm.weights import WeightCache

    sys.modules["deep_gemm"] = emulator()
    real = triton_quant.quantize_rows_k_major

    def rounded(x, ks, order, store_fp32=False):  # the GPU's FP8 store, done by torch here
        (q, sf), kmaj = real(x, ks, order, store_fp32=True)
        kmaj = None if kmaj is None else (kmaj[0].to(torch.float8_e4m3fn), kmaj[1])
        return (q.to(torch.float8_e4m3fn), sf), kmaj

    triton_quant.quantize_rows_k_major = rounded
    try:
        G, K, N, splits = 3, 256, 128, [130, 0, 77]
        g = torch.Generator().manual_seed(5)
        ws = [torch.nn.Parameter((torch.randn(N, K, generator=g) / K**0.5).bfloat16())
              for _ in range(G)]
        x = torch.randn(sum(splits), K, generator=g).bfloat16().requires_grad_(True)
        dy = torch.randn(sum(splits), N, generator=g).bfloat16()
        y = grouped_fp8_gemm(x, splits, ws, WeightCache("triton").get(ws),
                             GemmOptions(quantizer="triton"))
        y.backward(dy)
        y_ref, dx_ref, dw_ref = ref_grouped(x.detach(), dy, [w.detach() for w in ws], splits)
        errs = (rel_err(y.detach(), y_ref), rel_err(x.grad, dx_ref),
                rel_err(torch.stack([w.grad.float() for w in ws]), dw_ref))
        assert max(errs) < 4e-3, errs
    finally:
        triton_quant.quantize_rows_k_major = real
        del sys.modules["deep_gemm"]


CHECKS = {**{f"layout {name}": (lambda c=case: both_operands_equal_the_torch_path(*c))
             for name, case in CASES.items()},
          **{f"layout {name} bf16-transpose":
             (lambda c=case: both_operands_equal_the_torch_path(*c, transpose_bf16=True))
             for name, case in CASES.items() if sum(case[0])},
          "inside the expert gemm": quantizer_inside_the_expert_gemm}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (before triton is imported)", file=sys.stderr)
        return 2
    results = {}
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported per check
            results[name] = traceback.format_exc(limit=3)[-1500:]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
