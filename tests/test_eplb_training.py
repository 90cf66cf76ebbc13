"""Training-time EPLB on CPU/gloo: invariance under replication, live moves, checkpoints.

A tiny model (1 dense + 1 MoE layer, 8 logical experts) on 2 processes (ep=2, pp=1, so dp=2
and expert-dp=1), fp32. Several training runs share one process group to save start-up time.
The eplb recipe itself (pp=2 x ep=2, 4 processes) runs end to end in the last test.

Measured here: losses of 8 vs 12 slots agree to ~2e-8 relative, logical-expert gradients to
~5e-7 (max |diff| / max |grad| per tensor, float32 sums over replicas in another order);
moves and resumes reproduce the losses exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_dualpipe.testing import run_distributed

pytestmark = pytest.mark.slow  # multi-process gloo runs

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny_moe_cpu.yaml"
BASE = ["parallel.pp=1", "model.num_layers=2", "train.global_batch_size=8",
        "eplb.window=4", "eplb.interval=1000"]
# Expert e's logit gets -0.15 e: experts 0-3, the ones the initial 12-slot placement replicates
# (slot s holds s % 8), take most tokens.
SKEW = ["moe.router_bias_init=-0.15"]
S8 = ["eplb.enabled=true", "eplb.num_redundant_experts=0"]
S12 = ["eplb.enabled=true", "eplb.num_redundant_experts=4"]
S16 = ["eplb.enabled=true", "eplb.num_redundant_experts=8"]
REL = 1e-6
NEW_PLACEMENT = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, 1, 2, 3])


# ---- worker side -----------------------------------------------------------------------------
def _recipe(over: list[str], log_dir: str):
    from megatron_dualpipe.config import load_recipe

    return load_recipe(RECIPE, BASE + over + [f"train.log_dir={log_dir}"])


def _eplb(state):
    from megatron_dualpipe.eplb.training import EPLBHook

    return next((h for h in state.hooks if isinstance(h, EPLBHook)), None)


def _train(recipe, steps: int, after=None, grads: bool = False):
    """Set up, train ``steps`` steps (calling ``after(state, step)``), tear the model down."""
    from megatron.core import parallel_state

    from megatron_dualpipe.data import make_source
    from megatron_dualpipe.hooks import TrainHook
    from megatron_dualpipe.train import setup, train_step

    state = setup(recipe)
    probe = None
    if grads:
        class GradProbe(TrainHook):
            def __init__(self):
                self.steps = []

            def on_grads_ready(self, st):
                self.steps.append(_logical_grads(_eplb(st)))

        probe = GradProbe()
        state.hooks.append(probe)
    source = make_source(recipe, parallel_state.get_data_parallel_rank(), state.device)
    losses = []
    for step in range(steps):
        losses.append(train_step(state, source, step)["loss"])
        state.step += 1
        if after is not None:
            after(state, step)
    return state, losses, (probe.steps if probe else None)


def _teardown():
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _logical_grads(hook) -> dict:
    """{(layer, expert, name): main_grad} of the canonical replica of each local expert."""
    out = {}
    for layer in hook.layers:
        canonical = layer.router.expert_map.canonical()
        for j, plist in enumerate(layer.params):
            slot = layer.global_slot(j)
            expert = int(layer.phy2log[slot])
            if int(canonical[expert]) == slot:
                for name, param in plist:
                    out[(layer.layer_id, expert, name)] = param.main_grad.detach().clone()
    return out


def _slots(hook) -> dict:
    """{(layer, slot): (expert, weights + optimizer tensors)} of this rank's slots."""
    from megatron_dualpipe.eplb.rebalance import slot_payload

    out = {}
    for layer in hook.layers:
        for j in range(layer.slots_per_rank):
            slot = layer.global_slot(j)
            payload = [t.detach().clone() for t in slot_payload(layer, hook.access, j)]
            out[(layer.layer_id, slot)] = (int(layer.phy2log[slot]), payload)
    return out


def _move_mid_run(res: dict):
    """An ``after(state, step)`` that, after step 2, injects failed moves, then moves to
    `NEW_PLACEMENT`, recording the slots before and after."""
    import torch.distributed as dist

    def after(state, step):
        if step != 1:
            return
        hook = _eplb(state)
        before, placement = _slots(hook), hook.placement()
        for phase in ("before_transfer", "before_commit"):
            def fault(p, phase=phase):
                if p == phase and dist.get_rank() == 1:
                    raise RuntimeError(f"injected failure {p}")

            assert hook.rebalance(state, force=True, fault=fault) is None
            intact = _slots(hook)
            same = all(torch.equal(a, b) for k in before
                       for a, b in zip(before[k][1], intact[k][1]))
            res[f"intact_{phase}"] = same and all(
                torch.equal(placement[k], v) for k, v in hook.placement().items())
        # Every expert changes rank or slot; rank 1 holds two replicas each of 0 and 1.
        stats = hook.rebalance(state, placement={2: NEW_PLACEMENT})
        res["stats"] = (stats.slots_moved, stats.bytes_received, stats.seconds)
        res["before"], res["after"] = before, _slots(hook)
        res["placement_before"], res["placement_after"] = placement, hook.placement()

    return after


