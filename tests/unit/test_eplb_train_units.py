"""Unit tests of training-time EPLB pieces that need no process group."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_dualpipe.eplb.load_tracker import LoadWindow, balance_stats
from megatron_dualpipe.eplb.mapping import ExpertMap, slot_choices, static_placement, to_slots
from megatron_dualpipe.eplb.rebalance import _moves, _pack, plan


def test_static_placement_and_maps():
    emap = ExpertMap.from_phy2log(static_placement(8, 12), 8)
    assert emap.phy2log.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert emap.logcnt.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert emap.log2phy[0].tolist() == [0, 8] and emap.log2phy[7].tolist() == [7, -1]
    assert emap.canonical().tolist() == list(range(8))
    assert ExpertMap.from_phy2log(torch.arange(8), 8).is_identity()
    with pytest.raises(ValueError, match="without a slot"):
        ExpertMap.from_phy2log(torch.tensor([0, 0, 1, 1]), 3)


def test_candidates_prefer_local_replicas_else_spread():
    # 4 EP ranks x 2 slots: rank0 [0, 1], rank1 [2, 3], rank2 [0, 0], rank3 [1, 2].
    emap = ExpertMap.from_phy2log(torch.tensor([0, 1, 2, 3, 0, 0, 1, 2]), 4)
    cand, count = emap.candidates(ep_rank=1, ep_size=4)
    assert cand[0, :count[0]].tolist() == [0, 4, 5]  # no local replica of 0: all of them
    assert cand[2, :count[2]].tolist() == [2]  # local
    cand2, count2 = emap.candidates(ep_rank=2, ep_size=4)
    assert cand2[0, :count2[0]].tolist() == [4, 5]  # two local replicas
    slots = slot_choices(cand, count, num_tokens=6)
    assert slots[:, 0].tolist() == [0, 4, 5, 0, 4, 5]  # round robin over token index
    assert slots[:, 3].tolist() == [3] * 6
    assert slot_choices(cand2, count2, 4)[:, 0].tolist() == [4, 5, 4, 5]


def test_to_slots_copies_values_and_gradients():
    emap = ExpertMap.from_phy2log(torch.tensor([0, 1, 2, 3, 0, 0, 1, 2]), 4)
    cand, count = emap.candidates(ep_rank=1, ep_size=4)
    probs = torch.rand(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    routing_map = probs > 0.5
    probs = (probs * routing_map).requires_grad_()
    slots = slot_choices(cand, count, 6)
    phys_probs, phys_map = to_slots(probs, routing_map, slots, 8)
    assert phys_probs.shape == (6, 8) and phys_map.dtype == torch.bool
    assert torch.equal(phys_map.sum(1), routing_map.sum(1))
    assert torch.allclose(phys_probs.sum(1), probs.sum(1))
    for t in range(6):
        for e in range(4):
            assert phys_probs[t, slots[t, e]] == probs[t, e]
            assert phys_map[t, slots[t, e]] == routing_map[t, e]
    weight = torch.rand(6, 8, dtype=torch.float64)
    (phys_probs * weight).sum().backward()
    assert torch.equal(probs.grad, torch.gather(weight, 1, slots))


def test_load_window_sliding_and_ema():
    window = LoadWindow(2, 3, window=2, kind="sliding")
    for k in range(1, 4):
        window.update(torch.full((2, 3), float(k)))
    assert torch.equal(window.estimate(), torch.full((2, 3), 5.0, dtype=torch.float64))
    restored = LoadWindow(2, 3, window=2)
    restored.load_state_dict(window.state_dict())
    assert torch.equal(restored.estimate(), window.estimate()) and restored.steps == 3
    ema = LoadWindow(1, 2, window=3, kind="ema")  # alpha = 0.5
    ema.update(torch.tensor([[4.0, 0.0]]))
    ema.update(torch.tensor([[0.0, 4.0]]))
    assert ema.estimate().tolist() == [[2.0, 2.0]]
    with pytest.raises(ValueError):
        LoadWindow(1, 1, 1, kind="median")


def test_balance_stats():
    slots = torch.tensor([[1.0, 1.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    bal, over = balance_stats(slots, ep_size=2)  # rank loads [2, 6] and idle
    assert bal.tolist() == pytest.approx([4 / 6, 1.0])
    assert over.tolist() == pytest.approx([1.5, 1.0])


def _fake_layer(phy2log, ep):
    phy2log = torch.as_tensor(phy2log)
    return SimpleNamespace(phy2log=phy2log, num_slots=len(phy2log), ep_size=ep,
                           slots_per_rank=len(phy2log) // ep)


def test_move_sources_prefer_the_same_rank():
    old = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    new = torch.tensor([[7, 1, 2, 3, 4, 5, 6, 0, 7, 7, 2, 3]])
    moves = {m.dst: m.src for m in _moves([_fake_layer(old, 2)], new)}
    # 6 slots per rank: slot 0 (rank 0) fetches 7 from rank 1; slots 7, 8, 9 (rank 1) copy
    # locally, expert 0 from its replica in slot 8 and expert 7 from slot 7.
    assert moves == {0: 7, 7: 8, 8: 7, 9: 7}


def test_plan_keeps_placement_below_min_gain():
    layer = _fake_layer(static_placement(8, 12), 2)
    loads = torch.tensor([[1.0, 1, 1, 1, 1, 1, 10, 10]])
    planned = plan([layer], loads, num_groups=1, num_nodes=1, min_gain=0.0)
    assert planned.changed.tolist() == [True]
    assert float(planned.balancedness_after[0]) > float(planned.balancedness_before[0])
    kept = plan([layer], loads, num_groups=1, num_nodes=1, min_gain=2.0)
    assert kept.changed.tolist() == [False]
    forced = plan([layer], loads, num_groups=1, num_nodes=1, min_gain=2.0, force=True)
    assert forced.changed.tolist() == [True]


def test_pack_groups_by_dtype():
    tensors = [torch.ones(2), torch.zeros(3, dtype=torch.float64), torch.full((1,), 2.0)]
    packed = _pack(tensors)
    assert packed[torch.float32].tolist() == [1.0, 1.0, 2.0]
    assert packed[torch.float64].numel() == 3
    assert _pack(tensors, empty=True)[torch.float32].shape == (3,)


def test_planner_topology_and_expert_keys():
    from pathlib import Path

    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.eplb.ckpt import is_expert_key
    from megatron_dualpipe.eplb.training import planner_topology

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "tiny_moe_cpu.yaml")
    assert planner_topology(recipe) == (4, 1)
    assert is_expert_key("decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight")
    assert is_expert_key("decoder.layers.1.mlp.experts.experts.linear_fc2._extra_state")
    assert not is_expert_key("decoder.layers.1.mlp.shared_experts.linear_fc1.weight")
    assert not is_expert_key("decoder.layers.1.mlp.router.expert_bias")


def test_set_router_reaches_partial_moe_specs():
    import functools

    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    from megatron_dualpipe.eplb.router import make_router_class
    from megatron_dualpipe.model.build import set_router

    subs = MoESubmodules(experts=None)
    layer = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        mlp=functools.partial(MoELayer, submodules=subs)))
    block = TransformerBlockSubmodules(layer_specs=[layer])
    cls = make_router_class(8, 0.5)
    set_router(block, cls)
    assert subs.router is cls and cls.num_logical == 8 and cls.bias_init == 0.5
