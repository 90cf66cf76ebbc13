"""Decoder layers per pipeline stage: the even split, or `parallel.layers_per_stage`.

A *stage* is what `model/layout.py` calls one: 1f1b has pp stages, interleaved pp*vpp,
dualpipe pp (each held twice, by mirror ranks), dualpipev 2*pp. Stage 0 also holds the
embedding, the last stage the final norm, the MTP block and the output head.

Without `layers_per_stage` the split must be even (the rules are `validate.check_stage_split`);
with it, any split of counts >= 0 that sums to `model.num_layers` is allowed, e.g.
DeepSeek-V3's 61 layers over 16 DualPipe stages. A stage may hold no decoder layers (only the
embedding, only the head/MTP, or nothing: Megatron-Core builds it, tests/test_dualpipe_exact.py).
The model builder gives each chunk exactly its stage's range (`model/chunk_layout.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.schedules.spec import SPECS

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe


def num_stages(recipe: Recipe) -> int:
    """Number of layer blocks the schedule cuts the decoder into (see module docstring)."""
    p = recipe.parallel
    return SPECS[p.schedule].num_stages(p.pp, p.vpp)


def stage_sizes(recipe: Recipe) -> list[int]:
    """Decoder layers of every stage, in stage order."""
    explicit = recipe.parallel.layers_per_stage
    if explicit is not None:
        return list(explicit)
    stages = num_stages(recipe)
    return [recipe.model.num_layers // stages] * stages


def layers_of_stage(recipe: Recipe, stage: int) -> range:
    """Global decoder-layer indices held by `stage`."""
    sizes = stage_sizes(recipe)
    if not 0 <= stage < len(sizes):
        raise UserError(f"stage {stage} out of range: the recipe has {len(sizes)} stages")
    start = sum(sizes[:stage])
    return range(start, start + sizes[stage])


def megatron_layout(recipe: Recipe) -> list[list[str]]:
    """`TransformerConfig.pipeline_model_parallel_layout` rows, one per stage, in stage order.

    Megatron's own layout indexes the rows by `vp_stage * pp + pp_rank`; our chunks bind the
    rows to their stage instead (`model.chunk_layout.ChunkLayout`).
    """
    sizes = stage_sizes(recipe)
    rows = []
    for stage, n in enumerate(sizes):
        row = ["embedding"] if stage == 0 else []
        row += ["decoder"] * n
        if stage == len(sizes) - 1:
            row += ["mtp"] * recipe.model.mtp_num_layers + ["loss"]
        rows.append(row)
    return rows
