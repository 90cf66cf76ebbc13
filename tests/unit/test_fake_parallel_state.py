"""Stage placement and EPLB replica gradients on one rank of a fake multi-rank job."""

from __future__ import annotations

import pytest
import torch

from megatron_dualpipe.distributed import process_groups
from megatron_dualpipe.model.layout import chunk_placements


@pytest.mark.parametrize("schedule,pp", [("1f1b", 4), ("dualpipev", 4), ("dualpipe", 4)])
def test_each_rank_holds_its_stages_and_reports_them_to_megatron(fake_world, schedule, pp):
    # The definitions (docs/dualpipe.md): 1f1b rank r holds stage r; dualpipev stages r and
    # 2pp-1-r; dualpipe stage r of both pipes, model stages r and pp-1-r.
    expected = {"1f1b": lambda r: [r], "dualpipev": lambda r: [r, 2 * pp - 1 - r],
                "dualpipe": lambda r: [r, pp - 1 - r]}[schedule]
    held = []
    for rank in range(pp):
        with fake_world(rank, pp, pp=pp) as ps:
            pp_rank = ps.get_pipeline_model_parallel_rank()
            assert pp_rank == rank
            placements = chunk_placements(schedule, pp, pp_rank)
            assert [p.stage for p in placements] == expected(rank)
            for p in placements:
                groups = process_groups(p.stage_rank, embedding_group=schedule == "1f1b")
                assert groups.pp.rank() == p.stage_rank == p.stage % pp
                assert groups.pp.size() == pp  # everything else is the real group
                # DualPipe(V) chunks keep no embedding group (the schedule sums the copies);
                # 1f1b keeps Megatron's (first and last pipeline rank)
                in_embd = schedule == "1f1b" and rank in (0, pp - 1)
                assert (groups.embd is not None) == in_embd
            held += [p.stage for p in placements]
    # every stage of the model is held, and by as many ranks as the schedule says
    stages = 2 * pp if schedule == "dualpipev" else pp
    copies = 2 if schedule == "dualpipe" else 1
    assert sorted(held) == sorted(list(range(stages)) * copies)


class _Router:
    """What `sum_replica_grads` reads from an EPLB router."""

    def __init__(self, expert_map, ep_rank, ep_size, ep_group):
        self.expert_map = expert_map
        self.ep_rank, self.ep_size, self.ep_group = ep_rank, ep_size, ep_group
        self.num_slots = expert_map.num_slots
        self.slots_per_rank = self.num_slots // ep_size


def test_replica_gradients_are_summed_over_the_replicas_of_each_expert(fake_world):
    from megatron_dualpipe.eplb.mapping import ExpertMap
    from megatron_dualpipe.eplb.replicas import ExpertLayer, sum_replica_grads

    # 4 logical experts in 6 slots over EP=2 (3 per rank); expert 1 has replicas in slots 1
    # and 2 (both on rank 0) and expert 3 in slots 3 and 5 (rank 1).
    phy2log = torch.tensor([0, 1, 1, 2, 3, 3])
    generator = torch.Generator().manual_seed(0)
    for rank in range(2):
        with fake_world(rank, 2, ep=2) as ps:
            assert ps.get_expert_model_parallel_rank() == rank
            router = _Router(ExpertMap.from_phy2log(phy2log, 4), rank, 2,
                             ps.get_expert_model_parallel_group())
            params = []
            for _ in range(3):
                w = torch.nn.Parameter(torch.zeros(2, 3))
                w.grad = torch.randn(2, 3, generator=generator)
                params.append([("weight", w)])
            before = [p[0][1].grad.clone() for p in params]
            sum_replica_grads([ExpertLayer(0, router, params)])
            after = [p[0][1].grad for p in params]
            # The fake all-reduce adds nothing from the other rank: each replica gets the sum
            # of this rank's replicas of its expert; experts without replicas are untouched.
            logical = phy2log[rank * 3:(rank + 1) * 3].tolist()
            for j, expert in enumerate(logical):
                same = [before[k] for k, e in enumerate(logical) if e == expert]
                replicated = int((phy2log == expert).sum()) > 1
                want = sum(same) if replicated else before[j]
                assert torch.equal(after[j], want), (rank, j)
