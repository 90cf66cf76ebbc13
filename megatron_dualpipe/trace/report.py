"""The report: figures per rank and their total, as a dict (``--json``) or as text.

Shape (times in microseconds; a kind's stats are ``count``, ``time_us``, ``overlapped_us``,
``fraction`` = overlapped / time, ``exposed_us`` = time - overlapped)::

    device, num_events, compute_time_us, comm: {alltoall, p2p, collective, all: stats},
    steps: [{step, time_us, <kind>: stats, compute_us, idle_us}],
    window: {name, count, time_us, <kind>: stats, ...}        (with an annotation name)
    span_us, idle_us, origin_us, top_exposed: [{name, kind, family, count, time_us,
    exposed_us}], ranks: [{rank, device, compute_time_us, comm, steps, span_us, idle_us,
    top_exposed, ...}], range: {start_ms, end_ms, time_us, <kind>: stats, ...}

The top level is the sum over ranks (one rank: that rank's figures; a step's ``time_us`` is
the longest rank's).
"""

from __future__ import annotations

from pathlib import Path

from megatron_dualpipe.trace.classify import KINDS
from megatron_dualpipe.trace.intervals import union
from megatron_dualpipe.trace.load import (
    CPU_CODES,
    GPU_ANNOTATION,
    EventTable,
    from_events,
    read_all,
)
from megatron_dualpipe.trace.overlap import TOP, rank_report
from megatron_dualpipe.trace.ranks import Rank, split


def load(source, progress: bool | None = False) -> list[EventTable]:
    """Tables of a trace path (file or directory of per-rank traces) or of a parsed trace."""
    if isinstance(source, (str, Path)):
        return read_all([source], progress)
    if isinstance(source, (dict, list)):
        return [from_events(source)]
    return list(source)  # tables already


def analyze(source, window: str | None = None, time_range: tuple[float, float] | None = None,
            progress: bool | None = False) -> dict:
    """The report of `source` (see `load`); `window`: also inside annotations whose name
    contains it; `time_range`: ``(start_ms, end_ms)`` from `origin`, also inside that range."""
    return report(load(source, progress), window, time_range)


def ranks_of(tables: list[EventTable]) -> list[tuple[EventTable, Rank]]:
    return [(t, r) for t in tables for r in split(t)]


def origin(ranks: list[Rank]) -> float:
    """Time zero of ``--window START:END``: the earliest profiled step's start, else the
    earliest event."""
    starts = [lo for r in ranks for _, lo, _ in r.steps]
    if not starts:
        starts = [e.ts for r in ranks for e in (*r.compute, *r.other)]
        starts += [c.event.ts for r in ranks for c in r.comm]
    return min(starts, default=0.0)


def annotation_intervals(table: EventTable, needle: str):
    """Windows of annotations whose name contains `needle` (GPU-side ones if any)."""
    ids = table.name_ids(lambda n: needle in n)
    gpu = list(table.events(GPU_ANNOTATION, names=ids))
    cpu = list(table.events(*CPU_CODES, names=ids)) if not gpu else []
    return union((e.ts, e.end) for e in (gpu or cpu))


def report(tables: list[EventTable], window: str | None = None,
           time_range: tuple[float, float] | None = None) -> dict:
    pairs = ranks_of(tables)
    zero = origin([r for _, r in pairs])
    abs_range = None if time_range is None else \
        (zero + time_range[0] * 1e3, zero + time_range[1] * 1e3)
    per_rank = [rank_report(r, annotation_intervals(t, window) if window else None, window,
                            abs_range) for t, r in pairs]
    out = total(per_rank)
    out["num_events"] = sum(t.num_events for t in tables)
    out["origin_us"] = zero
    if time_range is not None:
        out["range"] = {"start_ms": time_range[0], "end_ms": time_range[1], **out["range"]}
    out["ranks"] = per_rank
    return out


def _add_stats(into: dict, s: dict) -> None:
    for key in ("count", "time_us", "overlapped_us", "exposed_us"):
        into[key] = into.get(key, 0) + s[key]
    into["fraction"] = into["overlapped_us"] / into["time_us"] if into["time_us"] > 0 else None


def _sum_window(windows: list[dict]) -> dict:
    out: dict = {}
    for w in windows:
        for key, value in w.items():
            if key in KINDS:
                _add_stats(out.setdefault(key, {}), value)
            elif key in ("name", "step"):
                out[key] = value
            elif key == "time_us" and "step" in w:
                out[key] = max(out.get(key, 0), value)
            else:
                out[key] = out.get(key, 0) + value
    return out


