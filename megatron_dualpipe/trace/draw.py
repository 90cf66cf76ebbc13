"""``trace --png``: a timeline of a time window, one lane per stream (thread), in the manner of
DeepSeek's published overlap pictures.

Ranks are stacked top to bottom, each with one lane per stream that runs compute or
communication. Compute is blue; communication is red where it is exposed and light orange,
hatched, where compute runs at the same time on another stream of the device (overlapped);
memory copies are grey. Time is in ms from the report's origin (the first profiled step).
"""

from __future__ import annotations

import re

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.trace.intervals import (
    Intervals,
    clip,
    intersect,
    length,
    merge_close,
    union,
)
from megatron_dualpipe.trace.overlap import RankOverlap
from megatron_dualpipe.trace.ranks import Rank

COMPUTE, EXPOSED, OVERLAPPED, OTHER = "#4472c4", "#d62728", "#f8b878", "#a6a6a6"
LANE_IN, RANK_GAP_IN, WIDTH_IN, DPI = 0.24, 0.12, 12.0, 100


def default_window(ranks: list[Rank]) -> tuple[float, float]:
    """The first profiled step (across ranks), else everything: absolute microseconds."""
    first = min((s for r in ranks for s, _, _ in r.steps), default=None)
    if first is not None:
        spans = [(lo, hi) for r in ranks for s, lo, hi in r.steps if s == first]
        return min(lo for lo, _ in spans), max(hi for _, hi in spans)
    times = [(e.ts, e.end) for r in ranks for e in (*r.compute, *r.other)]
    times += [(c.event.ts, c.event.end) for r in ranks for c in r.comm]
    if not times:
        raise UserError("trace --png: the traces hold no compute or communication to draw")
    return min(t for t, _ in times), max(t for _, t in times)


def _lanes(rank: Rank, ov: RankOverlap, lo: float, hi: float, gap: float):
    """(label, compute, exposed, overlapped, other) per stream of `rank`, clipped to [lo, hi)."""
    comm_by_tid: dict[object, list] = {}
    for c in rank.comm:
        comm_by_tid.setdefault(c.event.tid, []).append((c.event.ts, c.event.end))
    other_by_tid: dict[object, list] = {}
    for e in rank.other:
        other_by_tid.setdefault(e.tid, []).append((e.ts, e.end))
    tids = set(ov.compute_by_tid) | set(comm_by_tid) | set(other_by_tid)
    out = []
    for tid in sorted(tids, key=lambda t: (not isinstance(t, (int, float)), str(t).zfill(12))):
        comm = clip(union(comm_by_tid.get(tid, [])), lo, hi)
        hidden = intersect(comm, ov.other_compute(tid)) if comm else []
        exposed = _minus(comm, hidden)
        compute = clip(ov.compute_by_tid.get(tid, []), lo, hi)
        other = clip(union(other_by_tid.get(tid, [])), lo, hi)
        if length(comm) + length(compute) + length(other) < 2 * gap:
            continue  # nothing a pixel wide in the window
        out.append((_lane_name(rank, tid),
                    *(merge_close(x, gap) for x in (compute, exposed, hidden, other))))
    return out


def _lane_name(rank: Rank, tid) -> str:
    name = rank.lane_names.get((rank.pid, tid), "")
    m = re.match(r"^thread (\S+) \((.*)\)$", name)
    if m:  # torch's "thread 9363 (pt_gloo_runloop)"
        name = f"{m.group(1)} {m.group(2)}"
    name = name or (f"stream {tid}" if rank.device == "gpu" else f"thread {tid}")
    return name if len(name) <= 26 else name[:25] + "…"


def _minus(a: Intervals, b: Intervals) -> Intervals:
    """`a` without `b` (both unions)."""
    out: Intervals = []
    j = 0
    for start, end in a:
        cur = start
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def draw(ranks: list[Rank], path: str, window: tuple[float, float], origin: float,
         title: str = "") -> None:
    """Write the timeline of `ranks` in `window` (absolute µs) to the PNG file `path`."""
    try:
        import matplotlib
    except ImportError as exc:
        raise UserError("trace --png needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lo, hi = window
    gap = (hi - lo) / (WIDTH_IN * DPI) / 2
    rows = []
    for rank in ranks:
        ov = RankOverlap(rank)
        a = ov.window([(lo, hi)])["all"]
        frac = "-" if a["fraction"] is None else f"{100 * a['fraction']:.0f}%"
        rows.append((f"{rank.label}: comm {a['time_us'] / 1e3:.2f} ms, {frac} overlapped",
                     _lanes(rank, ov, lo, hi, gap)))
    n_lanes = sum(max(len(lanes), 1) for _, lanes in rows)
    height = 1.3 + n_lanes * LANE_IN + len(rows) * (RANK_GAP_IN + 0.2)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, height), dpi=DPI)
    ms = lambda iv: [((s - origin) / 1e3, (e - s) / 1e3) for s, e in iv]  # noqa: E731
    y, ticks, labels = 0.0, [], []
    for head, lanes in rows:
        ax.text((lo - origin) / 1e3, y, head, fontsize=8, fontweight="bold", va="top",
                ha="left")
        y += 0.5
        for name, compute, exposed, hidden, other in lanes:
            band = (y + 0.1, 0.8)
            ax.broken_barh(ms(compute), band, facecolors=COMPUTE, linewidth=0)
            ax.broken_barh(ms(other), band, facecolors=OTHER, linewidth=0)
            ax.broken_barh(ms(exposed), band, facecolors=EXPOSED, linewidth=0)
            ax.broken_barh(ms(hidden), band, facecolors=OVERLAPPED, edgecolor="#c05000",
                           hatch="////", linewidth=0)
            ticks.append(y + 0.5)
            labels.append(name)
            y += 1.0
        ax.axhline(y + RANK_GAP_IN, color="#888888", linewidth=0.6)
        y += RANK_GAP_IN * 2
    ax.set_ylim(y, -0.2)
    ax.set_xlim((lo - origin) / 1e3, (hi - origin) / 1e3)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("ms (0 = start of the first profiled step)")
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.legend(handles=[Patch(color=COMPUTE, label="compute"),
                       Patch(color=EXPOSED, label="communication, exposed"),
                       Patch(facecolor=OVERLAPPED, edgecolor="#c05000", hatch="////",
                             label="communication, overlapped by compute"),
                       Patch(color=OTHER, label="memory copy")],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9, y=0.999, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
