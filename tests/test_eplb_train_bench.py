"""The EPLB training benchmark's CPU path (benchmarks/eplb_train_bench.py --tiny), and what its
interleaving relies on: several training setups in one process group stay independent."""

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


@pytest.mark.slow  # 2 processes, 2 variants x 3 steps of a tiny proxy: ~20 s
def test_eplb_train_bench_tiny(capsys):
    from benchmarks import eplb_train_bench

    assert eplb_train_bench.main(
        ["--tiny", "--scenarios", "drift", "--variants", "bias,bias+eplb", "--warmup", "1",
         "--steps", "2", "--interval", "1", "--bias-steps", "5"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| drift |")]
    assert [r.split("|")[2].strip() for r in rows] == ["bias", "bias+eplb"]
    slots = [int(r.split("|")[3]) for r in rows]
    assert slots == [8, 10]  # 8 experts; + 8 / 4 = 2 redundant slots (a multiple of EP=2)
    assert int(rows[1].split("|")[8]) >= 1  # EPLB rebalanced at least once
    assert rows[0].split("|")[11].strip() == "-"  # bias alone: no rebalance, no estimate
    assert "pay" in rows[1].split("|")[11]  # the hook's pay-off estimate reached the table
    assert "- drift: bias+EPLB" in out
