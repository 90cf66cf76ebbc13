"""The analyser on one of our own traces gives the figures it gave before it was rewritten.

`tests/data/tiny_moe_cpu_rank0.json.gz` is rank 0 (pipeline stage 0, EP=2) of
``python -m megatron_dualpipe train recipes/tiny_moe_cpu.yaml --profile-steps 2:4`` (gloo):
``ProfilerStep#3`` and the events of its first half (the rest is cut to keep the file small).
The expectation is computed here independently of the analyser: the trace is read with `json`,
communication ops are found by the rules docs/overlap.md states, and the times are measured by a
sweep over every event boundary instead of interval unions. Before the rewrite (commit
ca47292) the analyser reported for this file: all-to-all 15.558 ms in 27 ops, p2p 44.625 ms in
10, collective 3.934 ms in 6, compute 29.902 ms, 0% overlapped, step 3 262.796 ms.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from megatron_dualpipe.trace import analyze

FIXTURE = Path(__file__).parent / "data" / "tiny_moe_cpu_rank0.json.gz"
CPU_CATS = ("cpu_op", "user_annotation", "python_function")


def _kind(op) -> str:
    text = op["args"].get("Collective name", op["name"])
    if re.search(r"all_?to_?all", text, re.I):
        return "alltoall"
    if re.search(r"reduce|gather|scatter|broadcast|barrier", text, re.I):
        return "collective"
    if re.search(r"send|recv", text, re.I):
        return "p2p"
    return "collective"


def reference(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"]
                  if e.get("ph") == "X" and e.get("cat") in CPU_CATS]
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    ops = [e for e in events if e not in steps]
    is_comm = [bool(re.search(r"gloo|^c10d::|^nccl:|record_param_comms", e["name"]))
               for e in ops]
    comm = [e for e, c in zip(ops, is_comm) if c]

    def waits(op):
        return any(c["tid"] == op["tid"] and c["pid"] == op["pid"] and c["ts"] >= op["ts"]
                   and c["ts"] + c["dur"] <= op["ts"] + op["dur"] for c in comm)

    compute = [e for e, c in zip(ops, is_comm) if not c and not waits(e)]
    # Sweep: +1/-1 per (role, thread) at every boundary.
    edges = []
    for role, group in [("compute", compute)] + [(k, [c for c in comm if _kind(c) == k])
                                                 for k in ("alltoall", "p2p", "collective")]:
        for e in group:
            edges += [(e["ts"], 1, role, e["tid"]), (e["ts"] + e["dur"], -1, role, e["tid"])]
    edges.sort(key=lambda x: x[0])
    kinds = ("alltoall", "p2p", "collective")
    time = dict.fromkeys([*kinds, "all", "compute"], 0.0)
    over = dict.fromkeys([*kinds, "all"], 0.0)
    lo, hi = steps[0]["ts"], steps[0]["ts"] + steps[0]["dur"]
    busy_in_step = 0.0
    active: dict[tuple, int] = {}
    prev = None
    for t, delta, role, tid in edges:
        if prev is not None and t > prev:
            on = {key for key, n in active.items() if n > 0}
            computing = {th for r, th in on if r == "compute"}
            for k in (*kinds, "all"):
                threads = {th for r, th in on if r == k or (k == "all" and r in kinds)}
                if threads:
                    time[k] += t - prev
                    # covered: compute runs on a thread other than a communicating one
                    if any(computing - {th} for th in threads):
                        over[k] += t - prev
            if computing:
                time["compute"] += t - prev
            if on:
                busy_in_step += max(0.0, min(t, hi) - max(prev, lo))
        active[(role, tid)] = active.get((role, tid), 0) + delta
        prev = t
    counts = {k: sum(1 for c in comm if _kind(c) == k) for k in kinds}
    counts["all"] = len(comm)
    return {"time": time, "over": over, "counts": counts, "step": int(steps[0]["name"][13:]),
            "step_us": hi - lo, "idle_us": (hi - lo) - busy_in_step}


def test_own_cpu_trace_matches_independent_reference():
    ref = reference(FIXTURE)
    r = analyze(FIXTURE)
    assert r["device"] == "cpu"
    for k in ("alltoall", "p2p", "collective", "all"):
        s = r["comm"][k]
        assert s["count"] == ref["counts"][k], k
        assert s["time_us"] == pytest.approx(ref["time"][k], abs=1e-3), k
        assert s["overlapped_us"] == pytest.approx(ref["over"][k], abs=1e-3), k
        assert s["exposed_us"] == pytest.approx(ref["time"][k] - ref["over"][k], abs=1e-3), k
    assert r["compute_time_us"] == pytest.approx(ref["time"]["compute"], abs=1e-3)
    (step,) = r["steps"]
    assert (step["step"], step["time_us"]) == (ref["step"], pytest.approx(ref["step_us"]))
    # Every event of the file lies in the step, so the step's figures are the file's.
    assert step["all"]["time_us"] == pytest.approx(ref["time"]["all"], abs=1e-3)
    assert step["idle_us"] == pytest.approx(ref["idle_us"], abs=1e-3)
    assert r["idle_us"] == pytest.approx(ref["idle_us"], abs=1e-3)
    assert r["span_us"] == pytest.approx(ref["step_us"])
    # The trace is a real one: gloo all-to-alls of the MoE layers and pipeline send/recv.
    assert ref["counts"]["alltoall"] > 10 and ref["counts"]["p2p"] > 0
