"""The Triton quantizer of the DeepGEMM experts (fp8/deepgemm/triton_quant.py) on CPU, in
Triton's interpreter: both operands' layouts and scales bit for bit the torch path's
(quantize.quantize_rows / quantize_k_major), and the `triton` quantizer inside the experts'
autograd function against the float64 reference. The interpreter's FP8 cast does not round
like the GPU's, so here the kernel stores the scaled values in FP32 (`store_fp32`) and torch
rounds them; tests/test_deepgemm_experts_gpu.py checks the real FP8 stores on the GPU."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from deepgemm_emulator import emulator, ref_grouped, rel_err

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs the triton package")

CASES = [([256, 0, 128, 384], [3, 2, 1, 0]), ([128, 256], [0, 1]), ([0, 0], [1, 0])]


@pytest.fixture
def interpreted(monkeypatch):
    from megatron_dualpipe.fp8.deepgemm import triton_quant

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_quant._kernel.cache_clear()
    yield triton_quant
    triton_quant._kernel.cache_clear()


def _x(rows: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g) * 3  # rows of different magnitude
    x = (torch.randn(rows, k, generator=g) * scale).bfloat16()
    if rows:
        x[0, :128] = 0  # an all-zero tile row: amax floored
    return x


def _fp8_bits(values):
    return values.to(torch.float8_e4m3fn).view(torch.uint8)


@pytest.mark.parametrize(("ks", "order"), CASES, ids=["uneven-reversed", "natural", "empty"])
def test_both_operands_equal_the_torch_path(interpreted, ks, order):
    from megatron_dualpipe.fp8.deepgemm.quantize import quantize_k_major, quantize_rows

    x = _x(sum(ks), 256, seed=len(ks))
    (q, sf), (qk, sfk) = interpreted.quantize_rows_k_major(x, ks, order, store_fp32=True)
    rq, rsf = quantize_rows(x)
    kq, ksf = quantize_k_major(x, ks, order)
    assert torch.equal(_fp8_bits(q), rq.view(torch.uint8))
    assert sf.shape == rsf.shape and sf.stride() == rsf.stride() and torch.equal(sf, rsf)
    assert torch.equal(_fp8_bits(qk), kq.view(torch.uint8))
    assert sfk.shape == ksf.shape and sfk.stride() == ksf.stride() and torch.equal(sfk, ksf)
    rows_only, none = interpreted.quantize_rows_k_major(x, ks, None, store_fp32=True)
    assert none is None and torch.equal(rows_only[0], q) and torch.equal(rows_only[1], sf)


def test_tables_place_each_tile_in_its_experts_transposed_block(interpreted):
    base, ld, sfrow = interpreted.k_major_tables([256, 0, 128], [2, 0, 1], 512, "cpu")
    # order 2, 0, 1: expert 2 first (rows 0..127 of the flat operand), then expert 0
    assert base.tolist() == [128 * 512, 128 * 512 + 128, 0]
    assert ld.tolist() == [256, 256, 128] and sfrow.tolist() == [1, 2, 0]


def test_unaligned_groups_are_refused(interpreted):
    with pytest.raises(ValueError, match="multiples of 128"):
        interpreted.quantize_rows_k_major(torch.zeros(200, 256).bfloat16(), [100, 100], [0, 1])


def test_triton_quantizer_inside_the_expert_gemm(interpreted, monkeypatch):
    from megatron_dualpipe.fp8.deepgemm.function import GemmOptions, grouped_fp8_gemm
    from megatron_dualpipe.fp8.deepgemm.weights import WeightCache

    monkeypatch.setitem(sys.modules, "deep_gemm", emulator())
    real = interpreted.quantize_rows_k_major

    def rounded(x, ks, order, store_fp32=False):  # the GPU's FP8 store, done by torch here
        (q, sf), kmaj = real(x, ks, order, store_fp32=True)
        kmaj = None if kmaj is None else (kmaj[0].to(torch.float8_e4m3fn), kmaj[1])
        return (q.to(torch.float8_e4m3fn), sf), kmaj

    monkeypatch.setattr(interpreted, "quantize_rows_k_major", rounded)
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
    assert rel_err(y, y_ref) < 4e-3 and rel_err(x.grad, dx_ref) < 4e-3
    assert rel_err(torch.stack([w.grad.float() for w in ws]), dw_ref) < 4e-3
