"""EPLB checkpoint layout mapping on a fake EP=2 job: experts saved under one placement are
loaded into another, each physical slot from its logical expert (weights and optimizer state).
"""

from __future__ import annotations

import pytest
import torch

from megatron_dualpipe.eplb import ckpt
from megatron_dualpipe.eplb.load_tracker import LoadWindow
from megatron_dualpipe.eplb.mapping import ExpertMap
from megatron_dualpipe.eplb.replicas import ExpertLayer

NUM_LOGICAL, NUM_SLOTS, EP = 4, 6, 2


class _Router:
    """The router attributes the checkpoint code reads, and `set_placement`."""

    def __init__(self, phy2log, ep_rank):
        self.num_logical, self.num_slots = NUM_LOGICAL, NUM_SLOTS
        self.ep_rank, self.ep_size = ep_rank, EP
        self.slots_per_rank = NUM_SLOTS // EP
        self.tp_dp_cp_group = None
        self.weight = torch.zeros(1)
        self.set_placement(phy2log)

    def set_placement(self, phy2log):
        self.expert_map = ExpertMap.from_phy2log(torch.as_tensor(phy2log), NUM_LOGICAL)


class _Access:
    """Optimizer state per parameter (no distributed optimizer)."""

    def __init__(self):
        self.state = {}

    def read(self, param):
        return self.state[param]

    def write(self, param, tensors):
        self.state[param] = tensors

    def main_param(self, param):
        return None


class _Hook:
    def __init__(self, phy2log, ep_rank, value_of):
        self.access = _Access()
        self.window = LoadWindow(1, NUM_LOGICAL, 4)
        self.window.update(torch.ones(1, NUM_LOGICAL, dtype=torch.float64))
        router = _Router(phy2log, ep_rank)
        params = []
        for j in range(NUM_SLOTS // EP):
            w = torch.nn.Parameter(torch.zeros(2, 2))
            expert = int(router.expert_map.phy2log[ep_rank * (NUM_SLOTS // EP) + j])
            w.data.fill_(value_of(expert))
            self.access.write(w, {"exp_avg": torch.full((4,), 10.0 * value_of(expert))})
            params.append([("weight", w)])
        self.layers = [ExpertLayer(0, router, params)]


def test_experts_saved_in_one_placement_load_into_another(fake_world, tmp_path):
    saved = [0, 1, 1, 2, 3, 3]  # expert 1 replicated on rank 0, expert 3 on rank 1
    wanted = {0: torch.tensor([3, 2, 0, 1, 0, 2])}  # experts move across EP ranks
    for rank in range(EP):  # each rank writes its file (the fake barrier returns at once)
        with fake_world(rank, EP, ep=EP):
            ckpt.save_experts(_Hook(saved, rank, lambda e: e + 1.0), tmp_path)
    for rank in range(EP):
        with fake_world(rank, EP, ep=EP):
            hook = _Hook(saved, rank, lambda e: -1.0)  # weights to be overwritten
            ckpt.load_experts(hook, tmp_path, placement=wanted)
            layer = hook.layers[0]
            assert torch.equal(layer.phy2log, wanted[0])
            for j, plist in enumerate(layer.params):
                expert = int(wanted[0][rank * 3 + j])
                (_, w), = plist
                assert torch.equal(w.data, torch.full((2, 2), expert + 1.0)), (rank, j)
                assert torch.equal(hook.access.state[w]["exp_avg"],
                                   torch.full((4,), 10.0 * (expert + 1.0)))
                # Megatron's `shared` flag: set on every replica but the canonical one
                canonical = int(layer.router.expert_map.canonical()[expert])
                assert w.shared == (canonical != rank * 3 + j)


def test_a_checkpoint_of_another_expert_count_is_a_user_error(fake_world, tmp_path):
    from megatron_dualpipe.errors import UserError

    with fake_world(0, 1):
        ckpt.save_experts(_Hook([0, 1, 1, 2, 3, 3], 0, float), tmp_path)
    meta = tmp_path / ckpt.FOLDER / "layer_0000.meta.pt"
    data = torch.load(meta, weights_only=False)
    data["num_logical"] = 5
    torch.save(data, meta)
    with fake_world(0, 1), pytest.raises(UserError, match="5 logical experts, the model 4"):
        ckpt.load_experts(_Hook([0, 1, 1, 2, 3, 3], 0, float), tmp_path)
