"""Where the GPU waits for the host: idle gaps between kernels in a profiled step, attributed to
the host code that launched the kernel after each gap.

`idle_gaps(trace)` reads a torch.profiler Chrome trace (`prof.export_chrome_trace`): GPU busy
time is the union of kernel / memcpy / memset intervals (all streams); a gap is idle time between
two busy intervals. The kernel that ends a gap is linked to its launch (`cuda_runtime` or
`cuda_driver` event with the same `correlation`), and the launch to the host ranges that contain
it on its thread (`cpu_op`, `user_annotation`: module names from `annotate_modules`). A gap whose
launch came after the GPU had gone idle is host-bound ("launched late"); one whose launch was
earlier waited on something else (an event, another stream). Synchronizing runtime calls
(`cudaStreamSynchronize`, D2H copies, ...) that ran while the GPU was idle are counted by the
host range that made them.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

BUSY_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
RANGE_CATS = ("cpu_op", "user_annotation")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpyAsync", "cuStreamSynchronize", "cuCtxSynchronize")
GENERIC = ("aten::", "cu")  # aten ops, CUDA runtime / driver calls


class _Ranges:
    """Host ranges of one thread with their nesting, for 'which ranges contain time t'."""

    def __init__(self, events):
        self.events = sorted(events, key=lambda e: (e["ts"], -e.get("dur", 0)))
        self.starts = [e["ts"] for e in self.events]
        self.parent = []
        stack = []
        for i, e in enumerate(self.events):
            while stack and _end(self.events[stack[-1]]) < e["ts"]:
                stack.pop()
            self.parent.append(stack[-1] if stack else -1)
            stack.append(i)

    def containing(self, t: float) -> list[str]:
        """Names of the ranges that contain t, outermost first."""
        i = bisect.bisect_right(self.starts, t) - 1
        while i >= 0 and _end(self.events[i]) < t:
            i = self.parent[i]
        names = []
        while i >= 0:
            names.append(self.events[i]["name"])
            i = self.parent[i]
        return names[::-1]


def _end(e) -> float:
    return e["ts"] + e.get("dur", 0)


def _label(chain: list[str]) -> str:
    """'innermost module or autograd node > innermost op' for a host-range chain."""
    if not chain:
        return "(outside any host range)"
    context = [n for n in chain if not n.startswith(GENERIC)]
    inner = chain[-1]
    if context and context[-1] != inner:
        return f"{_short(context[-1])} > {_short(inner)}"
    return _short(inner)


def _short(name: str) -> str:
    return name.replace("autograd::engine::evaluate_function: ", "bwd ")[:80]


def idle_gaps(trace: dict, min_gap_us: float = 2.0, top: int = 12) -> dict:
    """Idle GPU time inside [first kernel start, last kernel end], attributed (module doc).

    Returns {"busy_ms", "span_ms", "idle_ms", "num_gaps", "late_ms" (launched after the GPU
    went idle), "by_launcher": [(label, ms, count)], "syncs": [(label, call, host ms, count)],
    "largest": [(gap ms, label, next kernel)]}. Gaps under `min_gap_us` are ignored (launch
    latency between back-to-back kernels)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    busy = sorted((e for e in events if e.get("cat") in BUSY_CATS), key=lambda e: e["ts"])
    if not busy:
        return {"busy_ms": 0.0, "span_ms": 0.0, "idle_ms": 0.0, "num_gaps": 0, "late_ms": 0.0,
                "by_launcher": [], "syncs": [], "largest": []}
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    by_thread = defaultdict(list)
    for e in events:
        if e.get("cat") in RANGE_CATS:
            by_thread[(e["pid"], e["tid"])].append(e)
    ranges = {k: _Ranges(v) for k, v in by_thread.items()}

    def chain(e) -> list[str]:
        r = ranges.get((e["pid"], e["tid"]))
        return r.containing(e["ts"]) if r else []

    gaps, busy_us, end = [], 0.0, _end(busy[0])
    start_span, cur_start = busy[0]["ts"], busy[0]["ts"]
    for e in busy[1:]:
        if e["ts"] > end:
            busy_us += end - cur_start
            if e["ts"] - end >= min_gap_us:
                gaps.append((end, e["ts"], e))
            cur_start = e["ts"]
        end = max(end, _end(e))
    busy_us += end - cur_start

    by_label = defaultdict(lambda: [0.0, 0])
    largest, late_us = [], 0.0
    for gap_start, gap_end, kernel in gaps:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        label = _label(chain(launch)) if launch else "(launch not in trace)"
        if launch and launch["ts"] > gap_start:
            late_us += gap_end - gap_start
        by_label[label][0] += gap_end - gap_start
        by_label[label][1] += 1
        largest.append((gap_end - gap_start, label, kernel["name"][:60]))

    syncs = defaultdict(lambda: [0.0, 0])
    gap_starts = [g[0] for g in gaps]
    for e in events:
        if e.get("cat") not in LAUNCH_CATS or e["name"] not in SYNC_CALLS:
            continue
        i = bisect.bisect_right(gap_starts, _end(e)) - 1
        if i < 0 or e["ts"] > gaps[i][1]:  # not during a gap: the GPU did not wait on it
            continue
        key = (_label(chain(e)), e["name"])
        syncs[key][0] += e.get("dur", 0)
        syncs[key][1] += 1

    idle_us = sum(g[1] - g[0] for g in gaps)
    return {
        "busy_ms": busy_us / 1e3, "span_ms": (end - start_span) / 1e3, "idle_ms": idle_us / 1e3,
        "num_gaps": len(gaps), "late_ms": late_us / 1e3,
        "by_launcher": [(k, round(v[0] / 1e3, 3), v[1]) for k, v in
                        sorted(by_label.items(), key=lambda kv: -kv[1][0])[:top]],
        "syncs": [(k[0], k[1], round(v[0] / 1e3, 3), v[1]) for k, v in
                  sorted(syncs.items(), key=lambda kv: -kv[1][0])[:top]],
        "largest": [(round(g / 1e3, 3), label, name) for g, label, name in
                    sorted(largest, key=lambda x: -x[0])[:top]],
    }


def chrome_trace_text(prof) -> str:
    """A finished torch profiler's Chrome trace as JSON text (the profiler only exports to a
    file)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return path.read_text()


def kernel_totals(trace: dict) -> dict[str, list]:
    """{GPU event name: [total ms, count]} of a trace's kernels, copies and memsets, each
    counted for its whole duration (also where kernels overlap, e.g. programmatic dependent
    launch, which the profiler's per-op self times split)."""
    totals: dict[str, list] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in BUSY_CATS:
            t = totals.setdefault(e["name"], [0.0, 0])
            t[0] += e.get("dur", 0) / 1e3
            t[1] += 1
    return totals


def annotate_modules(model) -> list:
    """Profiler ranges named after each submodule's class around its forward (so a forward-pass
    gap names its module); returns the hook handles (call `.remove()` on each to undo).
    Layers in Megatron's CUDA graphs (a `cudagraph_manager`) and their submodules get none:
    Megatron refuses a graphed module with forward pre-hooks, and a replay runs no hooks."""
    import torch

    graphed = {id(m) for g in model.modules() if getattr(g, "cudagraph_manager", None)
               for m in g.modules()}
    handles = []
    for module in model.modules():
        if id(module) in graphed:
            continue
        label = f"module {type(module).__name__}"

        def enter(mod, args, label=label):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            mod.__dict__.setdefault("_gap_ranges", []).append(rf)

        def leave(mod, args, output):
            stack = mod.__dict__.get("_gap_ranges")
            if stack:
                stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    return handles
