"""Which pipeline stages each rank's model chunks hold, per schedule.

A *stage* is a contiguous slice of the decoder layers (`config.stage_split.layers_of_stage`:
the even split or `parallel.layers_per_stage`); stage 0 holds the embedding and the last stage
the output head and loss. Each chunk builds exactly its stage's layers (`chunk_layout.py`).
`ChunkPlacement.stage_rank` is the pipeline rank the chunk's process groups report to
Megatron-Core's first/last-stage checks (see `PipelineRankView`).

- 1f1b: one chunk, stage = rank (pp stages).
- interleaved: vpp chunks, chunk v on rank r is stage v*pp + r (Megatron's own layout).
- dualpipev: rank r holds stage r (chunk 0) and stage 2*pp-1-r (chunk 1); 2*pp stages, so the
  embedding and the head both live on rank 0. pp=1 is allowed: rank 0 holds stages 0 and 1.
- dualpipe: pp stages, each held twice: rank r holds stage r of the pipe that enters at rank 0
  (chunk 0) and stage r of the pipe that enters at rank pp-1 (chunk 1), which is model stage
  pp-1-r. Mirror ranks r and pp-1-r hold the same layers; their gradients are summed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkPlacement:
    chunk: int
    stage: int
    num_stages: int
    stage_rank: int  # pipeline rank whose Megatron layer offset describes this stage
    vp_stage: int | None

    @property
    def pre_process(self) -> bool:
        return self.stage == 0

    @property
    def post_process(self) -> bool:
        return self.stage == self.num_stages - 1


def chunk_placements(schedule: str, pp: int, rank: int, vpp: int | None = None):
    """The model chunks of pipeline rank `rank`, in local chunk order."""
    if schedule == "1f1b":
        return [ChunkPlacement(0, rank, pp, rank, None)]
    if schedule == "interleaved":
        return [ChunkPlacement(v, v * pp + rank, pp * vpp, rank, v) for v in range(vpp)]
    if schedule == "dualpipev":
        return [
            ChunkPlacement(0, rank, 2 * pp, rank, 0),
            ChunkPlacement(1, 2 * pp - 1 - rank, 2 * pp, pp - 1 - rank, 1),
        ]
    if schedule == "dualpipe":
        return [
            ChunkPlacement(0, rank, pp, rank, None),
            ChunkPlacement(1, pp - 1 - rank, pp, pp - 1 - rank, None),
        ]
    raise ValueError(
        f"parallel.schedule={schedule!r}: allowed values: 1f1b, interleaved, dualpipe, dualpipev"
    )

