"""How much communication a PyTorch profiler trace hides behind compute.

    python -m megatron_dualpipe trace runs/x/traces/rank0.json [--json] [--window FB]

Reads a Chrome trace written by `torch.profiler` (what `train --profile-steps a:b` writes, and
the format of DeepSeek's profile-data; `.json` or `.json.gz`) and reports, per communication
kind, the busy time (union of its intervals), the part of it covered by concurrent compute
(intersection with the union of compute intervals on *other* streams/threads of the same
device/process) and the overlapped fraction; per step too when `ProfilerStep#N` markers exist.

GPU traces (events of category ``kernel``): communication kernels are NCCL / DeepEP kernels
(``nccl``, ``AllToAll``/``alltoall``, ``SendRecv``, ``deep_ep`` in the name); every other kernel
is compute. NCCL runs all-to-all and point-to-point both as ``SendRecv`` kernels, so a kernel
is classified by the c10d operation that launched it (``record_param_comms`` "Collective name",
``nccl:all_to_all``, ``c10d::send`` ...), found through the launch's correlation id; by its
name when that is missing. CPU traces (gloo): ``gloo``/``c10d::`` operations are the
communication, CPU operations on other threads the compute, except operations that enclose a
communication op of their own thread (they wait for it: ``_AllToAll``, autograd nodes, ...).

Kinds: ``alltoall`` (MoE dispatch/combine), ``p2p`` (pipeline send/recv), ``collective``
(all-reduce, all-gather, reduce-scatter, ...) and ``all`` (every communication interval).
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_dualpipe.errors import UserError

KINDS = ("alltoall", "p2p", "collective", "all")
COMM_KERNEL_RE = re.compile(r"nccl|alltoall|all_to_all|sendrecv|deep_ep", re.IGNORECASE)
COMM_CPU_RE = re.compile(r"gloo|^c10d::|^nccl:|record_param_comms", re.IGNORECASE)
STEP_RE = re.compile(r"^ProfilerStep#(\d+)$")
_A2A_RE = re.compile(r"all_?to_?all", re.IGNORECASE)
_P2P_RE = re.compile(r"send|recv", re.IGNORECASE)
_DISPATCH_RE = re.compile(r"deep_ep", re.IGNORECASE)
_CPU_CATS = ("cpu_op", "user_annotation", "python_function")

Intervals = list[tuple[float, float]]


# ----------------------------------------------------------------------------- intervals


def union(intervals) -> Intervals:
    """Sorted, disjoint union of half-open intervals ``[start, end)``."""
    out: Intervals = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """Intersection of two unions (as returned by `union`)."""
    out: Intervals = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def length(intervals: Intervals) -> float:
    return sum(end - start for start, end in intervals)


def clip(intervals: Intervals, lo: float, hi: float) -> Intervals:
    return intersect(intervals, [(lo, hi)])


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """One complete (``ph: X``) trace event; times in microseconds."""

    name: str
    cat: str
    pid: object
    tid: object
    ts: float
    dur: float
    args: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def end(self) -> float:
        return self.ts + self.dur

    @property
    def lane(self) -> tuple:
        return (self.pid, self.tid)


def load_events(source) -> list[Event]:
    """Complete events of a trace file (path) or of an already-parsed trace (dict or list)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            source = json.load(f)
    raw = source.get("traceEvents", []) if isinstance(source, dict) else source
    events = []
    for e in raw:
        if e.get("ph") != "X" or "dur" not in e or "ts" not in e:
            continue
        events.append(Event(str(e.get("name", "")), str(e.get("cat", "")), e.get("pid"),
                            e.get("tid"), float(e["ts"]), float(e["dur"]), e.get("args") or {}))
    return events


def _kind_from_text(text: str) -> str | None:
    if _A2A_RE.search(text) or _DISPATCH_RE.search(text):
        return "alltoall"
    if re.search(r"reduce|gather|scatter|broadcast|barrier", text, re.IGNORECASE):
        return "collective"
    if _P2P_RE.search(text):
        return "p2p"
    return None