def worker_main(tmp: str) -> dict:
    """Plain Megatron router vs identity EPLB; 8 vs 12 slots with a skewed router (5 steps);
    12 slots again with failed moves and a forced move after step 2."""
    import torch.distributed as dist

    from megatron_dualpipe.distributed import destroy_distributed

    res = {}
    try:
        for name, over, grads in (("plain", [], False), ("identity", S8, False),
                                  ("s8", S8 + SKEW, True), ("s12", S12 + SKEW, True)):
            state, losses, g = _train(_recipe(over, f"{tmp}/{name}"), 5, grads=grads)
            res[name] = {"losses": losses, "grads": g}
            hook = _eplb(state)
            if hook is not None:
                res[name]["slots"] = _slots(hook)
            _teardown()
        moved = {}
        _, moved["losses"], _ = _train(_recipe(S12 + SKEW, f"{tmp}/moved"), 5,
                                       after=_move_mid_run(moved))
        _teardown()
        res["moved"] = moved
        res["rank"] = dist.get_rank()
        return res
    finally:
        destroy_distributed()


def worker_resume(tmp: str) -> dict:
    """Uninterrupted 3 steps (12 slots, replanning every step) vs save after 2 + resume with
    16 and with 8 slots."""
    import shutil

    import torch.distributed as dist

    from megatron_dualpipe.distributed import destroy_distributed
    from megatron_dualpipe.train import train

    res = {}
    common = SKEW + ["eplb.interval=1", "eplb.min_gain=0.0", "train.steps=3"]
    try:
        state = train(_recipe(S12 + common, f"{tmp}/full"), stop_after=3)
        res["full"] = [r["loss"] for r in state.history]
        _teardown()
        ckpt = [f"train.ckpt_dir={tmp}/ckpt", "train.save_interval=2"]
        state = train(_recipe(S12 + common + ckpt, f"{tmp}/first"), stop_after=2)
        res["first"] = [r["loss"] for r in state.history]
        res["saved_placement"] = _eplb(state).placement()
        _teardown()
        for name, slots in (("s16", S16), ("s8", S8)):
            if dist.get_rank() == 0:  # each resume gets its own copy of the step-2 checkpoint
                shutil.copytree(f"{tmp}/ckpt", f"{tmp}/ckpt_{name}")
            dist.barrier()
            over = slots + common + [f"train.ckpt_dir={tmp}/ckpt_{name}"]
            state = train(_recipe(over, f"{tmp}/{name}"), stop_after=3)
            res[name] = [r["loss"] for r in state.history]
            res[f"{name}_placement"] = _eplb(state).placement()
            _teardown()
        res["rank"] = dist.get_rank()
        return res
    finally:
        destroy_distributed()


# ---- checks ----------------------------------------------------------------------------------
def _merge(results: list[dict], key: str) -> dict:
    out = {}
    for r in results:
        out.update(r[key])
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(worker_main, 2, (str(tmp_path_factory.mktemp("eplb")),))


@pytest.fixture(scope="module")
def invariance(runs):
    return runs


@pytest.fixture(scope="module")
def rebalanced(runs):
    return [r["moved"] for r in runs], runs[0]["s12"]["losses"]


def test_identity_placement_is_megatron_bit_for_bit(invariance):
    r = invariance[0]
    assert r["identity"]["losses"] == r["plain"]["losses"]


def test_replication_keeps_losses_and_logical_gradients(invariance):
    r = invariance[0]
    s8, s12 = r["s8"]["losses"], r["s12"]["losses"]
    worst = max(_rel(a, b) for a, b in zip(s12, s8))
    print(f"\n8 slots: {s8}\n12 slots: {s12}\nmax rel loss diff {worst:.2e}")
    assert worst <= REL
    assert len(set(s8)) == len(s8)  # it trains
    grad_worst = 0.0
    for step in range(5):
        g8 = {}
        g12 = {}
        for rank in invariance:
            g8.update(rank["s8"]["grads"][step])
            g12.update(rank["s12"]["grads"][step])
        assert g8.keys() == g12.keys() and len(g8) == 8 * 2
        # The replicated experts (0-3) get tokens, so their gradients are sums over replicas.
        assert all(float(g12[k].abs().max()) > 0 for k in g12 if k[1] < 4)
        for key, ref in g8.items():
            diff = float((g12[key] - ref).abs().max() / ref.abs().max())
            grad_worst = max(grad_worst, diff)
    print(f"max rel logical-expert gradient diff {grad_worst:.2e}")
    assert grad_worst <= REL


