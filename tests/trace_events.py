"""Builders of synthetic Chrome trace events for the trace analysis tests."""

from __future__ import annotations


def kernel(name, ts, dur, stream=7, device=0, corr=None):
    args = {"stream": stream, "device": device}
    if corr is not None:
        args["correlation"] = corr
    return {"ph": "X", "cat": "kernel", "name": name, "pid": device, "tid": stream,
            "ts": ts, "dur": dur, "args": args}


def cpu(name, ts, dur, tid=1, pid=100, cat="cpu_op", args=None):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur,
            "args": args or {}}


def launch(ts, corr, tid=1, pid=100):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": pid,
            "tid": tid, "ts": ts, "dur": 1, "args": {"correlation": corr}}


def step(n, ts, dur, pid=100):
    return cpu(f"ProfilerStep#{n}", ts, dur, pid=pid, cat="user_annotation")


GEMM = "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>" \
    "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)"
