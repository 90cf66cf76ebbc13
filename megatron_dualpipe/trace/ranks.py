"""Split a trace's events into ranks: communication (by kind) and compute, per device.

A rank is one GPU (the ``pid`` of its kernels; streams are the ``tid``) in a GPU trace, one
process (threads are the ``tid``) in a CPU trace. GPU traces: communication kernels are those
of the classification table (`classify.RULES`), every other kernel is compute; NCCL kernels
take their kind from the c10d operation that launched them, found through the launch's
correlation id. CPU traces (gloo): communication operations are the table's ``op`` rows; compute
is every other CPU operation, except operations that enclose a communication op of their own
thread (they wait for it: ``_AllToAll``, autograd nodes, ...).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from megatron_dualpipe.trace.classify import STEP_RE, Rule, kernel_rule, op_kind, op_rule
from megatron_dualpipe.trace.load import (
    CPU_CODES,
    GPU_OTHER,
    KERNEL,
    LAUNCH,
    Event,
    EventTable,
)


@dataclass(slots=True)
class Comm:
    """A communication event with its kind and, for kernels, its table row."""

    kind: str
    event: Event
    rule: Rule | None = None


@dataclass
class Rank:
    """The classified events of one device (GPU) or process (CPU)."""

    label: str
    device: str  # "gpu" or "cpu"
    pid: object
    comm: list[Comm] = field(default_factory=list)
    compute: list[Event] = field(default_factory=list)
    other: list[Event] = field(default_factory=list)  # memcpy/memset: busy, not compute
    steps: list[tuple[int, float, float]] = field(default_factory=list)  # CPU clock
    lane_names: dict = field(default_factory=dict)


def split(table: EventTable) -> list[Rank]:
    """The ranks of one trace (several when a GPU trace holds several devices)."""
    steps = sorted({(int(m.group(1)), e.ts, e.end) for e in table.events(
        *CPU_CODES, names=table.name_ids(STEP_RE.match)) if (m := STEP_RE.match(e.name))})
    ranks: dict[object, Rank] = {}
    device = "gpu" if table.has(KERNEL) else "cpu"

    def rank(pid) -> Rank:
        if pid not in ranks:
            ranks[pid] = Rank(table.label, device, pid, steps=steps,
                              lane_names={k: v for k, v in table.lane_names.items()
                                          if k[0] == pid})
        return ranks[pid]

    if device == "gpu":
        kernels = list(table.events(KERNEL))
        needs_launch = {k.corr for k in kernels
                        if (r := kernel_rule(k.name)) is not None and r.by_launch}
        context = _LaunchContext(table, needs_launch)
        for k in kernels:
            rule = kernel_rule(k.name)
            if rule is None:
                rank(k.pid).compute.append(k)
            else:
                kind = (context.kind(k) if rule.by_launch else None) or rule.kind
                rank(k.pid).comm.append(Comm(kind, k, rule))
        for e in table.events(GPU_OTHER):
            rank(e.pid).other.append(e)
    else:
        ops = list(table.events(*CPU_CODES, exclude=table.name_ids(STEP_RE.match)))
        comm = [(op_kind(e.name, e.collective) or "collective", e) for e in ops
                if op_rule(e.name) is not None]
        waits = _Containment([e for _, e in comm])
        for kind, e in comm:
            rank(e.pid).comm.append(Comm(kind, e, op_rule(e.name)))
        for e in ops:
            if op_rule(e.name) is None and not waits.contains(e):
                rank(e.pid).compute.append(e)
    if not ranks:
        rank(None)
    out = list(ranks.values())
    if len(out) > 1:
        for r in out:
            r.label = f"{table.label}/{'gpu' if device == 'gpu' else 'pid'}{r.pid}"
    return out


class _LaunchContext:
    """Finds the CPU communication op that launched a GPU kernel (via correlation ids)."""

    def __init__(self, table: EventTable, correlations: set[int]):
        self.launch = {}
        if correlations:
            for i in range(len(table)):
                if table.cat[i] == LAUNCH and table.corr[i] in correlations:
                    e = table.event(i)
                    self.launch[e.corr] = e
        comm_ops: dict[tuple, list[Event]] = {}
        for e in table.events(*CPU_CODES, names=table.name_ids(lambda n: op_rule(n) is not None)):
            comm_ops.setdefault(e.lane, []).append(e)
        self.ops = {lane: sorted(ops, key=lambda o: o.ts) for lane, ops in comm_ops.items()}
        self.starts = {lane: [o.ts for o in ops] for lane, ops in self.ops.items()}
        self.longest = {lane: max(o.dur for o in ops) for lane, ops in self.ops.items()}

    def kind(self, kernel: Event) -> str | None:
        """Kind of the innermost communication op enclosing the kernel's launch, if any."""
        launch = self.launch.get(kernel.corr)
        if launch is None or launch.lane not in self.ops:
            return None
        ops, starts = self.ops[launch.lane], self.starts[launch.lane]
        earliest = launch.ts - self.longest[launch.lane]
        best = None
        for k in range(bisect.bisect_right(starts, launch.ts) - 1, -1, -1):
            op = ops[k]
            if op.ts < earliest:
                break
            if op.end < launch.ts:
                continue
            kind = op_kind(op.name, op.collective)
            if kind is not None and (best is None or op.dur < best[0]):
                best = (op.dur, kind)
        return best[1] if best else None


class _Containment:
    """Whether an op encloses one of the given ops on its own thread."""

    def __init__(self, inner: list[Event]):
        by_lane: dict[tuple, list[Event]] = {}
        for e in inner:
            by_lane.setdefault(e.lane, []).append(e)
        self.lanes = {lane: sorted(v, key=lambda e: e.ts) for lane, v in by_lane.items()}
        self.starts = {lane: [e.ts for e in v] for lane, v in self.lanes.items()}

    def contains(self, op: Event) -> bool:
        inner = self.lanes.get(op.lane)
        if not inner:
            return False
        starts = self.starts[op.lane]
        lo, hi = bisect.bisect_left(starts, op.ts), bisect.bisect_right(starts, op.end)
        return any(inner[k].end <= op.end for k in range(lo, hi))
