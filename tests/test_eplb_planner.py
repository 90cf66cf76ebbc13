"""EPLB planner: golden compat results, validation, fast-mode quality, migration, reporting."""

import numpy as np
import pytest
import torch

from megatron_dualpipe.eplb import count_duplicates, rebalance_experts, report, slot_moves
from megatron_dualpipe.eplb.compat import greedy_replicate
from megatron_dualpipe.eplb.placement.planner import replica_counts

# DeepSeek's published example (README of deepseek-ai/EPLB).
EXAMPLE_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                               [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
EXAMPLE_ARGS = (16, 4, 2, 8)  # num_replicas, num_groups, num_nodes, num_gpus
PUBLISHED_HIERARCHICAL = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                          [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
# Global policy on the same input. Obtained by running the reference eplb.py with
# rebalance_experts_hierarchical(weight, 16, 1, 1, 8) (what its global branch calls) and checked
# by hand for layer 0:
#   replicate: the 4 extra slots go, one at a time, to the largest load/count: 183 (e10), 165
#     (e5), 132 (e1), 104 (e4) -> per-replica loads 91.5, 82.5, 66, 52.
#   pack 16 replicas on 8 GPUs x 2 slots, heaviest first to the lightest GPU with room, lowest
#     GPU index on ties: the 8 heaviest (e10, e10, e0=90, e11=86, e5, e5, e8=73, e1=66) open
#     GPUs 0..7; then e1 (66) -> GPU 7 (66, lightest; the greedy duplicates e1 there),
#     e3 -> GPU 6, e9 -> GPU 4, e4 -> GPU 5, e4 -> GPU 3, e2 -> GPU 2, e6 -> GPU 0, e7 -> GPU 1.
#   slots keep pack order within a GPU -> [10,6, 10,7, 0,2, 11,4, 5,9, 5,4, 8,3, 1,1].
# Layer 1 follows the same rules (expert 8 ends up twice on GPU 6 through the 86.0 tie).
DERIVED_GLOBAL = [[10, 6, 10, 7, 0, 2, 11, 4, 5, 9, 5, 4, 8, 3, 1, 1],
                  [1, 10, 2, 4, 5, 11, 5, 0, 6, 7, 6, 3, 8, 8, 9, 7]]


def check_consistent(phy2log, log2phy, logcnt, num_logical):
    """logcnt counts phy2log, and log2phy lists exactly each expert's slots (then -1 padding)."""
    phy2log, log2phy, logcnt = phy2log.numpy(), log2phy.numpy(), logcnt.numpy()
    for layer in range(phy2log.shape[0]):
        assert (np.bincount(phy2log[layer], minlength=num_logical) == logcnt[layer]).all()
        for e in range(num_logical):
            row = log2phy[layer, e]
            slots = row[: logcnt[layer, e]]
            assert (row[logcnt[layer, e]:] == -1).all()
            assert (phy2log[layer, slots] == e).all()
            assert len(set(slots.tolist())) == logcnt[layer, e]


@pytest.mark.parametrize("policy,expected", [("hierarchical", PUBLISHED_HIERARCHICAL),
                                             ("global", DERIVED_GLOBAL)])
def test_compat_golden(policy, expected):
    phy2log, log2phy, logcnt = rebalance_experts(EXAMPLE_WEIGHT, *EXAMPLE_ARGS, mode="compat",
                                                 policy=policy)
    assert phy2log.tolist() == expected
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    check_consistent(phy2log, log2phy, logcnt, 12)
    assert log2phy.shape == (2, 12, int(logcnt.max()))


def test_compat_auto_policy_dispatch():
    auto = rebalance_experts(EXAMPLE_WEIGHT, *EXAMPLE_ARGS, mode="compat")[0]
    assert auto.tolist() == PUBLISHED_HIERARCHICAL  # 4 groups % 2 nodes == 0
    # 3 groups do not split over 2 nodes -> global policy
    auto3 = rebalance_experts(EXAMPLE_WEIGHT, 16, 3, 2, 8, mode="compat")[0]
    glob3 = rebalance_experts(EXAMPLE_WEIGHT, 16, 3, 2, 8, mode="compat", policy="global")[0]
    assert auto3.tolist() == glob3.tolist() == DERIVED_GLOBAL


def test_compat_replicate_matches_vectorized_counts():
    """The fast mode's one-shot count selection equals the greedy's counts (no cap binding)."""
    rng = np.random.default_rng(3)
    weight = rng.lognormal(0, 1, (20, 24)).astype(np.float32)
    for num_slots in (24, 30, 40, 70):  # 70 - 24 = 46 > 16 exercises the bisection path
        _, _, greedy = greedy_replicate(weight, num_slots)
        ours = replica_counts(weight.astype(np.float64), num_slots, cap=num_slots)
        assert (ours.sum(axis=1) == num_slots).all()
        np.testing.assert_allclose((weight / ours).max(axis=1), (weight / greedy).max(axis=1),
                                   rtol=1e-6)


@pytest.mark.parametrize("args,kwargs,word", [
    ((16, 4, 2, 8), {"mode": "slow"}, "mode"),
    ((16, 4, 2, 8), {"policy": "random"}, "policy"),
    ((15, 4, 2, 8), {}, "num_replicas"),
    ((8, 4, 2, 8), {}, "num_replicas"),  # fewer slots than experts
    ((16, 4, 3, 8), {}, "num_gpus"),  # 8 GPUs over 3 nodes
    ((16, 0, 2, 8), {}, "num_groups"),
    ((16, 4, 2, 2.5), {}, "num_gpus"),
    ((16, 4, True, 8), {}, "num_nodes"),
    ((16, 5, 1, 8), {"policy": "hierarchical"}, "num_groups"),  # 12 experts in 5 groups
    ((16, 3, 2, 8), {"policy": "hierarchical"}, "num_groups"),  # 3 groups over 2 nodes
])
def test_validation_names_the_argument(args, kwargs, word):
    with pytest.raises(ValueError, match=word):
        rebalance_experts(EXAMPLE_WEIGHT, *args, **kwargs)


@pytest.mark.parametrize("weight,word", [
    (torch.ones(12), "2-D"),
    (torch.full((2, 12), float("nan")), "finite"),
    (-torch.ones(2, 12), "non-negative"),
    ([["a"] * 12], "numeric"),
])
def test_validation_of_weight(weight, word):
    with pytest.raises(ValueError, match=word):
        rebalance_experts(weight, 16, 4, 2, 8)


def test_fast_accepts_numpy_torch_and_ints_alike():
    as_torch = rebalance_experts(EXAMPLE_WEIGHT, *EXAMPLE_ARGS)
    as_numpy = rebalance_experts(EXAMPLE_WEIGHT.numpy(), *EXAMPLE_ARGS)
    as_float = rebalance_experts(EXAMPLE_WEIGHT.double(), *EXAMPLE_ARGS)
    for a, b, c in zip(as_torch, as_numpy, as_float):
        assert torch.equal(a, b) and torch.equal(a, c)
    check_consistent(*as_torch, 12)


@pytest.mark.parametrize("policy", ["hierarchical", "global"])
def test_fast_balances_at_least_as_well_as_greedy(policy):
    """Mean balancedness over layers, on skewed loads at a mid-size shape, no duplicates."""
    rng = np.random.default_rng(0)
    for sigma in (0.5, 1.0, 1.5):
        weight = rng.lognormal(0, sigma, (16, 64))
        fast = rebalance_experts(weight, 96, 8, 4, 16, policy=policy)[0]
        greedy = rebalance_experts(weight, 96, 8, 4, 16, policy=policy, mode="compat")[0]
        ours, theirs = report(weight, fast, 16, 4), report(weight, greedy, 16, 4)
        assert ours.mean_balancedness >= theirs.mean_balancedness
        assert ours.duplicates == 0


def test_fast_handles_degenerate_loads():
    for weight in (np.zeros((3, 16)), np.ones((3, 16)), np.eye(16)[:3] * 100):
        phy2log, log2phy, logcnt = rebalance_experts(weight, 32, 4, 2, 8)
        check_consistent(phy2log, log2phy, logcnt, 16)
        assert count_duplicates(phy2log.numpy(), 8) == 0


def test_fast_single_hot_expert_is_spread_over_all_gpus_of_its_node():
    weight = np.ones((1, 16))
    weight[0, 5] = 1000.0
    phy2log, _, logcnt = rebalance_experts(weight, 32, 4, 2, 8)  # 4 GPUs per node
    assert logcnt[0, 5] == 4  # more would force two replicas onto one GPU
    gpus = (phy2log[0] == 5).nonzero().flatten() // 4
    assert sorted(gpus.tolist()) == [0, 1, 2, 3]  # expert 5's group (1) lives on node 0


def drifted(weight, seed, sigma=0.1):
    return weight * np.random.default_rng(seed).lognormal(0, sigma, weight.shape)


@pytest.mark.parametrize("policy", ["hierarchical", "global"])
def test_migration_within_tolerance_and_moves_few_slots(policy):
    rng = np.random.default_rng(1)
    weight = rng.lognormal(0, 1, (12, 64))
    current = rebalance_experts(weight, 96, 8, 4, 16, policy=policy)[0]
    new_weight = drifted(weight, 2)
    fresh = rebalance_experts(new_weight, 96, 8, 4, 16, policy=policy)[0]
    plan = rebalance_experts(new_weight, 96, 8, 4, 16, policy=policy, current_phy2log=current)
    check_consistent(*plan, 64)
    assert plan[2].min() >= 1
    ours = report(new_weight, plan[0], 16, 4, current_phy2log=current, expert_bytes=10)
    ref = report(new_weight, fresh, 16, 4, current_phy2log=current)
    assert (ours.balancedness >= 0.99 * ref.balancedness - 1e-12).all()
    assert ours.slots_moved < ref.slots_moved / 2
    assert ours.bytes_moved == 10 * ours.slots_moved
    assert ours.duplicates == 0


def test_migration_keeps_a_good_plan_untouched():
    weight = np.random.default_rng(4).lognormal(0, 1, (6, 64))
    current = rebalance_experts(weight, 96, 8, 4, 16)[0]
    again = rebalance_experts(weight, 96, 8, 4, 16, current_phy2log=current)[0]
    assert torch.equal(again, current)


def test_migration_repairs_an_incomplete_or_foreign_placement():
    weight = np.random.default_rng(5).lognormal(0, 1, (3, 16))
    broken = np.zeros((3, 32), np.int64)  # only expert 0 placed, duplicates everywhere
    plan = rebalance_experts(weight, 32, 4, 2, 8, current_phy2log=broken)
    check_consistent(*plan, 16)
    assert plan[2].min() >= 1
    compat_plan = rebalance_experts(weight, 32, 4, 2, 8, mode="compat")[0]
    plan = rebalance_experts(drifted(weight, 6), 32, 4, 2, 8, current_phy2log=compat_plan)
    assert plan[2].min() >= 1


@pytest.mark.parametrize("current,word", [
    (np.zeros((3, 31), np.int64), "shape"),
    (np.full((3, 32), 16), r"\[0, 16\)"),
    (np.full((3, 32), 0.5), "integer"),
])
def test_migration_validates_current(current, word):
    weight = np.ones((3, 16))
    with pytest.raises(ValueError, match=word):
        rebalance_experts(weight, 32, 4, 2, 8, current_phy2log=current)


def test_migration_rejected_in_compat_mode():
    with pytest.raises(ValueError, match="current_phy2log"):
        rebalance_experts(EXAMPLE_WEIGHT, *EXAMPLE_ARGS, mode="compat",
                          current_phy2log=torch.tensor(PUBLISHED_HIERARCHICAL))


def test_report_on_a_hand_sized_example():
    weight = np.array([[4.0, 2.0, 2.0, 0.0]])
    phy2log = np.array([[0, 1, 0, 2, 3, 3, 1, 2]])  # 4 GPUs x 2 slots, 2 nodes
    # counts 2,2,2,2 -> slot loads 2,1,2,1,0,0,1,1 -> GPU loads 3,3,0,2
    rep = report(weight, phy2log, 4, 2, current_phy2log=np.array([[0, 1, 0, 2, 3, 3, 2, 1]]),
                 expert_bytes=7)
    assert rep.balancedness[0] == pytest.approx(2.0 / 3.0)
    assert rep.balancedness_per_node[0].tolist() == pytest.approx([1.0, 0.5])
    assert rep.duplicates == 1  # expert 3 twice on GPU 2
    assert rep.slots_moved == 2 and rep.bytes_moved == 14
    assert rep.as_dict()["slots_moved_per_layer"] == [2]


def test_slot_moves_lists_changed_slots():
    old = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    new = torch.tensor([[0, 2, 2, 3], [3, 2, 1, 0]])
    assert slot_moves(old, new) == [[(1, 1, 2)], []]
    with pytest.raises(ValueError, match="shape"):
        slot_moves(old, new[:, :3])


def test_the_placement_planner_imports_no_torch():
    """eplb/placement is pure numpy: none of its files imports torch (or the torch wrappers)."""
    import ast
    from pathlib import Path

    import megatron_dualpipe.eplb.placement as placement

    for path in Path(placement.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not [n for n in names if n.split(".")[0] == "torch"], path
        assert all(n.startswith("megatron_dualpipe.eplb.placement") for n in names
                   if n.startswith("megatron_dualpipe")), path
