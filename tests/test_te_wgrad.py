"""The zero-bubble W split for Transformer Engine linears (schedules/te_wgrad.py), on CPU.

A stand-in module follows TE's delayed-wgrad protocol as TE 2.x implements it (a `wgrad_store`
queue whose `delay_wgrad_compute()` is read in the backward; `backward_dw()` pops the oldest
weight GEMM and assigns `weight.grad`). The GPU side (real TE modules inside DualPipeV) is in
tests/test_overlap_gpu.py.
"""

from __future__ import annotations

import queue

import pytest
import torch

from megatron_dualpipe.schedules.te_wgrad import TEWeightGradDeferral, is_deferrable
from megatron_dualpipe.schedules.wgrad import WeightGradStore


class FakeStore:
    def __init__(self, delay_wgrad_compute=False):
        self.context = queue.Queue() if delay_wgrad_compute else None
        self.enabled = bool(delay_wgrad_compute)

    def delay_wgrad_compute(self):
        return self.enabled

    def put(self, tensor_list, func):
        self.context.put((tensor_list, func))

    def pop(self):
        tensor_list, func = self.context.get()
        return func(*tensor_list), tensor_list


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, module):
        ctx.save_for_backward(x, weight)
        ctx.wgrad_store = module.wgrad_store
        ctx.placeholder = module.returns_placeholder
        # TE 2.20's Linear hands its store to autograd only if the delay is on at forward time
        if module.decides_at_forward and not module.wgrad_store.delay_wgrad_compute():
            ctx.wgrad_store = None
        return x @ weight.t()

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        def gemm(a, b):
            return b.reshape(-1, b.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
        if ctx.wgrad_store is not None and ctx.wgrad_store.delay_wgrad_compute():
            ctx.wgrad_store.put([x, dy], gemm)
            # TE's GroupedLinear hands autograd the (still empty) buffers its queued GEMM fills
            wgrad = torch.full_like(weight, float("nan")) if ctx.placeholder else None
        else:
            wgrad = gemm(x, dy)
        return dy @ weight, wgrad, None


class FakeTELinear(torch.nn.Module):
    def __init__(self, n, bias=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, n, dtype=torch.float64))
        self.use_bias = bias
        self.fuse_wgrad_accumulation = False
        self.wgrad_store = FakeStore(False)
        self.returns_placeholder = False
        self.decides_at_forward = False

    def forward(self, x):
        return _LinearFn.apply(x, self.weight, self)

    def backward_dw(self):
        if not self.wgrad_store.delay_wgrad_compute():
            return
        wgrad, _ = self.wgrad_store.pop()
        self.weight.grad = wgrad


FakeTELinear.__module__ = "transformer_engine.pytorch.module.linear"  # what TE classes look like


class MegatronWrapper(FakeTELinear):
    """Like Megatron's TELinear: backward_dw is a no-op without config.delay_wgrad_compute."""

    def backward_dw(self):
        return None


MegatronWrapper.__module__ = "megatron.core.extensions.transformer_engine"


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(MegatronWrapper(6), torch.nn.Tanh(), MegatronWrapper(6))


def _loss(model, seed):
    torch.manual_seed(100 + seed)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    return model(x).square().sum()


@pytest.mark.parametrize("main_grad", [False, True])
def test_deferred_te_weight_grads_equal_the_plain_backward(main_grad):
    ref, model = _model(), _model()
    for mb in range(2):
        _loss(ref, mb).backward()
    if main_grad:  # Megatron DDP: gradients live in main_grad, param.grad stays None
        for p in model.parameters():
            p.main_grad = torch.zeros_like(p)
    deferral = TEWeightGradDeferral.of_chunks([model])
    assert len(deferral) == 2
    WeightGradStore.te = deferral
    try:
        items = []
        for mb in range(2):
            with WeightGradStore.collect() as item:
                _loss(model, mb).backward()
            items.append(item)
    finally:
        WeightGradStore.te = None
    for p in model.parameters():  # nothing computed yet: both GEMMs of both micro-batches wait
        assert p.grad is None and (not main_grad or not p.main_grad.any())
    assert all(m.wgrad_store.context.qsize() == 2 for m in deferral.modules)
    for item in items:  # W, oldest first
        WeightGradStore.run(item)
    assert all(m.wgrad_store.context.empty() and not m.wgrad_store.enabled
               for m in deferral.modules)
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        got = p.main_grad if main_grad else p.grad
        torch.testing.assert_close(got, p_ref.grad, rtol=1e-12, atol=1e-12)


def test_backward_outside_collect_is_not_deferred():
    ref, model = _model(), _model()
    _loss(ref, 0).backward()
    TEWeightGradDeferral.of_chunks([model])
    _loss(model, 0).backward()
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-12, atol=1e-12)


def test_modules_with_bias_or_fused_accumulation_are_not_deferred():
    assert is_deferrable(MegatronWrapper(4))
    assert not is_deferrable(MegatronWrapper(4, bias=True))
    fused = MegatronWrapper(4)
    fused.fuse_wgrad_accumulation = True
    assert not is_deferrable(fused)
    assert not is_deferrable(torch.nn.Linear(4, 4, bias=False))  # not a TE module


def _megatron_ddp_hook(param):
    """Megatron DDP's grad hook: add param.grad into main_grad unless TE already did."""
    def hook(p):
        if p.grad is not None and not p.grad_added_to_main_grad:
            p.main_grad.add_(p.grad)
        p.grad = None
    param.grad_added_to_main_grad = False
    param.register_post_accumulate_grad_hook(hook)


@pytest.mark.parametrize("quirk", ["returns_placeholder", "decides_at_forward"])
def test_placeholder_weight_grads_of_a_deferred_backward_never_reach_main_grad(quirk):
    """TE 2.20's quirks under Megatron's DDP hook: GroupedLinear returns its unfilled wgrad
    buffers to autograd while deferring (the hook must skip them, the W item fills main_grad);
    Linear decides at forward time and does not defer (its real gradient must be kept)."""
    ref, model = _model(), _model()
    for mb in range(2):
        _loss(ref, mb).backward()
    for p in model.parameters():
        p.main_grad = torch.zeros_like(p)
        _megatron_ddp_hook(p)
    for module in model:
        if isinstance(module, FakeTELinear):
            setattr(module, quirk, True)
    WeightGradStore.te = TEWeightGradDeferral.of_chunks([model])
    try:
        items = []
        for mb in range(2):
            loss = _loss(model, mb)  # the F, outside the B that collects (as in DualPipe)
            with WeightGradStore.collect() as item:
                loss.backward()
            items.append(item)
    finally:
        WeightGradStore.te = None
    for p in model.parameters():
        assert not p.main_grad.isnan().any()
        assert p.main_grad.any() == (quirk == "decides_at_forward")  # only kept grads so far
        assert p.grad_added_to_main_grad is False  # restored after each deferred backward
    for item in items:
        WeightGradStore.run(item)
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(p.main_grad, p_ref.grad, rtol=1e-12, atol=1e-12)
