"""Event simulation of per-rank action lists (the same lists the executor runs).

Cost model: ``F`` costs ``f``; a full ``B`` costs ``b``; a split ``B`` (``split_wgrad``) costs
``b - w`` and its later ``W`` costs ``w``; an overlapped ``FB`` pair costs ``fb`` (DeepSeek's
``F&B``).  A cross-rank dependency adds ``p2p`` latency.  Dependencies come from the stage graph
(`actions.stage_of`): the forward of stage s needs the forward of stage s-1 of the same
micro-batch, the backward of stage s needs the backward of stage s+1, and the last stage's
backward needs its own forward.  Each rank runs its list in order; an action starts as soon as
the rank is free and all its inputs are done.  An FB pair starts when both halves' inputs are
ready and both of its outputs appear at its end.

Bubble definition
-----------------
``bubble_per_rank[r] = makespan - compute[r]``: the idle time of rank r inside
``[0, makespan]``, where ``compute[r]`` is the summed cost of rank r's actions.  The reported
``bubble`` is the idle time of the *most idle* rank, ``max_r bubble_per_rank[r] = makespan -
min_r compute[r]``.  This is what DeepSeek's README table measures: 1F1B and ZB1P give every
rank the same work, so all ranks idle equally; in DualPipe(V) ranks differ by how many F&B
pairs they overlap, and the closed form is the idle time of the middle ranks (DualPipe) or of
the last rank (DualPipeV), which are the most idle ones.  With N ranks:

* 1F1B ``(N-1)(F+B)`` and ZB1P ``(N-1)(F+B-2W)``;
* DualPipe ``(N/2-1)(F&B+B-3W)``;
* DualPipeV ``(N-1)(F&B+B-3W)``: the README's DualPipeV row with PP = 2N stages on N = PP/2
  devices (DualPipeV is DualPipe of 2N ranks cut in half).

With enough micro-batches (M >= 2N) the simulated bubble equals these exactly for DeepSeek's
cost regime; empirically (see tests/docs): 1F1B always; ZB1P iff ``W <= F`` and
``W <= B - W`` (each W fits a cool-down gap), otherwise larger; DualPipe(V) iff
``B - W == F`` and ``W <= F`` (any ``max(F, B) <= F&B <= F + B``).  Outside that regime the
closed form is only an estimate: ``B - W > F`` gives a smaller simulated bubble, ``B - W < F``
or ``W > F`` a larger one.

Activations: ``peak_activations_per_rank`` counts micro-batch-chunks whose forward has run and
whose backward (input grad) has not (F: +1, B: -1; in an FB pair the F counts first).
``peak_activations_stage_units`` rescales to activations of one 1F1B stage of the same PP
(``num_layers / num_ranks`` layers): DualPipe chunks are full stages (factor 1), DualPipeV
chunks half stages, interleaved chunks ``1/num_chunks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from megatron_dualpipe.schedules.actions import (
    Action,
    build_actions,
    num_stages,
    stage_of,
)
from megatron_dualpipe.schedules.spec import get_spec


@dataclass(frozen=True)
class Costs:
    """Per-action costs (DeepSeek's example units: F=1, B=2, W=1, F&B=2.5)."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float = 2.5
    p2p: float = 0.0

    def of(self, action: Action) -> float:
        """Cost of one action."""
        if action.kind == "F":
            return self.f
        if action.kind == "W":
            return self.w
        if action.kind == "FB":
            return self.fb
        return self.b - self.w if action.split_wgrad else self.b


@dataclass(frozen=True)
class TimelineEntry:
    """One executed action with its start/end time."""

    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    """Simulation output; see the module docstring for the definitions."""

    schedule: str
    num_ranks: int
    num_microbatches: int
    costs: Costs
    timelines: list[list[TimelineEntry]]
    makespan: float
    compute_per_rank: list[float]
    bubble_per_rank: list[float]
    bubble: float
    peak_activations_per_rank: list[int]
    peak_activations_stage_units: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        """The CLI's ``--json`` object."""
        return {
            "schedule": self.schedule,
            "pp": self.num_ranks,
            "microbatches": self.num_microbatches,
            "makespan": self.makespan,
            "bubble": self.bubble,
            "bubble_per_rank": self.bubble_per_rank,
            "peak_activations_per_rank": self.peak_activations_per_rank,
        }


class DeadlockError(RuntimeError):
    """Raised when no rank can make progress; the message lists the stuck actions."""


def _deps(schedule: str, num_ranks: int, rank: int, part: Action, last_stage: int):
    """Keys ``(stage, microbatch, kind)`` that a non-W action part waits for."""
    stage = stage_of(schedule, num_ranks, rank, part.chunk)
    if part.kind == "F":
        return [(stage - 1, part.microbatch, "F")] if stage > 0 else []
    if stage < last_stage:
        return [(stage + 1, part.microbatch, "B")]
    return [(stage, part.microbatch, "F")]


def simulate(schedule: str, actions: list[list[Action]], num_microbatches: int,
             costs: Costs = Costs(), num_chunks: int = 2,
             cost_of: Callable[[int, Action], float] | None = None) -> SimResult:
    """Simulate ``actions`` (one list per rank) and return timelines, bubble and memory.

    ``cost_of(rank, action)``, when given, replaces ``costs.of(action)`` (per-rank, per-chunk
    costs, e.g. the performance model's); ``costs.p2p`` is still the cross-rank latency.
    """
    if cost_of is None:
        def cost_of(rank: int, action: Action) -> float:
            return costs.of(action)
    num_ranks = len(actions)
    last_stage = num_stages(schedule, num_ranks, num_chunks) - 1
    done: dict[tuple[int, int, str], tuple[float, int]] = {}  # key -> (end time, rank)
    timelines: list[list[TimelineEntry]] = [[] for _ in range(num_ranks)]
    free = [0.0] * num_ranks
    pos = [0] * num_ranks
    progress = True
    while progress:
        progress = False
        for rank in range(num_ranks):
            while pos[rank] < len(actions[rank]):
                act = actions[rank][pos[rank]]
                ready = free[rank]
                parts = [p for p in act.parts() if p.kind != "W"]
                keys = [k for p in parts
                        for k in _deps(schedule, num_ranks, rank, p, last_stage)]
                if any(k not in done for k in keys):
                    break
                for k in keys:
                    end, src = done[k]
                    ready = max(ready, end + (costs.p2p if src != rank else 0.0))
                end = ready + cost_of(rank, act)
                for p in parts:
                    stage = stage_of(schedule, num_ranks, rank, p.chunk)
                    done[(stage, p.microbatch, p.kind)] = (end, rank)
                timelines[rank].append(TimelineEntry(act, ready, end))
                free[rank] = end
                pos[rank] += 1
                progress = True
    stuck = [f"rank {r}: {actions[r][pos[r]]}" for r in range(num_ranks)
             if pos[r] < len(actions[r])]
    if stuck:
        raise DeadlockError(f"{schedule} deadlocks; stuck actions: " + ", ".join(stuck))

    makespan = max(free) if free else 0.0
    compute = [sum(cost_of(r, e.action) for e in tl) for r, tl in enumerate(timelines)]
    bubble_per_rank = [makespan - c for c in compute]
    peaks = [_peak_activations(acts) for acts in actions]
    unit = num_ranks / get_spec(schedule).num_stages(num_ranks, num_chunks)  # stages per chunk
    return SimResult(schedule, num_ranks, num_microbatches, costs, timelines, makespan, compute,
                     bubble_per_rank, max(bubble_per_rank) if bubble_per_rank else 0.0, peaks,
                     [p * unit for p in peaks])


def _peak_activations(acts: list[Action]) -> int:
    live = peak = 0
    for act in acts:
        for part in act.parts():
            if part.kind == "F":
                live += 1
                peak = max(peak, live)
            elif part.kind == "B":
                live -= 1
    return peak


def simulate_schedule(schedule: str, num_ranks: int, num_microbatches: int,
                      costs: Costs = Costs(), *, overlap: bool = True, zero_bubble: bool = True,
                      num_chunks: int = 2) -> SimResult:
    """Generate the action lists of ``schedule`` and simulate them."""
    actions = build_actions(schedule, num_ranks, num_microbatches, overlap=overlap,
                            zero_bubble=zero_bubble, num_chunks=num_chunks)
    return simulate(schedule, actions, num_microbatches, costs, num_chunks)


def closed_form_bubble(schedule: str, num_ranks: int, costs: Costs = Costs()) -> float | None:
    """DeepSeek README's bubble formula for ``schedule`` (None where the table has none)."""
    formula = _CLOSED_FORM.get(schedule)
    return None if formula is None else formula(num_ranks, costs)


# DeepSeek DualPipe README's table, by schedule name (interleaved has no entry)
_CLOSED_FORM = {
    "1f1b": lambda n, c: (n - 1) * (c.f + c.b),
    "zb1p": lambda n, c: (n - 1) * (c.f + c.b - 2 * c.w),
    "dualpipe": lambda n, c: (n / 2 - 1) * (c.fb + c.b - 3 * c.w),
    "dualpipev": lambda n, c: (n - 1) * (c.fb + c.b - 3 * c.w),
}