def _op_kind(op: Event) -> str | None:
    """Kind of a CPU-side communication op (c10d op, nccl:/gloo: annotation, param record)."""
    for key in ("Collective name", "collective_name"):
        if key in op.args:
            return _kind_from_text(str(op.args[key])) or "collective"
    return _kind_from_text(op.name)


class _LaunchContext:
    """Finds the CPU communication op that launched a GPU kernel (via correlation ids)."""

    def __init__(self, events: list[Event]):
        self.launch = {}
        comm_ops: dict[tuple, list[Event]] = {}
        for e in events:
            cat = e.cat.lower()
            if cat in ("cuda_runtime", "cuda_driver", "runtime", "driver"):
                corr = e.args.get("correlation")
                if corr is not None:
                    self.launch[corr] = e
            elif cat in _CPU_CATS and COMM_CPU_RE.search(e.name):
                comm_ops.setdefault(e.lane, []).append(e)
        self.ops = {lane: sorted(ops, key=lambda o: o.ts) for lane, ops in comm_ops.items()}
        self.starts = {lane: [o.ts for o in ops] for lane, ops in self.ops.items()}
        self.longest = {lane: max(o.dur for o in ops) for lane, ops in self.ops.items()}

    def kind(self, kernel: Event) -> str | None:
        launch = self.launch.get(kernel.args.get("correlation"))
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
            kind = _op_kind(op)
            if kind is not None and (best is None or op.dur < best[0]):
                best = (op.dur, kind)
        return best[1] if best else None


@dataclass
class Classified:
    """A trace split into communication (by kind) and compute, per device/process."""

    device: str  # "gpu" or "cpu"
    comm: list[tuple[str, Event]]
    compute: list[Event]
    steps: list[tuple[int, float, float]]  # (step, start, end), CPU clock


def classify(events: list[Event]) -> Classified:
    kernels = [e for e in events if e.cat.lower() == "kernel"]
    steps = sorted({(int(m.group(1)), e.ts, e.end) for e in events
                    if e.cat.lower() in _CPU_CATS and (m := STEP_RE.match(e.name))})
    comm, compute = [], []
    if kernels:
        context = _LaunchContext(events)
        for k in kernels:
            if COMM_KERNEL_RE.search(k.name):
                kind = context.kind(k) or _kind_from_text(k.name) or "alltoall"
                comm.append((kind, k))
            else:
                compute.append(k)
        return Classified("gpu", comm, compute, steps)
    ops = [e for e in events if e.cat.lower() in _CPU_CATS and not STEP_RE.match(e.name)]
    comm = [(_op_kind(e) or "collective", e) for e in ops if COMM_CPU_RE.search(e.name)]
    waits = _Containment([e for _, e in comm])
    # An op that contains a communication op of its own thread waits for it: not compute.
    compute = [e for e in ops if not COMM_CPU_RE.search(e.name) and not waits.contains(e)]
    return Classified("cpu", comm, compute, steps)


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


# ----------------------------------------------------------------------------- analysis


def _covered(comm: list[Event], compute: list[Event]) -> tuple[Intervals, Intervals]:
    """(busy, covered): union of `comm`, and the part of it under compute of another lane of
    the same device/process."""
    busy: Intervals = []
    covered: Intervals = []
    compute_by_pid: dict[object, dict[object, list]] = {}
    for e in compute:
        compute_by_pid.setdefault(e.pid, {}).setdefault(e.tid, []).append((e.ts, e.end))
    comm_by_lane: dict[tuple, list] = {}
    for e in comm:
        comm_by_lane.setdefault(e.lane, []).append((e.ts, e.end))
    for (pid, tid), intervals in comm_by_lane.items():
        mine = union(intervals)
        busy += mine
        others = [i for t, lst in compute_by_pid.get(pid, {}).items() if t != tid for i in lst]
        covered += intersect(mine, union(others))
    return union(busy), union(covered)


def _stats(busy: Intervals, covered: Intervals, count: int) -> dict:
    time_us, over_us = length(busy), length(covered)
    return {"count": count, "time_us": time_us, "overlapped_us": over_us,
            "fraction": over_us / time_us if time_us > 0 else None}


