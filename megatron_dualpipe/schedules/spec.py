"""What a pipeline schedule is, in one place: `ScheduleSpec`, and the one table of schedules.

Every question about a schedule (how many model chunks a rank holds, which stage a chunk is,
how many stages a model is cut into, whether it is one of ours, how micro-batches split over
its directions) is asked of its spec; nothing else compares schedule names. The executor a
spec runs with (its `forward_backward_func`) is bound in `schedules/registry.py`, so that this
module stays free of torch and Megatron and the recipe rules (config/), the model builder and
the action lists can all read it.

Placements (``stage`` = position along a micro-batch's path, 0 = where it enters):

- ``linear``: chunk c of rank r is stage ``c * pp + r`` (1f1b, zb1p: one chunk; interleaved).
- ``v``: rank r holds stage r (chunk 0) and stage ``2*pp-1-r`` (chunk 1): DualPipeV.
- ``mirror``: two pipelines of pp stages in opposite directions; chunk 1 of rank r is stage
  ``pp-1-r`` of direction 1 and holds the layers of chunk 0 of rank ``pp-1-r``: DualPipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dualpipe.errors import UserError


@dataclass(frozen=True)
class ScheduleSpec:
    """One pipeline schedule.

    `chunks_per_rank` is None where `parallel.vpp` sets it (interleaved). `trainable` is False
    for schedules that only the simulator knows (zb1p).
    """

    name: str
    chunks_per_rank: int | None
    placement: str  # "linear", "v" or "mirror" (module docstring)
    dualpipe_family: bool
    fuses_fb: bool
    trainable: bool = True

    @property
    def bidirectional(self) -> bool:
        """Two pipelines in opposite directions, each fed half of the micro-batches."""
        return self.placement == "mirror"

    @property
    def needs_vpp(self) -> bool:
        return self.chunks_per_rank is None

    @property
    def microbatch_multiple(self) -> int:
        """The number of micro-batches must be a multiple of this (one half per direction)."""
        return 2 if self.bidirectional else 1

    def num_chunks(self, vpp: int | None = None) -> int:
        """Local model chunks per rank."""
        return self.chunks_per_rank if self.chunks_per_rank is not None else (vpp or 1)

    def num_stages(self, pp: int, vpp: int | None = None) -> int:
        """Stages the model's layers are cut into (stages of one direction for DualPipe)."""
        return pp if self.bidirectional else pp * self.num_chunks(vpp)

    def min_microbatches(self, pp: int) -> int:
        return 2 * pp if self.dualpipe_family else 1

    def megatron_vpp(self, vpp: int | None = None) -> int | None:
        """Model chunks per rank as Megatron-Core sees them (None: no virtual pipeline)."""
        chunks = self.num_chunks(vpp)
        return None if self.bidirectional or chunks == 1 else chunks

    def stage_of(self, pp: int, rank: int, chunk: int) -> int:
        """Stage (position along the micro-batch path) of `chunk` on `rank`."""
        if self.placement == "v":
            return rank if chunk == 0 else 2 * pp - 1 - rank
        if self.placement == "mirror":
            return rank if chunk == 0 else pp - 1 - rank
        return chunk * pp + rank

    def rank_chunk_of_stage(self, pp: int, stage: int, direction: int = 0) -> tuple[int, int]:
        """Inverse of `stage_of`: ``(rank, chunk)``; `direction` matters only for mirror."""
        if self.placement == "mirror":
            return (stage, 0) if direction == 0 else (pp - 1 - stage, 1)
        if self.placement == "v":
            return (stage, 0) if stage < pp else (2 * pp - 1 - stage, 1)
        return stage % pp, stage // pp

    def run_options(self, pp: int, ep: int, zero_bubble: bool, overlap: bool,
                    on_gpu: bool = True) -> tuple[bool, bool]:
        """`(zero_bubble, overlap)` as the executor runs them: each only where it has something
        to do. The W split fills pipeline bubbles, and PP=1 has none; the fused F&B chunk hides
        the expert all-to-all behind the other chunk's compute, and EP=1 has none (nor does a
        CPU, where the chunk runs sequentially). Measured at PP=1 x EP=1 on one H200, both cost
        time with nothing to gain (docs/benchmarks.md, section speed)."""
        if not self.dualpipe_family:
            return False, False
        return zero_bubble and pp > 1, overlap and self.fuses_fb and ep > 1 and on_gpu

    def microbatches_of_chunk(self, num_microbatches: int, chunk: int) -> range:
        """Global micro-batch ids that pass through local `chunk`."""
        if self.bidirectional:
            half = num_microbatches // 2
            return range(chunk * half, (chunk + 1) * half)
        return range(num_microbatches)


SPECS: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec("1f1b", 1, "linear", dualpipe_family=False, fuses_fb=False),
        ScheduleSpec("interleaved", None, "linear", dualpipe_family=False, fuses_fb=False),
        ScheduleSpec("zb1p", 1, "linear", dualpipe_family=False, fuses_fb=False,
                     trainable=False),
        ScheduleSpec("dualpipe", 2, "mirror", dualpipe_family=True, fuses_fb=True),
        ScheduleSpec("dualpipev", 2, "v", dualpipe_family=True, fuses_fb=True),
    )
}
SCHEDULES = tuple(SPECS)  # everything the simulator knows
TRAIN_SCHEDULES = tuple(n for n, s in SPECS.items() if s.trainable)  # parallel.schedule values
OURS = tuple(n for n, s in SPECS.items() if s.dualpipe_family)


def run_options(parallel, on_gpu: bool = True) -> tuple[bool, bool]:
    """`ScheduleSpec.run_options` of a recipe's `parallel` section."""
    return SPECS[parallel.schedule].run_options(parallel.pp, parallel.ep, parallel.zero_bubble,
                                                parallel.overlap_fb, on_gpu)


def get_spec(name: str, allowed: tuple[str, ...] = SCHEDULES,
             field: str = "schedule") -> ScheduleSpec:
    """The spec of `name`; a UserError naming `field` and listing `allowed` if there is none."""
    if name not in allowed:
        raise UserError(f"{field}={name!r} must be one of {', '.join(allowed)}")
    return SPECS[name]