def total(per_rank: list[dict]) -> dict:
    """The sum of rank reports (a step's time: the longest rank's)."""
    devices = {r["device"] for r in per_rank}
    out = {"device": devices.pop() if len(devices) == 1 else "mixed" if devices else "cpu",
           "num_events": 0,
           "compute_time_us": sum(r["compute_time_us"] for r in per_rank),
           "comm": {k: {"count": 0, "time_us": 0, "overlapped_us": 0, "fraction": None,
                        "exposed_us": 0} for k in KINDS},
           "steps": []}
    for r in per_rank:
        for k in KINDS:
            _add_stats(out["comm"][k], r["comm"][k])
    steps: dict[int, list] = {}
    for r in per_rank:
        for s in r["steps"]:
            steps.setdefault(s["step"], []).append(s)
    out["steps"] = [_sum_window(v) for _, v in sorted(steps.items())]
    for key in ("window", "range"):
        if any(key in r for r in per_rank):
            out[key] = _sum_window([r[key] for r in per_rank if key in r])
    out["span_us"] = sum(r["span_us"] for r in per_rank)
    out["idle_us"] = sum(r["idle_us"] for r in per_rank)
    groups: dict[tuple, dict] = {}
    for r in per_rank:
        for g in r["top_exposed"]:
            into = groups.setdefault((g["name"], g["kind"]), {**g, "count": 0, "time_us": 0.0,
                                                             "exposed_us": 0.0})
            for key in ("count", "time_us", "exposed_us"):
                into[key] += g[key]
    out["top_exposed"] = sorted(groups.values(), key=lambda g: -g["exposed_us"])[:TOP]
    return out


# ----------------------------------------------------------------------------- text


def _pct(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def _fmt(stats: dict) -> str:
    if not stats["count"]:
        return "none"
    return (f"{stats['time_us'] / 1e3:9.3f} ms in {stats['count']:5d} ops, "
            f"{stats['overlapped_us'] / 1e3:9.3f} ms ({_pct(stats['fraction'])}) overlapped by "
            "compute")


def format_report(path: str, report: dict) -> str:
    """The report as text: totals per kind, per rank, per step, the most exposed kernels."""
    ranks = report.get("ranks", [])
    head = (f"{path}: {report['device'].upper()} trace, {report['num_events']} events"
            + (f", {len(ranks)} ranks" if len(ranks) > 1 else "")
            + f", compute busy {report['compute_time_us'] / 1e3:.3f} ms")
    lines = [head]
    for k in KINDS:
        lines.append(f"  {k:<10} {_fmt(report['comm'][k])}")
    if "idle_us" in report:
        a = report["comm"]["all"]
        lines.append(f"  exposed communication {a['exposed_us'] / 1e3:.3f} ms, idle "
                     f"{report['idle_us'] / 1e3:.3f} ms of {report['span_us'] / 1e3:.3f} ms "
                     "analysed" + (" (summed over ranks)" if len(ranks) > 1 else ""))
    if "window" in report:
        w = report["window"]
        lines.append(f"  inside {w['count']} '{w['name']}' windows ({w['time_us'] / 1e3:.3f} ms):")
        for k in ("alltoall", "all"):
            lines.append(f"    {k:<8} {_fmt(w[k])}")
    if "range" in report:
        r = report["range"]
        lines.append(f"  inside {r['start_ms']:g}..{r['end_ms']:g} ms:")
        for k in ("alltoall", "all"):
            lines.append(f"    {k:<8} {_fmt(r[k])}")
    for s in report["steps"]:
        a2a = s["alltoall"]
        lines.append(f"  step {s['step']:>4}: {s['time_us'] / 1e3:9.3f} ms, all-to-all "
                     f"{a2a['time_us'] / 1e3:.3f} ms, overlapped {_pct(a2a['fraction'])}"
                     + (f", idle {s['idle_us'] / 1e3:.3f} ms" if "idle_us" in s else ""))
    if len(ranks) > 1:
        lines.append(f"  {'rank':<12} {'comm ms':>10} {'exposed ms':>10} {'overlap':>8} "
                     f"{'compute ms':>10} {'idle ms':>10}")
        for r in ranks:
            a = r["comm"]["all"]
            lines.append(f"  {r['rank']:<12} {a['time_us'] / 1e3:10.3f} "
                         f"{a['exposed_us'] / 1e3:10.3f} {_pct(a['fraction']):>8} "
                         f"{r['compute_time_us'] / 1e3:10.3f} {r['idle_us'] / 1e3:10.3f}")
    if report.get("top_exposed"):
        lines.append("  most exposed communication (exposed ms / total ms, count, kind):")
        for g in report["top_exposed"]:
            lines.append(f"    {g['exposed_us'] / 1e3:9.3f} / {g['time_us'] / 1e3:9.3f} "
                         f"{g['count']:6d}  {g['kind']:<10} {g['name'][:70]}")
    return "\n".join(lines)