def _window_intervals(events: list[Event], needle: str) -> Intervals:
    """Time windows of annotations whose name contains `needle` (GPU-side ones if any)."""
    gpu = [e for e in events if e.cat.lower() == "gpu_user_annotation" and needle in e.name]
    cpu = [e for e in events if e.cat.lower() in _CPU_CATS and needle in e.name]
    return union((e.ts, e.end) for e in (gpu or cpu))


def analyze(source, window: str | None = None) -> dict:
    """The report as a dict (see module docstring); `source` is a path or a parsed trace."""
    events = load_events(source)
    cl = classify(events)
    by_kind = {k: [e for kind, e in cl.comm if k in (kind, "all")] for k in KINDS}
    spans = {k: _covered(v, cl.compute) for k, v in by_kind.items()}
    report = {
        "device": cl.device,
        "num_events": len(events),
        "compute_time_us": length(union((e.ts, e.end) for e in cl.compute)),
        "comm": {k: _stats(*spans[k], len(by_kind[k])) for k in KINDS},
        "steps": [],
    }
    for step, lo, hi in cl.steps:
        entry = {"step": step, "time_us": hi - lo}
        for k in KINDS:
            busy, covered = spans[k]
            entry[k] = _stats(clip(busy, lo, hi), clip(covered, lo, hi),
                              sum(1 for e in by_kind[k] if lo <= e.ts < hi))
        report["steps"].append(entry)
    if window:
        win = _window_intervals(events, window)
        report["window"] = {"name": window, "count": len(win), "time_us": length(win)}
        for k in KINDS:
            busy, covered = spans[k]
            inside = sum(1 for e in by_kind[k] if intersect([(e.ts, e.end)], win))
            report["window"][k] = _stats(intersect(busy, win), intersect(covered, win), inside)
    return report


# ----------------------------------------------------------------------------- CLI


def _fmt(stats: dict) -> str:
    if not stats["count"]:
        return "none"
    frac = "n/a" if stats["fraction"] is None else f"{100 * stats['fraction']:.1f}%"
    return (f"{stats['time_us'] / 1e3:9.3f} ms in {stats['count']:5d} ops, "
            f"{stats['overlapped_us'] / 1e3:9.3f} ms ({frac}) overlapped by compute")


def format_report(path: str, report: dict) -> str:
    head = (f"{path}: {report['device'].upper()} trace, {report['num_events']} events, "
            f"compute busy {report['compute_time_us'] / 1e3:.3f} ms")
    lines = [head]
    for k in KINDS:
        lines.append(f"  {k:<10} {_fmt(report['comm'][k])}")
    if "window" in report:
        w = report["window"]
        lines.append(f"  inside {w['count']} '{w['name']}' windows ({w['time_us'] / 1e3:.3f} ms):")
        for k in ("alltoall", "all"):
            lines.append(f"    {k:<8} {_fmt(w[k])}")
    for s in report["steps"]:
        a2a = s["alltoall"]
        frac = "n/a" if a2a["fraction"] is None else f"{100 * a2a['fraction']:.1f}%"
        lines.append(f"  step {s['step']:>4}: {s['time_us'] / 1e3:9.3f} ms, all-to-all "
                     f"{a2a['time_us'] / 1e3:.3f} ms, overlapped {frac}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("traces", nargs="+", help="Chrome trace(s) (.json or .json.gz)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--window", default=None, metavar="NAME",
                        help="also report inside annotations whose name contains NAME "
                        "(e.g. 'dualpipe.FB', the overlapped F&B chunks)")


def run(args) -> int:
    reports = {}
    for path in args.traces:
        if not Path(path).exists():
            raise UserError(f"{path}: no such trace file")
        try:
            reports[path] = analyze(path, window=args.window)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise UserError(f"{path}: not a Chrome trace ({err})") from err
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[args.traces[0]], indent=1))
    else:
        print("\n".join(format_report(p, r) for p, r in reports.items()))
    return 0