def test_replicas_stay_identical(invariance):
    slots = _merge([r["s12"] for r in invariance], "slots")
    by_expert: dict = {}
    for (layer, _), (expert, payload) in slots.items():
        by_expert.setdefault((layer, expert), []).append(payload)
    assert sum(len(v) > 1 for v in by_expert.values()) == 4
    for replicas in by_expert.values():
        for other in replicas[1:]:
            assert all(torch.equal(a, b) for a, b in zip(replicas[0], other))


def test_failed_move_leaves_the_old_placement(rebalanced):
    for r in rebalanced[0]:
        assert r["intact_before_transfer"] and r["intact_before_commit"]


def test_forced_rebalance_moves_state_bit_exactly(rebalanced):
    rebalanced = rebalanced[0]
    r0 = rebalanced[0]
    before_p, after_p = r0["placement_before"], r0["placement_after"]
    assert torch.equal(after_p[2], NEW_PLACEMENT) and not torch.equal(before_p[2], NEW_PLACEMENT)
    before = _merge(rebalanced, "before")
    after = _merge(rebalanced, "after")
    logical = {(layer, expert): payload for (layer, _), (expert, payload) in before.items()}
    moved = 0
    for (layer, slot), (expert, payload) in after.items():
        ref = logical[(layer, expert)]
        assert len(payload) == len(ref) > 2  # weights + exp_avg/exp_avg_sq/step
        assert all(torch.equal(a, b) for a, b in zip(payload, ref))
        moved += before[(layer, slot)][0] != expert
    stats = [r["stats"] for r in rebalanced]
    print(f"\nslots moved {moved}; per rank (slots, bytes received, s): {stats}")
    assert moved == stats[0][0] > 0


def test_rebalance_does_not_change_the_next_losses(rebalanced):
    moved, base = rebalanced[0][0]["losses"], rebalanced[1]
    print(f"\nwithout move: {base}\nmoved after step 2: {moved}")
    assert moved[:2] == base[:2]
    assert max(_rel(a, b) for a, b in zip(moved[2:], base[2:])) <= REL


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    return run_distributed(worker_resume, 2, (str(tmp_path_factory.mktemp("res")),))


def test_resume_with_other_placement_and_redundancy(resumed):
    r = resumed[0]
    full = r["full"]
    print(f"\nuninterrupted: {full}\nfirst 2: {r['first']}\nresumed 16 slots: {r['s16']}"
          f"\nresumed 8 slots: {r['s8']}")
    assert r["first"] == full[:2]
    for name, slots in (("s16", 16), ("s8", 8)):
        assert len(r[name]) == 1
        assert _rel(r[name][0], full[2]) <= REL
        placement = next(iter(r[f"{name}_placement"].values()))
        assert len(placement) == slots


# ---- the eplb recipe, end to end ------------------------------------------------------------
EPLB_RECIPE = RECIPE.parent / "tiny_moe_cpu_eplb.yaml"


def worker_recipe(log_dir: str) -> list[dict] | None:
    """The eplb recipe (pp=2 x ep=2, 4 processes), shortened: replan after step 3."""
    import torch.distributed as dist

    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.distributed import destroy_distributed
    from megatron_dualpipe.train import train

    over = ["train.steps=5", "eplb.interval=3", "eplb.window=3", f"train.log_dir={log_dir}"]
    try:
        state = train(load_recipe(EPLB_RECIPE, over))
        return state.history if dist.get_rank() == 0 else None
    finally:
        destroy_distributed()


def test_eplb_recipe_balancedness_improves_after_the_first_replan(tmp_path):
    import json

    from megatron_dualpipe.config import load_recipe

    recipe = load_recipe(EPLB_RECIPE)
    assert recipe.eplb.enabled and recipe.eplb.num_redundant_experts == 4
    history = run_distributed(worker_recipe, 4, (str(tmp_path),))[0]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(5))
    bal = [r["eplb_balancedness"] for r in history]
    print(f"\nbalancedness per step: {[round(b, 3) for b in bal]}; "
          f"replan: {[r['eplb_replanned'] for r in history]}")
    assert len(history[0]["eplb_balancedness_per_layer"]) == 3  # MoE layers 2-4 of both stages
    assert history[2]["eplb_replanned"] > 0 and history[2]["eplb_move_bytes_max_rank"] > 0
    assert min(bal[3:]) > max(bal[:3]) + 0.2
    # the pay-off estimate of the interval (eplb/payoff.py): plan + move spread over 3 steps
    moved = history[2]
    assert moved["eplb_payoff_cost_ms"] >= (moved["eplb_move_ms"] + moved["eplb_plan_ms"]) / 3
    assert "eplb_payoff_saved_ms" in moved and "eplb_payoff_cost_ms" not in history[1]
