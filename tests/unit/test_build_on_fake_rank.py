"""Recipe -> Megatron config -> model chunks, built on one rank of a fake 4-process job.

tiny_moe_cpu (pp=2, ep=2, 4 processes): each rank builds its chunks as in the real job (no
processes, no communication) and the layers, experts and stage flags are those the recipe asks
for on that rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_dualpipe.config import load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_moe_cpu.yaml"
CPU = torch.device("cpu")


@pytest.fixture
def cpu_patches():
    from megatron_dualpipe.patches import apply_cpu_patches, cpu_patches, revert_cpu_patches

    was_on = all(p.applied for p in cpu_patches())
    apply_cpu_patches(force=True)
    yield
    if not was_on:
        revert_cpu_patches()


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_each_rank_builds_the_layers_and_experts_of_its_stages(fake_world, cpu_patches,
                                                               schedule):
    from megatron_dualpipe.config.stage_split import layers_of_stage
    from megatron_dualpipe.model.build import build_model

    recipe = load_recipe(RECIPE, [f"parallel.schedule={schedule}"])
    m = recipe.model
    for rank in range(4):
        with fake_world(rank, 4, pp=2, ep=2) as ps:
            # Megatron's rank order tp-cp-ep-dp-pp: pp rank = rank // 2, ep rank = rank % 2
            assert ps.get_pipeline_model_parallel_rank() == rank // 2
            assert ps.get_expert_model_parallel_rank() == rank % 2
            config, chunks = build_model(recipe, CPU, wrap_ddp=False)
            # the recipe's model reaches Megatron's config
            assert (config.num_layers, config.hidden_size) == (m.num_layers, m.hidden_size)
            assert config.num_moe_experts == recipe.moe.num_experts
            assert config.moe_router_topk == recipe.moe.topk
            assert config.expert_model_parallel_size == 2
            for chunk in chunks:
                p = chunk.placement
                built = [layer.layer_number - 1 for layer in chunk.decoder.layers]
                assert built == list(layers_of_stage(recipe, p.stage)), (rank, p)
                assert chunk.pre_process == (p.stage == 0)
                assert chunk.post_process == (p.stage == p.num_stages - 1)
                for layer in chunk.decoder.layers:
                    moe = layer.layer_number > m.num_dense_layers
                    experts = getattr(layer.mlp, "experts", None)
                    assert (experts is not None) == moe
                    if moe:  # 8 experts over EP=2: 4 on this rank
                        assert experts.num_local_experts == recipe.moe.num_experts // 2
