"""Each model chunk builds exactly the global layer range of its stage.

Megatron-Core computes a chunk's decoder layers (how many, and the global index of the first)
from `TransformerConfig.pipeline_model_parallel_layout` (or an even split) and the *global*
pipeline rank / `vp_stage`. Our chunks hold stages that this indexing does not describe
(DualPipeV's V, DualPipe's mirrored stages, a one-rank DualPipeV that holds two stages), so
every chunk is built from its own copy of the config (`chunk_config`) whose layout is a
`ChunkLayout`: the stage rows of `config.stage_split.megatron_layout` (even split or
`parallel.layers_per_stage`) bound to the chunk's stage. Whatever rank or `vp_stage` Megatron
asks about, it answers for that stage, so the layer specs (dense/MoE pattern by global index),
`TransformerLayer.layer_number` (our init and checkpoints name layers by it), the layer count,
MTP placement and offsets are those of the stage, for every schedule and split alike.
"""

from __future__ import annotations

import copy

from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from megatron_dualpipe.model.layout import ChunkPlacement


class ChunkLayout(PipelineParallelLayerLayout):
    """`PipelineParallelLayerLayout` of the whole model as seen by the chunk holding `stage`.

    `rows` are the layer types of every stage in stage order (``"embedding"``, ``"decoder"``,
    ``"mtp"``, ``"loss"``). Counts and offsets ignore the `pp_rank`/`vp_stage` Megatron passes
    (or reads from parallel_state) and describe `stage`; `layout[pp_rank][vp_stage]`, which
    Megatron also reads directly (MTP placement), is this stage's row in every cell.
    """

    def __init__(self, rows: list[list[str]], stage: int, pp: int, vpp: int | None):
        # Not super().__init__: that indexes rows by global (pp_rank, vp_stage).
        self.input_data = rows
        self.stage = stage
        self.rows = [[LayerType[name] for name in row] for row in rows]
        self.pipeline_model_parallel_size = pp
        self.virtual_pipeline_model_parallel_size = vpp or 1
        own = self.rows[stage]
        self.layout = [[own] * self.virtual_pipeline_model_parallel_size for _ in range(pp)]
        self.flatten_layout = [t for row in self.rows for t in row]

    def __repr__(self) -> str:
        return f"ChunkLayout(stage={self.stage} of {len(self.rows)}: {self.rows[self.stage]})"

    def get_num_layers_to_build(self, layer_type=LayerType.decoder, vp_stage=None, pp_rank=None):
        """Layers of `layer_type` in this chunk's stage."""
        return self.rows[self.stage].count(layer_type)

    def get_layer_offset(self, layer_type=LayerType.decoder, vp_stage=None, pp_rank=None):
        """Layers of `layer_type` in all stages before this chunk's stage."""
        return sum(row.count(layer_type) for row in self.rows[: self.stage])

    def layer_range(self, layer_type=LayerType.decoder) -> range:
        """Global (0-based) indices of this stage's layers of `layer_type`."""
        start = self.get_layer_offset(layer_type)
        return range(start, start + self.get_num_layers_to_build(layer_type))


def chunk_config(config, rows: list[list[str]], placement: ChunkPlacement):
    """A shallow copy of `config` whose pipeline layout is `placement`'s stage.

    The copy keeps every other field (and shares their values); schedule-level settings
    (`finalize_model_grads_func`, ...) stay on the original, which the DDP wrappers and the
    schedules use. Megatron-Core 0.19 applies layout offsets only when
    `pipeline_model_parallel_size > 1`: a one-rank pipeline holding several stages (DualPipeV
    with parallel.pp=1) is described to the chunk as the pipeline of its stages.
    """
    if len(rows) != placement.num_stages:
        raise ValueError(f"{len(rows)} stage rows for a placement of {placement.num_stages} stages")
    cfg = copy.copy(config)
    if cfg.pipeline_model_parallel_size == 1 and placement.num_stages > 1:
        cfg.pipeline_model_parallel_size = placement.num_stages
    cfg.pipeline_model_parallel_layout = ChunkLayout(
        rows, placement.stage, cfg.pipeline_model_parallel_size,
        cfg.virtual_pipeline_model_parallel_size,
    )
    return cfg
