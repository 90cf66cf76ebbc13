"""Property tests: plan invariants over random shapes, skews and policies (hypothesis)."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_dualpipe.eplb import count_duplicates, rebalance_experts, report

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    """A valid (weight, num_replicas, num_groups, num_nodes, num_gpus) with num_groups % nodes
    == 0, so both policies apply."""
    num_nodes = draw(st.sampled_from([1, 2, 4]))
    num_groups = num_nodes * draw(st.integers(1, 3))
    num_logical = num_groups * draw(st.integers(1, 4))
    num_gpus = num_nodes * draw(st.integers(1, 3))
    slots_per_gpu = -(-num_logical // num_gpus) + draw(st.integers(0, 3))
    num_layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    skew = draw(st.sampled_from(["lognormal", "zipf", "ties", "zeros", "one-hot"]))
    rng = np.random.default_rng(seed)
    shape = (num_layers, num_logical)
    if skew == "lognormal":
        weight = rng.lognormal(0, draw(st.floats(0, 2.5)), shape)
    elif skew == "zipf":
        ranks = np.arange(1, num_logical + 1) ** -draw(st.floats(0.5, 1.5))
        weight = np.stack([rng.permutation(ranks) for _ in range(num_layers)]) * 1000
    elif skew == "ties":
        weight = rng.integers(0, 4, shape).astype(np.float64)
    elif skew == "zeros":
        weight = np.zeros(shape)
    else:
        weight = np.zeros(shape)
        weight[:, rng.integers(num_logical)] = 5.0
    return weight, slots_per_gpu * num_gpus, num_groups, num_nodes, num_gpus


def check_plan(weight, plan, num_replicas, num_gpus):
    phy2log, log2phy, logcnt = (t.numpy() for t in plan)
    num_layers, num_logical = weight.shape
    assert phy2log.shape == (num_layers, num_replicas)
    assert num_replicas % num_gpus == 0  # so every GPU has num_replicas // num_gpus slots
    assert logcnt.shape == (num_layers, num_logical)
    assert (logcnt >= 1).all()
    assert (logcnt.sum(axis=1) == num_replicas).all()
    for layer in range(num_layers):
        assert (np.bincount(phy2log[layer], minlength=num_logical) == logcnt[layer]).all()
    # log2phy inverts phy2log: each slot listed exactly once, under its own expert.
    valid = log2phy >= 0
    assert (valid.sum(axis=2) == logcnt).all()
    assert (valid[:, :, :-1] >= valid[:, :, 1:]).all()  # -1 only as trailing padding
    layer_idx, expert_idx, _ = np.nonzero(valid)
    slots = log2phy[valid]
    assert (phy2log[layer_idx, slots] == expert_idx).all()
    for layer in range(num_layers):
        assert sorted(slots[layer_idx == layer].tolist()) == list(range(num_replicas))


def check_groups_within_nodes(phy2log, num_groups, num_nodes, num_logical):
    phy2log = phy2log.numpy()
    num_layers, num_replicas = phy2log.shape
    node_of_slot = np.arange(num_replicas) // (num_replicas // num_nodes)
    group_of_slot = phy2log // (num_logical // num_groups)
    for layer in range(num_layers):
        nodes_per_group = [set(node_of_slot[group_of_slot[layer] == g].tolist())
                           for g in range(num_groups)]
        assert all(len(n) == 1 for n in nodes_per_group)
        groups_on_node = np.bincount([next(iter(n)) for n in nodes_per_group],
                                     minlength=num_nodes)
        assert (groups_on_node == num_groups // num_nodes).all()


def dup_avoidable(weight, num_replicas, num_nodes, num_gpus, hierarchical):
    domains = num_nodes if hierarchical else 1
    return weight.shape[1] // domains >= num_replicas // num_gpus


@SETTINGS
@given(problems(), st.sampled_from(["fast", "compat"]),
       st.sampled_from(["auto", "hierarchical", "global"]))
def test_plan_invariants(problem, mode, policy):
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    plan = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, mode=mode,
                             policy=policy)
    check_plan(weight, plan, num_replicas, num_gpus)
    hierarchical = policy != "global"  # the generated problems have num_groups % num_nodes == 0
    if hierarchical:
        check_groups_within_nodes(plan[0], num_groups, num_nodes, weight.shape[1])
    if mode == "fast" and dup_avoidable(weight, num_replicas, num_nodes, num_gpus, hierarchical):
        assert count_duplicates(plan[0].numpy(), num_gpus) == 0


@SETTINGS
@given(problems(), st.sampled_from(["hierarchical", "global"]), st.integers(0, 2**32 - 1),
       st.floats(0.0, 0.5))
def test_migration_invariants(problem, policy, seed, drift):
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    args = (num_replicas, num_groups, num_nodes, num_gpus)
    current = rebalance_experts(weight, *args, policy=policy)[0]
    new_weight = weight * np.random.default_rng(seed).lognormal(0, drift, weight.shape)
    plan = rebalance_experts(new_weight, *args, policy=policy, current_phy2log=current)
    check_plan(new_weight, plan, num_replicas, num_gpus)
    hierarchical = policy == "hierarchical"
    if hierarchical:
        check_groups_within_nodes(plan[0], num_groups, num_nodes, weight.shape[1])
    if dup_avoidable(weight, num_replicas, num_nodes, num_gpus, hierarchical):
        assert count_duplicates(plan[0].numpy(), num_gpus) == 0
    fresh = rebalance_experts(new_weight, *args, policy=policy)[0]
    ours = report(new_weight, plan[0], num_gpus, num_nodes).balancedness
    best = report(new_weight, fresh, num_gpus, num_nodes).balancedness
    assert (ours >= 0.99 * best - 1e-9).all()


@SETTINGS
@given(problems())
def test_auto_policy_is_global_when_groups_do_not_split_over_nodes(problem):
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    if num_nodes == 1:
        num_nodes, num_gpus = 2, 2 * num_gpus
        num_replicas *= 2
    num_groups = num_nodes * num_groups + 1  # never a multiple of num_nodes
    args = (num_replicas, num_groups, num_nodes, num_gpus)
    auto = rebalance_experts(weight, *args)[0]
    check_plan(weight, rebalance_experts(weight, *args), num_replicas, num_gpus)
    assert (auto == rebalance_experts(weight, *args, policy="global")[0]).all()
