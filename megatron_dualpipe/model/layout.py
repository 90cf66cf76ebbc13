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

from megatron_dualpipe.schedules.spec import TRAIN_SCHEDULES, get_spec


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
    spec = get_spec(schedule, TRAIN_SCHEDULES, field="parallel.schedule")
    num_stages = spec.num_stages(pp, vpp)
    virtual = spec.megatron_vpp(vpp) is not None
    placements = []
    for chunk in range(spec.num_chunks(vpp)):
        stage = spec.stage_of(pp, rank, chunk)
        placements.append(ChunkPlacement(chunk, stage, num_stages, stage % pp,
                                          chunk if virtual else None))
    return placements
