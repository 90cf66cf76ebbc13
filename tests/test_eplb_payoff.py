"""The EPLB pay-off estimate (megatron_dualpipe/eplb/payoff.py) on hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from megatron_dualpipe.eplb.payoff import (
    REPLICA_OVERHEAD,
    PayoffTracker,
    plain_balancedness,
    routed_expert_share,
)


def test_plain_balancedness_by_hand():
    counts = torch.tensor([[10.0, 30.0, 20.0, 40.0], [25.0, 25.0, 25.0, 25.0]])
    # ep=2: layer 0 ranks hold 10+30=40 and 20+40=60 -> mean 50 / max 60; layer 1 balanced
    assert plain_balancedness(counts, 2).tolist() == pytest.approx([50 / 60, 1.0])


def test_verdict_not_paying_when_the_bias_already_balances():
    tracker = PayoffTracker(moe_share=0.5)
    for _ in range(3):
        tracker.add_step(bal_plain=0.8, bal_slots=1.0, step_time_s=0.1)
    v = tracker.check(plan_move_s=0.03)
    # gain 0.2 of MoE time 0.5 * 100 ms = 10 ms saved; cost 30 ms / 3 steps + 2% of 50 ms = 11
    assert (v.gain, v.saved_ms) == pytest.approx((0.2, 10.0))
    assert v.cost_ms == pytest.approx(10.0 + REPLICA_OVERHEAD * 50.0)
    assert not v.pays
    hint = v.hint()
    assert "does not pay" in hint and "20.0%" in hint and "10.00 ms" in hint
    assert "eplb.enabled=false" in hint
    assert tracker.check(0.0) is None  # restarted


def test_verdict_pays_when_replicas_remove_real_imbalance():
    tracker = PayoffTracker(moe_share=0.5)
    for step_s in (0.1, 0.5, 0.1):  # the move step is slow: the median ignores it
        tracker.add_step(bal_plain=0.6, bal_slots=0.95, step_time_s=step_s)
    v = tracker.check(plan_move_s=0.003)
    gain = 1 - 0.6 / 0.95
    assert v.saved_ms == pytest.approx(gain * 50.0) and v.pays
    assert v.cost_ms == pytest.approx(1.0 + 1.0)


def test_routed_expert_share_of_deepseek_v3():
    from megatron_dualpipe.config import load_recipe

    recipe = load_recipe("recipes/deepseek_v3_671b_ep64_tp1_pp16_h800.yaml")
    # 58 MoE layers x top-8 x 3 x 7168 x 2048 routed weights over the 36.63B activated weights
    # of the main model (docs/deepseek_v3.md; README_WEIGHTS.md: 36.7B)
    routed = 58 * 8 * 3 * 7168 * 2048
    assert routed_expert_share(recipe) == pytest.approx(routed / 36.63e9, rel=2e-3)


def test_hook_logs_the_hint_when_eplb_stops_paying(monkeypatch, capsys):
    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.eplb import training

    monkeypatch.setattr(training.dist, "get_rank", lambda: 0)
    hook = training.EPLBHook(load_recipe("recipes/tiny_moe_cpu_eplb.yaml"))
    assert hook.payoff.moe_share == pytest.approx(routed_expert_share(hook.recipe))

    def interval(bal_plain: float, move_ms: float) -> dict:
        for _ in range(4):
            hook.payoff.add_step(bal_plain, 1.0, 0.1)
        record = {"eplb_move_ms": move_ms, "eplb_plan_ms": 1.0}
        hook._check_payoff(record)
        return record

    record = interval(0.99, 40.0)  # balanced by the bias already: 1% gain, 41 ms to move
    assert record["eplb_payoff_saved_ms"] < record["eplb_payoff_cost_ms"]
    assert "[eplb] hint: EPLB does not pay here" in capsys.readouterr().err
    interval(0.99, 40.0)
    assert capsys.readouterr().err == ""  # logged once while it keeps not paying
    assert interval(0.5, 0.0)["eplb_payoff_saved_ms"] > 0  # pays: no hint
    assert capsys.readouterr().err == ""
    interval(0.99, 40.0)
    assert "does not pay" in capsys.readouterr().err  # stops paying again: logged again
