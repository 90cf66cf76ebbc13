"""Stage placement rules and the per-chunk layout (no processes): which global layers each
chunk builds, for even and uneven splits and DualPipeV on one pipeline rank."""

from __future__ import annotations

import pytest

from megatron_dualpipe.config import load_recipe
from megatron_dualpipe.config.stage_split import layers_of_stage, megatron_layout
from megatron_dualpipe.model.layout import chunk_placements

TINY = "recipes/tiny_moe_cpu.yaml"


def tiny(*overrides):
    return load_recipe(TINY, list(overrides))


def test_dualpipev_allows_one_pipeline_rank():
    recipe = tiny("parallel.pp=1", "parallel.ep=2", "parallel.schedule=dualpipev")
    assert [(c.stage, c.num_stages) for c in chunk_placements("dualpipev", 1, 0)] == [(0, 2),
                                                                                       (1, 2)]
    assert [layers_of_stage(recipe, s) for s in range(2)] == [range(0, 2), range(2, 4)]


def test_dualpipe_still_needs_two_ranks():
    with pytest.raises(ValueError, match=r"parallel.schedule=dualpipe needs an even "
                                         r"parallel.pp >= 2 \(got 1\).*parallel.pp=2"):
        tiny("parallel.pp=1", "parallel.ep=2", "parallel.schedule=dualpipe")


def _chunk_ranges(recipe, pp):
    """Per rank, the global layer range of each local chunk, through `ChunkLayout`."""
    from megatron_dualpipe.model.chunk_layout import ChunkLayout

    rows = megatron_layout(recipe)
    out = []
    for rank in range(pp):
        ranges = []
        for c in chunk_placements(recipe.parallel.schedule, pp, rank, recipe.parallel.vpp):
            layout = ChunkLayout(rows, c.stage, pp, 2)
            # Megatron passes (or reads) other ranks / vp stages: the answer is the stage's.
            assert layout.get_layer_offset(vp_stage=1, pp_rank=pp - 1) == layout.layer_range().start
            assert layout.get_num_layers_to_build(vp_stage=0, pp_rank=0) == len(
                layout.layer_range())
            ranges.append(layout.layer_range())
        out.append(ranges)
    return out


@pytest.mark.parametrize("schedule,pp,split,expected", [
    ("dualpipev", 2, [1, 2, 2, 1], [[range(0, 1), range(5, 6)], [range(1, 3), range(3, 5)]]),
    ("dualpipev", 1, [2, 4], [[range(0, 2), range(2, 6)]]),
    ("dualpipe", 2, [4, 2], [[range(0, 4), range(4, 6)], [range(4, 6), range(0, 4)]]),
    ("1f1b", 2, [4, 2], [[range(0, 4)], [range(4, 6)]]),
    ("1f1b", 3, [0, 4, 2], [[range(0, 0)], [range(0, 4)], [range(4, 6)]]),
])
def test_chunks_build_their_stage_ranges(schedule, pp, split, expected):
    recipe = tiny("model.num_layers=6", f"parallel.schedule={schedule}", f"parallel.pp={pp}",
                  "parallel.ep=1", f"parallel.layers_per_stage={split}",
                  "train.global_batch_size=32")
    assert _chunk_ranges(recipe, pp) == expected


def test_mtp_goes_with_the_last_stage():
    from megatron.core.transformer.enums import LayerType

    from megatron_dualpipe.model.chunk_layout import ChunkLayout

    recipe = tiny("parallel.schedule=dualpipev", "parallel.pp=1", "parallel.ep=2",
                  "model.mtp_num_layers=1")
    rows = megatron_layout(recipe)
    first, last = ChunkLayout(rows, 0, 1, 2), ChunkLayout(rows, 1, 1, 2)
    assert first.get_num_layers_to_build(LayerType.mtp) == 0
    assert last.get_num_layers_to_build(LayerType.mtp) == 1
    assert last.get_layer_offset(LayerType.mtp) == 0
    # `mtp_on_this_rank` reads layout[pp_rank][vp_stage] directly.
    assert all(LayerType.mtp in cell for row in last.layout for cell in row)


def test_chunk_config_is_a_copy_per_stage():
    import torch

    from megatron_dualpipe.config.to_megatron import transformer_config
    from megatron_dualpipe.model.chunk_layout import chunk_config

    recipe = tiny("parallel.schedule=dualpipev", "parallel.pp=1", "parallel.ep=2")
    config = transformer_config(recipe, torch.device("cpu"))
    rows = megatron_layout(recipe)
    chunks = [chunk_config(config, rows, c) for c in chunk_placements("dualpipev", 1, 0)]
    assert config.pipeline_model_parallel_layout is None  # the shared config is untouched
    assert config.pipeline_model_parallel_size == 1
    # Megatron-Core applies layout offsets only with pipeline_model_parallel_size > 1.
    assert [c.pipeline_model_parallel_size for c in chunks] == [2, 2]
    assert [c.pipeline_model_parallel_layout.layer_range() for c in chunks] == [range(0, 2),
                                                                                 range(2, 4)]
