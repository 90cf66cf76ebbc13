"""GPU: DeepGEMM's real SM90 kernels behind the routed experts (megatron_dualpipe/fp8/deepgemm)
against the float64 reference of the dequantized operands that tests/test_deepgemm_experts.py
checks the CPU emulator against, and the module under TE's blockwise FP8 autocast.

    bash .deepgemm/build.sh      # DeepGEMM 2.6.1 from the carried source (docs/fp8.md)
    PYTHONPATH=$PWD:${DEEPGEMM_DIR:-$HOME/deepgemm}/DeepGEMM python -m pytest -q -s -m gpu \\
        tests/test_deepgemm_experts_gpu.py

The first run JIT-compiles about six kernels with nvcc (tens of seconds each).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from deepgemm_emulator import bf16_grouped, ref_grouped, rel_err


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if torch.cuda.get_device_capability(0)[0] != 9:
        return "DeepGEMM's 1x128/128x128 FP32-scale kernels are SM90 (Hopper) kernels"
    if importlib.util.find_spec("deep_gemm") is None:
        return "deep_gemm not importable: bash .deepgemm/build.sh, then PYTHONPATH (docs/fp8.md)"
    try:
        import deep_gemm  # noqa: F401
    except Exception as err:  # noqa: BLE001 - the reason is the message
        return f"import deep_gemm failed: {type(err).__name__}: {err}"
    return None


REASON = _skip_reason()
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

G, K, N = 4, 1024, 768
SPLITS = [304, 0, 1008, 656]  # a zero-row expert, rows not multiples of 128 (of 16: TE FP8)
KERNEL_BOUND = 1e-2  # against the dequantized operands (benchmarks/fp8: ~2e-3 measured)
FP8_BOUND = 0.06


def _case(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ws = (torch.randn(G, N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    x = torch.randn(sum(SPLITS), K, device="cuda", generator=g).bfloat16()
    dy = torch.randn(sum(SPLITS), N, device="cuda", generator=g).bfloat16()
    return ws, x, dy


HAVE_TRITON = importlib.util.find_spec("triton") is not None
QUANTIZERS = (["torch"] + (["te-rows", "te"] if HAVE_TE else [])
              + (["triton"] if HAVE_TRITON else []))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_kernels_against_reference(quantizer):
    from megatron_dualpipe.fp8.deepgemm import GemmOptions, WeightCache, grouped_fp8_gemm

    ws, x, dy = _case(0)
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    buffer = torch.zeros(G * N * K, device="cuda")  # Megatron's layout: reverse order
    for i, p in enumerate(reversed(params)):
        p.main_grad = buffer[i * N * K:(i + 1) * N * K].view(N, K)
        p.grad_added_to_main_grad = False
    options = GemmOptions(accumulate=True, quantizer=quantizer)
    quantized = WeightCache(quantizer).get(params)  # `te`: TE's fused 128x128 kernel
    total = torch.zeros(G, N, K, dtype=torch.float64, device="cuda")
    for micro in range(2):
        _, x, dy = _case(1 + micro)
        xr = x.clone().requires_grad_(True)
        y = grouped_fp8_gemm(xr, SPLITS, params, quantized, options)
        y.backward(dy)
        torch.cuda.synchronize()
        y_ref, dx_ref, dw_ref = ref_grouped(x, dy, list(ws), SPLITS)
        y_bf, dx_bf, _ = bf16_grouped(x, dy, ws, SPLITS)
        errs = {"y": rel_err(y, y_ref), "dx": rel_err(xr.grad, dx_ref),
                "y_bf16": rel_err(y, y_bf), "dx_bf16": rel_err(xr.grad, dx_bf)}
        print(f"[deepgemm experts {quantizer}] micro-batch {micro}: "
              + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        assert errs["y"] < KERNEL_BOUND and errs["dx"] < KERNEL_BOUND
        assert errs["y_bf16"] < FP8_BOUND and errs["dx_bf16"] < FP8_BOUND
        total += dw_ref
        for p in params:
            p.grad = None
    got = torch.stack([p.main_grad for p in params])
    err = rel_err(got, total)
    print(f"[deepgemm experts {quantizer}] main_grad after 2 micro-batches: {err:.2e}")
    assert err < KERNEL_BOUND
    assert torch.count_nonzero(params[1].main_grad) == 0  # the zero-row expert


@pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine")
def test_module_under_te_blockwise_autocast():
    """BF16: TE's own forward, bit for bit. Blockwise FP8 autocast: DeepGEMM, within FP8's
    tolerance of the BF16 product; TE's own blockwise output is printed for comparison."""
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8BlockScaling

    from megatron_dualpipe.fp8.deepgemm import deepgemm_grouped_linear

    ws, x, dy = _case(3)
    common = dict(bias=False, params_dtype=torch.bfloat16, device="cuda")
    ours = deepgemm_grouped_linear(te.GroupedLinear)(G, K, N, **common)
    theirs = te.GroupedLinear(G, K, N, **common)
    with torch.no_grad():
        for i in range(G):
            getattr(ours, f"weight{i}").copy_(ws[i])
            getattr(theirs, f"weight{i}").copy_(ws[i])
    assert torch.equal(ours(x, SPLITS), theirs(x, SPLITS))  # BF16: TE's path
    recipe = Float8BlockScaling()
    ours.is_first_microbatch = True
    xr = x.clone().requires_grad_(True)
    with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
        y, bias = ours(xr, SPLITS)
        y_te = theirs(x, SPLITS)
    y.backward(dy)
    y_bf, dx_bf, dw_bf = bf16_grouped(x, dy, ws, SPLITS)
    dw = torch.stack([getattr(ours, f"weight{i}").grad for i in range(G)])
    errs = {"y": rel_err(y, y_bf), "dx": rel_err(xr.grad, dx_bf), "dw": rel_err(dw, dw_bf),
            "te_blockwise_y": rel_err(y_te, y_bf), "ours_vs_te": rel_err(y, y_te)}
    print("[deepgemm module] " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert bias is None
    assert errs["y"] < FP8_BOUND and errs["dx"] < FP8_BOUND and errs["dw"] < FP8_BOUND


@pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine")
def test_te_weight_quantization_matches_the_torch_path():
    """TE's fused 128x128 quantizer gives the torch path's scales and (within one E4M3 step)
    values, for W and for W^T."""
    from megatron_dualpipe.fp8.deepgemm.quantize import quantize_weights, quantize_weights_te

    ws, _, _ = _case(4)
    ours, te_q = quantize_weights(ws), quantize_weights_te(ws)
    for (q, sf), (q_te, sf_te), what in ((ours.w, te_q.w, "W"), (ours.wt, te_q.wt, "W^T")):
        assert q_te.shape == q.shape and sf_te.shape == sf.shape, what
        assert torch.allclose(sf_te, sf, rtol=1e-5, atol=0), what
        deq = q.float().view(sf.shape[0], sf.shape[1], 128, sf.shape[2], 128) \
            * sf[:, :, None, :, None]
        deq_te = q_te.float().view(deq.shape) * sf_te[:, :, None, :, None]
        err = rel_err(deq_te, deq)
        print(f"[deepgemm weights] {what}: TE vs torch {err:.2e}")
        assert err < 1e-2, what


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("transpose_bf16", [False, True], ids=["fp8-transpose", "bf16-transpose"])
def test_triton_quantizer_is_bit_for_bit_the_torch_path(monkeypatch, transpose_bf16):
    """Real FP8 stores on the GPU (the CPU test runs the interpreter with FP32 stores)."""
    from megatron_dualpipe.fp8.deepgemm import triton_quant
    from megatron_dualpipe.fp8.deepgemm.quantize import quantize_k_major, quantize_rows

    monkeypatch.setattr(triton_quant, "TRANSPOSE_BF16", transpose_bf16)
    ks, order = [1024, 0, 384, 640], [3, 2, 1, 0]
    g = torch.Generator(device="cuda").manual_seed(6)
    x = (torch.randn(sum(ks), 1024, device="cuda", generator=g)
         * torch.rand(sum(ks), 1, device="cuda", generator=g) * 4).bfloat16()
    (q, sf), (qk, sfk) = triton_quant.quantize_rows_k_major(x, ks, order)
    rq, rsf = quantize_rows(x)
    kq, ksf = quantize_k_major(x, ks, order)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sf, rsf)
    assert torch.equal(qk.view(torch.uint8), kq.view(torch.uint8)) and torch.equal(sfk, ksf)
    assert sf.stride() == rsf.stride() and sfk.stride() == ksf.stride()
