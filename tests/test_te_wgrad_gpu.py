"""GPU: the zero-bubble W split of real Transformer Engine modules under Megatron's DDP hook.

    python -m pytest -q -s -m gpu tests/test_te_wgrad_gpu.py

`Linear`, `LayerNormLinear` and `GroupedLinear` in BF16 and FP32, with FP32 `main_grad`
buffers and Megatron DDP's grad hook (add `param.grad` into `main_grad` unless
`grad_added_to_main_grad`): two micro-batches with their weight GEMMs deferred to W items
(schedules/te_wgrad.py) must leave the same `main_grad` as the plain backward. Also prints
the weight gradients TE handed autograd during the deferred backward and whether they were
marked to be skipped: TE 2.20's GroupedLinear hands over its still-empty buffers (marked; they
reached main_grad before the guard and gave NaN losses in DualPipeV from the second step);
Linear decides at forward time and computes its real gradient at once (kept).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_dualpipe.schedules.te_wgrad import TEWeightGradDeferral
from megatron_dualpipe.schedules.wgrad import WeightGradStore

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and HAVE_TE), reason="needs a CUDA GPU and Transformer Engine")]

K, N, SPLITS = 256, 384, [128, 64, 192, 128]


def _module(kind: str, dtype):
    import transformer_engine.pytorch as te

    torch.manual_seed(0)
    common = dict(bias=False, params_dtype=dtype, device="cuda")
    if kind == "GroupedLinear":
        return te.GroupedLinear(len(SPLITS), K, N, **common)
    if kind == "LayerNormLinear":
        return te.LayerNormLinear(K, N, normalization="RMSNorm", **common)
    return te.Linear(K, N, **common)


def _with_ddp_hooks(module, seen: list):
    for p in module.parameters():
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        p.grad_added_to_main_grad = False

        def hook(param):
            if param.grad is not None and WeightGradStore.te is not None:
                seen.append(param.grad_added_to_main_grad)
            if param.grad is not None and not param.grad_added_to_main_grad:
                param.main_grad.add_(param.grad)
            param.grad = None

        p.register_post_accumulate_grad_hook(hook)


def _main_grads(kind: str, dtype, defer: bool, seen: list) -> dict:
    module = _module(kind, dtype)
    _with_ddp_hooks(module, seen)
    WeightGradStore.te = TEWeightGradDeferral.of_chunks([module]) if defer else None
    items = []
    try:
        for mb in range(2):
            torch.manual_seed(100 + mb)
            x = torch.randn(sum(SPLITS), K, dtype=dtype, device="cuda", requires_grad=True)
            out = module(x, SPLITS) if kind == "GroupedLinear" else module(x)
            if defer:
                with WeightGradStore.collect() as item:
                    out.float().square().sum().backward()
                items.append(item)
            else:
                out.float().square().sum().backward()
    finally:
        WeightGradStore.te = None
    for item in items:
        WeightGradStore.run(item)
    torch.cuda.synchronize()
    return {n: p.main_grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["Linear", "LayerNormLinear", "GroupedLinear"])
def test_deferred_weight_grads_match_the_plain_backward(kind, dtype):
    seen: list = []
    plain = _main_grads(kind, dtype, False, [])
    deferred = _main_grads(kind, dtype, True, seen)
    print(f"\n[te wgrad] {kind} {dtype}: weight grads TE handed autograd during the deferred "
          f"backward: {len(seen)} (all marked grad_added_to_main_grad: {all(seen)})")
    for name, ref in plain.items():
        got = deferred[name]
        assert got.isfinite().all(), name
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)
