"""Validation loss (evaluate.py) on indexed data made by `data prepare`.

The slow test builds the same tiny model (same initial weights: model/init.py initializes by
global parameter name) under every pipeline schedule in one 2-process gloo job and checks that
the forward-only validation pass gives the same loss as a direct, schedule-free computation
on the unpipelined model.
"""

from __future__ import annotations

import math

import pytest

from megatron_dualpipe.testing import run_distributed

VOCAB = 300
COMMON = ["parallel.ep=1", "train.global_batch_size=16", "train.micro_batch_size=2",
          "train.eval_iters=2", "data.kind=indexed", "data.split='60,40,0'",
          f"model.vocab_size={VOCAB}", "parallel.distributed_optimizer=false"]
# name -> overrides, in one 2-process job (pp=1: data-parallel 2, so nproc_per_node=2)
VARIANTS = {
    "pp1_1f1b": ["parallel.pp=1", "parallel.nproc_per_node=2"],
    "pp1_dualpipev": ["parallel.pp=1", "parallel.nproc_per_node=2", "parallel.schedule=dualpipev"],
    "1f1b": ["parallel.pp=2"],
    "interleaved": ["parallel.pp=2", "parallel.schedule=interleaved", "parallel.vpp=2"],
    "dualpipe": ["parallel.pp=2", "parallel.schedule=dualpipe"],
    "dualpipev": ["parallel.pp=2", "parallel.schedule=dualpipev"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Python's json package sources as an indexed dataset (5 documents; 2 for validation)."""
    import json
    import os

    from megatron_dualpipe.cli import main

    prefix = str(tmp_path_factory.mktemp("data") / "json")
    rc = main(["data", "prepare", "--input", os.path.dirname(json.__file__),
               "--output-prefix", prefix, "--vocab-size", str(VOCAB)])
    assert rc == 0
    return prefix


def _direct_loss(state, source, eval_iters: int) -> float:
    """Per-token validation loss from the unpipelined model called directly (no schedule)."""
    import torch
    import torch.distributed as dist

    pair = torch.zeros(2, dtype=torch.float64)
    model = state.model[0]
    model.eval()
    with torch.no_grad():
        for step in range(eval_iters):
            for batch in source.iterator(step):
                losses = model(batch["tokens"], batch["position_ids"], None,
                               labels=batch["labels"])
                pair += torch.stack([losses.double().sum(), torch.tensor(float(losses.numel()))])
    model.train()
    dist.all_reduce(pair)
    return float(pair[0] / pair[1])


def _validation_losses(prefix: str) -> dict[str, float]:
    from megatron.core import parallel_state

    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.data import make_sources
    from megatron_dualpipe.distributed import destroy_distributed
    from megatron_dualpipe.evaluate import evaluate
    from megatron_dualpipe.schedules.mirror import reset_mirror_groups
    from megatron_dualpipe.schedules.p2p import reset_flow_groups
    from megatron_dualpipe.train import _dp_rank, forward_step, setup

    out = {}
    for name, overrides in VARIANTS.items():
        recipe = load_recipe("recipes/tiny_moe_cpu.yaml",
                             [*COMMON, f"data.path={prefix}", *overrides])
        state = setup(recipe)
        _, valid = make_sources(recipe, _dp_rank(), state.device)
        out[name] = evaluate(state, valid, forward_step)
        if name == "pp1_1f1b":
            out["direct"] = _direct_loss(state, valid, recipe.train.eval_iters)
        reset_flow_groups()
        reset_mirror_groups()
        parallel_state.destroy_model_parallel()
    destroy_distributed()
    return out


@pytest.mark.slow
def test_validation_loss_is_the_same_under_every_schedule(corpus):
    results = run_distributed(_validation_losses, 2, (corpus,))
    assert results[0] == results[1]  # every rank reports the all-reduced loss
    losses = results[0]
    reference = losses.pop("direct")
    # An untrained model predicts close to uniformly: about ln(vocab).
    assert abs(reference - math.log(VOCAB)) < 0.3
    for name, loss in losses.items():
        assert loss == pytest.approx(reference, rel=1e-6, abs=0), name
