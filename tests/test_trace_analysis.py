"""`trace` analysis on small synthetic Chrome traces with known answers (the figures of the
analyser before it became the `megatron_dualpipe.trace` package, kept as they were)."""

from __future__ import annotations

import gzip
import json

import pytest
from trace_events import cpu, kernel, launch

from megatron_dualpipe.cli import main
from megatron_dualpipe.trace import analyze
from megatron_dualpipe.trace import intervals as T

A2A = "ncclDevKernel_AllToAll_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
SENDRECV = "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"
GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32"


def test_interval_helpers():
    assert T.union([(5, 6), (0, 2), (1, 3), (3, 4), (7, 7)]) == [(0, 4), (5, 6)]
    assert T.intersect([(0, 4), (5, 10)], [(2, 6), (8, 9)]) == [(2, 4), (5, 6), (8, 9)]
    assert T.length([(0, 4), (5, 6)]) == 5
    assert T.clip([(0, 4), (5, 10)], 3, 6) == [(3, 4), (5, 6)]


def test_intersect_binary_search_path_equals_merge():
    # `intersect` switches to a binary search when one side is 16x shorter: same answer as
    # the pairwise merge of the two sorted lists, whichever side is short.
    import random

    rng = random.Random(0)
    for _ in range(200):
        a = T.union((x, x + 3 * rng.random()) for x in (100 * rng.random() for _ in range(80)))
        b = T.union((x, x + 10 * rng.random()) for x in (100 * rng.random() for _ in range(3)))
        merged, i, j = [], 0, 0
        while i < len(a) and j < len(b):
            lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if lo < hi:
                merged.append((lo, hi))
            i, j = (i + 1, j) if a[i][1] < b[j][1] else (i, j + 1)
        assert T.intersect(a, b) == T.intersect(b, a) == merged


def test_half_overlapped_alltoall():
    trace = {"traceEvents": [kernel(A2A, 0, 100, stream=20), kernel(GEMM, 50, 100, stream=7)]}
    r = analyze(trace)
    assert r["device"] == "gpu"
    a2a = r["comm"]["alltoall"]
    assert (a2a["count"], a2a["time_us"], a2a["overlapped_us"]) == (1, 100, 50)
    assert a2a["fraction"] == pytest.approx(0.5)
    assert r["compute_time_us"] == 100
    assert r["comm"]["p2p"]["count"] == 0 and r["comm"]["p2p"]["fraction"] is None


def test_union_of_compute_and_of_comm():
    # Two all-to-alls [10,60) and [40,100) (busy 90); compute [0,30) and [20,50) on two streams
    # covers [10,50) of it -> 40 of 90. A kernel on the all-to-all's own stream is never
    # concurrent, and a kernel on another device does not count.
    trace = [kernel(A2A, 10, 50, stream=20), kernel(A2A, 40, 60, stream=21),
             kernel(GEMM, 0, 30, stream=7), kernel(GEMM, 20, 30, stream=8),
             kernel(GEMM, 70, 10, stream=20, device=0) | {"ts": 100},
             kernel(GEMM, 50, 50, stream=7, device=1)]
    a2a = analyze(trace)["comm"]["alltoall"]
    assert a2a["time_us"] == 90
    assert a2a["overlapped_us"] == 40
    assert a2a["fraction"] == pytest.approx(40 / 90)


def test_sendrecv_classified_by_launching_c10d_op():
    # Both SendRecv kernels: one launched under an all_to_all (record_param_comms), one under a
    # pipeline send; a third with no CPU context falls back to its name (all-reduce).
    events = [
        cpu("c10d::alltoall_base_", 0, 20), cpu("record_param_comms", 1, 10,
                                                args={"Collective name": "all_to_allv"}),
        launch(5, corr=11),
        cpu("nccl:send 0->1", 30, 10, tid=2), launch(32, corr=12, tid=2),
        kernel(SENDRECV, 100, 40, stream=20, corr=11),
        kernel(SENDRECV, 200, 10, stream=30, corr=12),
        kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 300, 30, stream=40, corr=99),
        kernel(GEMM, 120, 100, stream=7),
    ]
    r = analyze(events)["comm"]
    assert (r["alltoall"]["count"], r["alltoall"]["time_us"], r["alltoall"]["overlapped_us"]) \
        == (1, 40, 20)
    assert (r["p2p"]["count"], r["p2p"]["time_us"], r["p2p"]["overlapped_us"]) == (1, 10, 10)
    assert (r["collective"]["count"], r["collective"]["overlapped_us"]) == (1, 0)
    assert (r["all"]["count"], r["all"]["time_us"], r["all"]["overlapped_us"]) == (3, 80, 30)


