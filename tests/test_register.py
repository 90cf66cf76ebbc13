"""`megatron_dualpipe.register()` and the DualPipe feature patches."""

from __future__ import annotations

import pytest

import megatron_dualpipe
from megatron_dualpipe.patches import revert_feature_patches


@pytest.fixture(autouse=True)
def _restore():
    yield
    revert_feature_patches()


def test_register_selects_our_schedule_for_every_binding():
    import megatron.core.pipeline_parallel as pp_pkg
    from megatron.core.pipeline_parallel import schedules

    original = schedules.get_forward_backward_func
    megatron_dualpipe.register("dualpipev")
    for module in (pp_pkg, schedules):
        func = module.get_forward_backward_func()
        assert func.func.__name__ == "forward_backward_dualpipev"
    megatron_dualpipe.register(None)  # selected nothing: Megatron's own answer
    assert pp_pkg.get_forward_backward_func(pp_size=1) is original(pp_size=1)
    revert_feature_patches()
    assert schedules.get_forward_backward_func is original
    assert pp_pkg.get_forward_backward_func is original


def test_register_reads_environment(monkeypatch):
    from megatron.core.pipeline_parallel import schedules

    monkeypatch.setenv("MEGATRON_DUALPIPE_SCHEDULE", "dualpipe")
    megatron_dualpipe.register()
    assert schedules.get_forward_backward_func().func.__name__ == "forward_backward_dualpipe"


def test_register_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="allowed values: dualpipe, dualpipev"):
        megatron_dualpipe.register("zb2p")


def test_deferred_wgrad_linear_matches_megatron_and_defers():
    import torch
    from megatron.core.tensor_parallel import layers

    from megatron_dualpipe.patches import enable_deferred_wgrad
    from megatron_dualpipe.schedules.wgrad import WeightGradStore

    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    original = layers.linear_with_grad_accumulation_and_async_allreduce
    ref_out = original(x, w, None, False, False, False)
    ref_out.square().sum().backward()
    ref_dx, ref_dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None

    enable_deferred_wgrad()
    patched = layers.linear_with_grad_accumulation_and_async_allreduce
    assert patched is not original
    out = patched(x, w, None, False, False, False)
    assert torch.equal(out, ref_out)
    with WeightGradStore.collect() as item:
        out.square().sum().backward()
    assert torch.equal(x.grad, ref_dx)
    assert w.grad is None and len(item) == 1  # the weight GEMM waits for W
    WeightGradStore.run(item)
    assert torch.equal(w.grad, ref_dw)

    revert_feature_patches()
    assert layers.linear_with_grad_accumulation_and_async_allreduce is original
