"""Several training setups in one process group stay independent (what the EPLB training
benchmark's interleaving, benchmarks/eplb_train_bench.py, relies on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_dualpipe.testing import run_distributed

ROOT = Path(__file__).resolve().parent.parent
TINY = ["parallel.pp=1", "parallel.ep=2", "parallel.nproc_per_node=2", "model.num_layers=2",
        "train.global_batch_size=4", "train.steps=3", "train.log_dir=/tmp/interleave_test"]


def _interleaved_losses():
    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.data import make_source
    from megatron_dualpipe.distributed import destroy_distributed
    from megatron_dualpipe.train import _dp_rank, setup, train_step

    recipe = ROOT / "recipes" / "tiny_moe_cpu.yaml"
    a = load_recipe(recipe, TINY)
    b = load_recipe(recipe, TINY + ["moe.expert_bias=false", "eplb.enabled=true",
                                    "eplb.num_redundant_experts=4", "eplb.interval=1"])
    try:
        states = [setup(r) for r in (a, b, a)]  # A, a different model B (EPLB), then A again
        sources = [make_source(s.recipe, _dp_rank(), s.device) for s in states]
        losses = [[], [], []]
        for step in range(3):
            for i in (2, 1, 0):  # the later-built states step first
                losses[i].append(train_step(states[i], sources[i], step)["loss"])
        return losses
    finally:
        destroy_distributed()


@pytest.mark.slow  # 2 processes, 3 tiny models, 3 steps each: ~15 s
def test_states_built_later_do_not_change_earlier_ones():
    first, other, again = run_distributed(_interleaved_losses, 2)[0]
    assert first == again  # same recipe, same seed: bit-identical despite B in between
    assert other != first  # B is a different model (EPLB replicas, no bias)
    assert first[-1] < first[0]
