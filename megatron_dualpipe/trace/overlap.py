"""Overlap figures of one rank: communication time, the part of it hidden behind compute on
another stream (thread) of the same device (process), compute, idle time and the most exposed
communication kernels.

For each stream that runs communication, the covered time is the intersection of the union of
its communication intervals with the union of the compute intervals of the device's *other*
streams; a kind's busy time is the union over streams of its intervals, its overlapped time the
union of the covered parts. Exposed = busy - overlapped. Idle (bubble) time is the part of the
analysed span (the profiled steps, or first to last event) where the device runs nothing:
neither compute, nor communication, nor memory copies.
"""

from __future__ import annotations

import bisect

from megatron_dualpipe.trace.classify import KINDS, short_name
from megatron_dualpipe.trace.intervals import (
    Intervals,
    clip,
    covered_length,
    intersect,
    length,
    union,
)
from megatron_dualpipe.trace.ranks import Comm, Rank

TOP = 10


def stats(busy: Intervals, covered: Intervals, count: int) -> dict:
    time_us, over_us = length(busy), length(covered)
    return {"count": count, "time_us": time_us, "overlapped_us": over_us,
            "fraction": over_us / time_us if time_us > 0 else None,
            "exposed_us": time_us - over_us}


class RankOverlap:
    """The busy and covered intervals of one rank, per communication kind."""

    def __init__(self, rank: Rank):
        self.rank = rank
        by_tid: dict[object, list] = {}
        for e in rank.compute:
            by_tid.setdefault(e.tid, []).append((e.ts, e.end))
        self.compute_by_tid = {tid: union(v) for tid, v in by_tid.items()}
        self.compute = union(i for v in self.compute_by_tid.values() for i in v)
        self.by_kind = {k: [c for c in rank.comm if k in (c.kind, "all")] for k in KINDS}
        self.cover: dict[object, Intervals] = {}  # per comm stream: other streams' compute
        self.starts: dict[str, list[float]] = {}  # per kind: sorted start times
        self.spans = {k: self._spans(v) for k, v in self.by_kind.items()}
        self.busy = union([*self.compute, *self.spans["all"][0],
                           *((e.ts, e.end) for e in rank.other)])

    def other_compute(self, tid) -> Intervals:
        """The union of the compute on every stream but `tid`."""
        if tid not in self.cover:
            self.cover[tid] = union(i for t, v in self.compute_by_tid.items() if t != tid
                                    for i in v)
        return self.cover[tid]

    def _spans(self, comm: list[Comm]) -> tuple[Intervals, Intervals]:
        by_tid: dict[object, list] = {}
        for c in comm:
            by_tid.setdefault(c.event.tid, []).append((c.event.ts, c.event.end))
        busy: Intervals = []
        covered: Intervals = []
        for tid, intervals in by_tid.items():
            mine = union(intervals)
            busy += mine
            covered += intersect(mine, self.other_compute(tid))
        return union(busy), union(covered)

    def _starts(self, kind: str) -> list[float]:
        if kind not in self.starts:
            self.starts[kind] = sorted(c.event.ts for c in self.by_kind[kind])
        return self.starts[kind]

    def window(self, win: Intervals, by_start: bool = False) -> dict:
        """Figures inside the union of intervals `win` (a step, a time range, annotations);
        events are counted if they intersect `win`, or with `by_start` if they start in it."""
        out = {"time_us": length(win)}
        for k in KINDS:
            busy, covered = self.spans[k]
            if by_start:
                starts = self._starts(k)
                inside = sum(bisect.bisect_left(starts, hi) - bisect.bisect_left(starts, lo)
                             for lo, hi in win)
            else:
                inside = sum(1 for c in self.by_kind[k]
                             if intersect([(c.event.ts, c.event.end)], win))
            out[k] = stats(intersect(busy, win), intersect(covered, win), inside)
        out["compute_us"] = length(intersect(self.compute, win))
        out["idle_us"] = out["time_us"] - length(intersect(self.busy, win))
        return out

    def span(self) -> Intervals:
        """What the whole-trace figures cover: the profiled steps, else first to last event."""
        if self.rank.steps:
            return union((lo, hi) for _, lo, hi in self.rank.steps)
        return [(self.busy[0][0], self.busy[-1][1])] if self.busy else []

    def top_exposed(self, top: int = TOP) -> list[dict]:
        """Communication kernels (ops) by exposed time, grouped by name and kind."""
        groups: dict[tuple, dict] = {}
        starts: dict[object, list] = {}
        for c in self.rank.comm:
            e = c.event
            cover = self.other_compute(e.tid)
            if e.tid not in starts:
                starts[e.tid] = [s for s, _ in cover]
            hidden = covered_length(e.ts, e.end, cover, starts[e.tid])
            key = (short_name(e.name), c.kind)
            g = groups.setdefault(key, {"name": key[0], "kind": c.kind,
                                        "family": c.rule.family if c.rule else "",
                                        "count": 0, "time_us": 0.0, "exposed_us": 0.0})
            g["count"] += 1
            g["time_us"] += e.dur
            g["exposed_us"] += e.dur - hidden
        return sorted(groups.values(), key=lambda g: -g["exposed_us"])[:top]


def rank_report(rank: Rank, annotation: Intervals | None = None, name: str | None = None,
                time_range: tuple[float, float] | None = None) -> dict:
    """The figures of one rank, in the report's shape (see `report.analyze`)."""
    ov = RankOverlap(rank)
    span = ov.span()
    out = {
        "rank": rank.label,
        "device": rank.device,
        "compute_time_us": length(ov.compute),
        "comm": {k: stats(*ov.spans[k], len(ov.by_kind[k])) for k in KINDS},
        "span_us": length(span),
        "idle_us": length(span) - length(intersect(ov.busy, span)),
        "steps": [],
        "top_exposed": ov.top_exposed(),
    }
    for step, lo, hi in rank.steps:
        entry = ov.window([(lo, hi)], by_start=True)
        entry.pop("time_us")
        out["steps"].append({"step": step, "time_us": hi - lo, **entry})
    if annotation is not None:
        w = ov.window(annotation)
        out["window"] = {"name": name, "count": len(annotation), **w}
    if time_range is not None:
        out["range"] = ov.window(clip([time_range], *time_range))
    return out
