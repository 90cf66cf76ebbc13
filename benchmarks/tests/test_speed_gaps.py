"""benchmarks/speed/gaps.py: idle GPU time and the host code behind it, on a hand-built trace
whose answer is worked out by hand, and module ranges on a real CPU profile."""

from __future__ import annotations

import json

import torch

from benchmarks.speed.gaps import _Ranges, annotate_modules, idle_gaps, kernel_totals
from benchmarks.speed.report import render


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid,
            "args": args}


def _trace():
    """Host (thread 1): MoELayer [0, 100) with mm@10, item@30 (a 38 us D2H copy), mm@75,
    add@81. GPU: k1 [20, 50), copy [50, 51), k3 [80, 90), k4 [95, 100).
    Gaps: [51, 80) ended by k3, launched at 76 (after the GPU went idle: late); [90, 95) ended
    by k4, launched at 82 (before: not late)."""
    return {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 7, "tid": 0, "args": {"name": "python"}},
        _x("user_annotation", "module MoELayer", 0, 100),
        _x("cpu_op", "aten::mm", 10, 5),
        _x("cuda_runtime", "cudaLaunchKernel", 11, 2, correlation=1),
        _x("cpu_op", "aten::item", 30, 40),
        _x("cuda_runtime", "cudaMemcpyAsync", 31, 38, correlation=2),
        _x("cpu_op", "aten::mm", 75, 5),
        _x("cuda_runtime", "cudaLaunchKernel", 76, 2, correlation=3),
        _x("cpu_op", "aten::add", 81, 3),
        _x("cuda_driver", "cuLaunchKernelEx", 82, 1, correlation=4),
        _x("kernel", "k1", 20, 30, tid=9, correlation=1),
        _x("gpu_memcpy", "Memcpy DtoH", 50, 1, tid=9, correlation=2),
        _x("kernel", "k3", 80, 10, tid=9, correlation=3),
        _x("kernel", "k4", 95, 5, tid=10, correlation=4),
    ]}


def test_idle_gaps_of_a_hand_built_trace():
    g = idle_gaps(_trace())
    assert g["busy_ms"] * 1e3 == 30 + 1 + 10 + 5
    assert g["span_ms"] * 1e3 == 80  # 20 .. 100
    assert g["idle_ms"] * 1e3 == 29 + 5 and g["num_gaps"] == 2
    assert g["late_ms"] * 1e3 == 29
    assert g["by_launcher"] == [("module MoELayer > aten::mm", 0.029, 1),
                                ("module MoELayer > aten::add", 0.005, 1)]
    assert g["syncs"] == [("module MoELayer > aten::item", "cudaMemcpyAsync", 0.038, 1)]
    assert g["largest"][0] == (0.029, "module MoELayer > aten::mm", "k3")


def test_gaps_under_the_threshold_and_overlapping_streams_are_not_idle():
    trace = _trace()
    trace["traceEvents"].append(_x("kernel", "k2", 45, 40, tid=10))  # covers [45, 85)
    g = idle_gaps(trace, min_gap_us=6)
    assert g["num_gaps"] == 0 and g["idle_ms"] == 0 and g["syncs"] == []
    assert idle_gaps({"traceEvents": []})["num_gaps"] == 0


def test_module_ranges_on_a_real_cpu_profile(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    handles = annotate_modules(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(torch.randn(4, 8))
    for h in handles:
        h.remove()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")]
    ranges = _Ranges(events)
    addmm = next(e for e in events if e["name"] == "aten::addmm")
    relu = next(e for e in events if e["name"] in ("aten::relu", "aten::clamp_min"))
    assert ranges.containing(addmm["ts"])[:2] == ["module Sequential", "module Linear"]
    assert ranges.containing(relu["ts"])[:2] == ["module Sequential", "module ReLU"]
    model(torch.randn(4, 8))  # the hooks are gone
    assert not model[0].__dict__.get("_gap_ranges")


def test_graphed_layers_get_no_hooks():
    """Megatron's CudaGraphManager refuses a layer with forward pre-hooks (H200 run)."""
    graphed = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    graphed.cudagraph_manager = object()
    model = torch.nn.Sequential(graphed, torch.nn.Linear(8, 8))
    handles = annotate_modules(model)
    assert not graphed._forward_pre_hooks and not graphed[0]._forward_pre_hooks
    assert model._forward_pre_hooks and model[1]._forward_pre_hooks
    assert len(handles) == 2 * 2
    for h in handles:
        h.remove()


def test_report_shows_the_idle_table():
    row = {"step_s": 0.5, "min_s": 0.5, "max_s": 0.5, "spread_pct": 0.0, "tokens_per_s": 1.0,
           "tflops": 1.0, "mfu": 0.5, "warmup_s": [0.5], "warmup_vs_steady": [1.0],
           "losses": [1.0], "profile": {"wall_ms": 500.0, "busy_ms": 450.0, "launches": 10,
                                        "kernels_ms": {"GEMM": 400.0},
                                        "gaps": idle_gaps(_trace())}}
    text = render({"rows": {"ours_1f1b/fp8": row}, "errors": {}})
    assert "| ours_1f1b/fp8 | 0.0 | 0.0 | 2 | module MoELayer > aten::mm 0.0 (1)" in text


def test_kernel_totals_count_overlapping_kernels_in_full():
    trace = _trace()
    trace["traceEvents"].append(_x("kernel", "k1", 40, 20, tid=10))  # overlaps the first k1
    totals = kernel_totals(trace)
    assert totals["k1"] == [0.05, 2] and totals["Memcpy DtoH"] == [0.001, 1]
    assert set(totals) == {"k1", "Memcpy DtoH", "k3", "k4"}
    from benchmarks.fp8.expert_module import kernel_table

    assert kernel_table(trace, top=2) == [("k1", 0.05, 2), ("k3", 0.01, 1)]


def test_profile_step_runs_on_a_cpu_model_and_keeps_the_trace(tmp_path, monkeypatch):
    """The profiled-step path end to end on CPU (no kernels: no GPU time, no gaps)."""
    import gzip

    from benchmarks.speed.__main__ import profile_step

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)

    class System:
        model = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())]

        def step(self, batches, step):
            self.model[0](torch.randn(4, 8)).sum().backward()
            return {"step_time_s": 0.25}

    trace = tmp_path / "t" / "trace.json.gz"
    p = profile_step(System(), None, 0, trace)
    assert p["wall_ms"] == 250 and p["launches"] == 0 and p["gaps"]["num_gaps"] == 0
    names = {e.get("name") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}
    assert {"module Sequential", "module Linear", "aten::addmm"} <= names

