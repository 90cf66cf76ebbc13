"""Which stages, decoder layers and experts every rank holds.

Global ranks follow Megatron-Core's default order (`tp-cp-ep-dp-pp`, tp fastest): the
`tp * dp` ranks of pipeline rank p are the consecutive ranks `[p * tp * dp, (p + 1) * tp * dp)`;
inside them, the expert-parallel rank is `(rank // tp) % ep` and the expert data-parallel rank
`rank // (tp * ep) % (dp / ep)`. All ranks of one pipeline rank hold the same stages; they
differ only in their tensor slice and their experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_dualpipe.config.stage_split import layers_of_stage, num_stages
from megatron_dualpipe.config.validate import (
    data_parallel_size,
    num_physical_experts,
    world_size,
)
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.model.layout import chunk_placements

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe


@dataclass(frozen=True)
class ChunkInfo:
    """One model chunk of a pipeline rank."""

    chunk: int
    stage: int
    layers: range  # global decoder-layer indices
    embedding: bool
    head: bool  # final norm, output head, loss and the MTP block

    def describe(self, mtp_layers: int) -> str:
        parts = ["embedding"] if self.embedding else []
        if len(self.layers):
            parts.append(f"layers {self.layers.start}-{self.layers.stop - 1}")
        if self.head:
            parts += [f"MTP x{mtp_layers}"] if mtp_layers else []
            parts.append("head")
        return f"stage {self.stage}: " + (" + ".join(parts) or "(empty)")


@dataclass(frozen=True)
class PipelineRank:
    """One pipeline rank: its chunks and the global ranks that run it."""

    pp_rank: int
    chunks: tuple[ChunkInfo, ...]
    global_ranks: range
    nodes: range


def pipeline_ranks(recipe: Recipe) -> list[PipelineRank]:
    """Every pipeline rank's chunks, in pipeline-rank order."""
    p = recipe.parallel
    last = num_stages(recipe) - 1
    per_stage = p.tp * data_parallel_size(recipe)
    gpus_per_node = world_size(recipe) // p.num_nodes
    out = []
    for rank in range(p.pp):
        chunks = tuple(
            ChunkInfo(c.chunk, c.stage, layers_of_stage(recipe, c.stage), c.stage == 0,
                      c.stage == last)
            for c in chunk_placements(p.schedule, p.pp, rank, p.vpp)
        )
        ranks = range(rank * per_stage, (rank + 1) * per_stage)
        nodes = range(ranks.start // gpus_per_node, (ranks.stop - 1) // gpus_per_node + 1)
        out.append(PipelineRank(rank, chunks, ranks, nodes))
    return out


def experts_per_rank(recipe: Recipe) -> int:
    """Physical expert slots (routed experts + EPLB redundant ones) per expert-parallel rank."""
    return num_physical_experts(recipe) // recipe.parallel.ep


def rank_coords(recipe: Recipe, rank: int) -> dict[str, int]:
    """Parallel coordinates of a global rank (Megatron's default `tp-cp-ep-dp-pp` order)."""
    p = recipe.parallel
    dp = data_parallel_size(recipe)
    if not 0 <= rank < world_size(recipe):
        raise UserError(f"rank {rank} out of range: world size is {world_size(recipe)}")
    return {
        "pp": rank // (p.tp * dp),
        "dp": (rank // p.tp) % dp,
        "tp": rank % p.tp,
        "ep": (rank // p.tp) % p.ep,
        "edp": (rank // (p.tp * p.ep)) % (dp // p.ep),
        "node": rank // (world_size(recipe) // p.num_nodes),
    }


def ep_group_nodes(recipe: Recipe) -> int:
    """Nodes one expert-parallel group spans (its ranks are `tp` apart and consecutive)."""
    p = recipe.parallel
    gpus_per_node = world_size(recipe) // p.num_nodes
    span = p.tp * p.ep
    return max(1, -(-span // gpus_per_node))
