"""Routing scenarios of the EPLB benchmark produce the load shapes they promise.

Loads are measured by routing random tokens the way Megatron's sigmoid router does
(sigmoid(logit + offset), top-k) and counting tokens per expert, independently of the
scenario's own bookkeeping.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.eplb_scenarios import Scenario, apply

E, TOPK = 16, 4


def loads(offsets: torch.Tensor, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, offsets.numel(), generator=gen) + offsets
    top = torch.sigmoid(logits).topk(TOPK, dim=1).indices
    return torch.bincount(top.reshape(-1), minlength=offsets.numel())


def test_static_is_the_router_bias_init_ramp_and_hot_at_the_top():
    sc = Scenario("static", E, skew=0.3)
    for step in (0, 5, 100):
        assert torch.equal(sc.offsets(step), torch.arange(E, dtype=torch.float32) * 0.3)
        counts = loads(sc.offsets(step), seed=step)
        assert int(counts.argmax()) == E - 1 == sc.hottest(step)
        assert counts[E - 1] > 3 * counts[:E // 2].max()  # the ramp: cold half far below


def test_drift_moves_the_hottest_expert_on_schedule():
    sc = Scenario("drift", E, skew=0.3, drift_every=3, drift_experts=2)
    hottest = [int(loads(sc.offsets(s), seed=s).argmax()) for s in range(12)]
    # hot spot: E-1 for steps 0-2, then +2 experts every 3 steps (mod E)
    assert hottest == [15, 15, 15, 1, 1, 1, 3, 3, 3, 5, 5, 5]
    assert hottest == [sc.hottest(s) for s in range(12)]
    assert torch.equal(sc.offsets(0), Scenario("static", E, skew=0.3).offsets(0))
    assert torch.equal(sc.offsets(9), sc.offsets(0).roll(6))  # the same ramp, moved


def test_burst_switches_domain_on_the_stated_steps_and_back():
    sc = Scenario("burst", E, skew=0.3, burst_period=5, burst_len=2, seed=3)
    assert sc.burst_steps(15) == [3, 4, 8, 9, 13, 14]
    base = loads(sc.offsets(0))
    for step in range(15):
        counts = loads(sc.offsets(step))  # same tokens each step: only the domain differs
        if step in sc.burst_steps(15):
            perm = sc.permutation()
            assert int(counts.argmax()) == int(perm[E - 1]) == sc.hottest(step) != E - 1
            assert not torch.equal(counts, base)
            assert torch.equal(sc.offsets(step)[perm], sc.offsets(0))  # permuted ramp
        else:
            assert torch.equal(counts, base)


def test_uniform_and_errors():
    assert torch.equal(Scenario("uniform", E, skew=0.3).offsets(7), torch.zeros(E))
    with pytest.raises(ValueError, match="allowed static, drift, burst, uniform"):
        Scenario("zipf", E, skew=0.1)
    with pytest.raises(ValueError, match="burst_len"):
        Scenario("burst", E, skew=0.1, burst_period=2, burst_len=2)


def test_router_logit_offset_replaces_the_ramp_bit_for_bit(monkeypatch):
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_dualpipe.eplb.router import EPLBRouter, make_router_class

    monkeypatch.setattr(TopKRouter, "gating", lambda self, x: x)
    cls = make_router_class(E, bias_init=0.3)
    router = object.__new__(cls)  # gating needs no module state once the gate is stubbed
    x = torch.randn(8, E, generator=torch.Generator().manual_seed(1))
    ramp = EPLBRouter.gating(router, x)
    router.logit_offset = Scenario("static", E, skew=0.3).offsets(0)
    assert torch.equal(EPLBRouter.gating(router, x), ramp)

    class Fake:
        weight = torch.zeros(1)

    fakes = [Fake(), Fake()]
    sc = Scenario("drift", E, skew=0.3)
    apply(fakes, sc, 4)
    assert all(torch.equal(f.logit_offset, sc.offsets(4)) for f in fakes)