def test_per_step_windows_and_annotation_window():
    events = [
        cpu("ProfilerStep#4", 0, 100, cat="user_annotation"),
        cpu("ProfilerStep#5", 100, 100, cat="user_annotation"),
        cpu("dualpipe.FB 0.3&1.1", 140, 60, cat="user_annotation"),
        kernel(A2A, 80, 40, stream=20),     # straddles the two steps
        kernel(GEMM, 90, 20, stream=7),     # covers [90,110)
        kernel(A2A, 150, 50, stream=20),
        kernel(GEMM, 150, 40, stream=7),    # covers [150,190)
    ]
    r = analyze(events, window="dualpipe.FB")
    s4, s5 = r["steps"]
    assert (s4["step"], s4["time_us"]) == (4, 100)
    assert (s4["alltoall"]["time_us"], s4["alltoall"]["overlapped_us"]) == (20, 10)
    assert (s5["alltoall"]["time_us"], s5["alltoall"]["overlapped_us"]) == (70, 50)
    assert r["comm"]["alltoall"]["time_us"] == 90
    w = r["window"]
    assert (w["count"], w["time_us"]) == (1, 60)
    assert (w["alltoall"]["time_us"], w["alltoall"]["overlapped_us"]) == (50, 40)
    assert w["alltoall"]["fraction"] == pytest.approx(0.8)


def test_cpu_trace_counts_other_threads_only():
    # c10d all-to-all on thread 1 inside a parent op that waits for it (not compute), run by
    # gloo on thread 3; an op on thread 2 covers 15 of the 50.
    events = [
        cpu("ProfilerStep#0", 0, 200, cat="user_annotation"),
        cpu("autograd::engine::evaluate_function: _AllToAllBackward", 0, 100),
        cpu("c10d::alltoall_base_", 10, 50),
        cpu("gloo:all_to_all", 12, 40, tid=3, cat="user_annotation"),
        cpu("aten::mm", 45, 100, tid=2),
        cpu("c10d::recv_", 150, 10),
    ]
    r = analyze(events)
    assert r["device"] == "cpu"
    a2a = r["comm"]["alltoall"]
    assert (a2a["count"], a2a["time_us"], a2a["overlapped_us"]) == (2, 50, 15)
    assert r["comm"]["p2p"]["time_us"] == 10
    assert r["steps"][0]["all"]["time_us"] == 60
    # Added with the per-rank report: compute is aten::mm alone (the autograd node waits).
    assert r["compute_time_us"] == 100
    assert [(t["name"], t["exposed_us"]) for t in r["top_exposed"]] == \
        [("c10d::alltoall_base_", 35), ("gloo:all_to_all", 33), ("c10d::recv_", 10)]


def test_cli_text_and_json(tmp_path, capsys):
    trace = {"traceEvents": [kernel(A2A, 0, 100, stream=20), kernel(GEMM, 0, 80, stream=7),
                             {"ph": "M", "name": "process_name", "pid": 0}]}
    plain = tmp_path / "rank0.json"
    plain.write_text(json.dumps(trace))
    packed = tmp_path / "rank1.json.gz"
    with gzip.open(packed, "wt") as f:
        json.dump(trace, f)
    assert main(["trace", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "alltoall" in out and "80.0%" in out
    assert main(["trace", str(packed), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["comm"]["alltoall"]["fraction"] == pytest.approx(0.8)
    assert main(["trace", str(tmp_path / "missing.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["trace", str(bad)]) == 2
