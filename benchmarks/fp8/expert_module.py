"""The routed experts' grouped linear as the training step runs it, module against module:
TE's `GroupedLinear` in BF16 and under blockwise FP8, and our DeepGEMM subclass
(megatron_dualpipe/fp8/deepgemm) under the same autocast, forward + backward with the weight
gradients accumulated into FP32 `main_grad` (Megatron's gradient_accumulation_fusion), at one V3
GPU's shapes (8 experts x 4096 rows; fc1 7168->4096, fc2 2048->7168).

    python -m benchmarks.fp8.expert_module --json runs/expert_module.json

Variants are timed interleaved (A B C A B C ..., CUDA events, median of rounds); `+refresh`
re-quantizes the weights on every call (a step's first micro-batch), the others reuse them. One
profiled call per variant gives its GPU busy time (union of kernel intervals) and its kernels
by total device time, so the cost of every kernel outside the GEMMs is visible.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchmarks.portable import command_line

SHAPES = {"fc1": (7168, 4096), "fc2": (2048, 7168)}  # (in K, out N) per expert
VARIANTS = ("te_bf16", "te_blockwise", "te_blockwise+refresh", "deepgemm", "deepgemm+refresh",
            "deepgemm-triton", "deepgemm-triton+refresh")


def parse_args(argv=None) -> argparse.Namespace:
    from benchmarks.docs_section import add_result_args

    p = argparse.ArgumentParser(prog="python -m benchmarks.fp8.expert_module", description=__doc__)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rows", type=int, default=4096, help="rows per expert")
    p.add_argument("--shapes", default="fc1,fc2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quantizer", default="te",
                   help="activation quantizer of the `deepgemm` variants (`deepgemm-triton`: "
                   "the Triton kernel)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=4, help="calls per variant and round")
    add_result_args(p, "expert_module")
    return p.parse_args(argv)


def flops(rows: int, k: int, n: int) -> float:
    """forward + dgrad + wgrad of y = x W^T over `rows` rows."""
    return 3 * 2.0 * rows * k * n


def build(variant: str, experts: int, k: int, n: int, quantizer: str):
    """(module, call(x, dy)) with weights on the GPU and Megatron-style main_grad buffers."""
    import torch
    import transformer_engine.pytorch as te

    from megatron_dualpipe.fp8.deepgemm import deepgemm_grouped_linear

    cls = te.GroupedLinear
    if variant.startswith("deepgemm"):
        if variant.startswith("deepgemm-triton"):
            quantizer = "triton"
        cls = deepgemm_grouped_linear(te.GroupedLinear, quantizer)
    module = cls(experts, k, n, bias=False, params_dtype=torch.bfloat16, device="cuda",
                 fuse_wgrad_accumulation=True)
    weights = [getattr(module, f"weight{i}") for i in range(experts)]
    buffer = torch.zeros(experts * n * k, dtype=torch.float32, device="cuda")
    for i, w in enumerate(reversed(weights)):  # Megatron's DDP: reverse order, back to back
        w.main_grad = buffer[i * n * k:(i + 1) * n * k].view(n, k)
        w.grad_added_to_main_grad = False
    from benchmarks.fp8.common import te_autocast, te_recipe

    refresh = variant.endswith("+refresh")
    recipe = te_recipe("bf16" if variant == "te_bf16" else "blockwise")

    def call(x, dy, splits, first=None):
        first = refresh if first is None else first
        x.grad = None
        with te_autocast(recipe):
            if variant.startswith("deepgemm"):
                module.is_first_microbatch = first
                y = module(x, splits)
            else:
                y = module(x, splits, is_first_microbatch=first)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(dy)

    call(*_inputs(experts, 128, k, n), [128] * experts, first=True)  # quantize the weights
    return module, call


def _inputs(experts: int, rows: int, k: int, n: int):
    import torch

    x = torch.randn(experts * rows, k, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    dy = torch.randn(experts * rows, n, device="cuda", dtype=torch.bfloat16)
    return x, dy


def profile_call(call, x, dy, splits) -> dict:
    """GPU busy ms (union of kernels), idle ms, and the kernels by total device ms."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.speed.gaps import chrome_trace_text, idle_gaps

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call(x, dy, splits)
        torch.cuda.synchronize()
    trace = json.loads(chrome_trace_text(prof))
    gaps = idle_gaps(trace)
    return {"busy_ms": round(gaps["busy_ms"], 3), "idle_ms": round(gaps["idle_ms"], 3),
            "kernels": kernel_table(trace)}


def kernel_table(trace: dict, top: int = 14) -> list:
    """[(name, total ms, count)] of the trace's GPU events, largest first."""
    from benchmarks.speed.gaps import kernel_totals

    totals = sorted(kernel_totals(trace).items(), key=lambda kv: -kv[1][0])[:top]
    return [(name[:90], round(ms, 3), n) for name, (ms, n) in totals]


def run(args) -> dict:
    import torch

    from benchmarks.fp8.common import machine_info, time_cuda

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    results = {}
    for shape in args.shapes.split(","):
        k, n = SHAPES[shape]
        splits = [args.rows] * args.experts
        x, dy = _inputs(args.experts, args.rows, k, n)
        calls, errors = {}, {}
        for v in variants:
            try:
                calls[v] = build(v, args.experts, k, n, args.quantizer)[1]
                calls[v](x, dy, splits)
            except Exception as err:  # noqa: BLE001 - recorded, the others run
                errors[v] = f"{type(err).__name__}: {str(err)[:300]}"
                calls.pop(v, None)
        times = {v: [] for v in calls}
        for _ in range(args.rounds):
            for v, call in calls.items():
                times[v].append(time_cuda(lambda c=call: c(x, dy, splits), 1, args.iters)["ms"])
        work = flops(args.experts * args.rows, k, n)
        rows = {}
        for v, ts in times.items():
            median = statistics.median(ts)
            rows[v] = {"ms": median, "min_ms": min(ts), "max_ms": max(ts),
                       "tflops": work / median / 1e9,
                       "profile": profile_call(calls[v], x, dy, splits)}
        base = rows.get("te_bf16", {}).get("ms")
        for r in rows.values():
            r["vs_te_bf16"] = base / r["ms"] if base else None
        results[shape] = {"k": k, "n": n, "rows": rows, "errors": errors}
        del calls
        torch.cuda.empty_cache()
    return {"machine": machine_info(), "experts": args.experts, "rows_per_expert": args.rows,
            "quantizer": args.quantizer, "rounds": args.rounds, "iters": args.iters,
            "shapes": results,
            "command": command_line("-m benchmarks.fp8.expert_module", sys.argv[1:])}


def render(result: dict) -> str:
    lines = []
    for shape, r in result["shapes"].items():
        lines += [f"{shape} ({result['experts']} experts x {result['rows_per_expert']} rows, "
                  f"K {r['k']} -> N {r['n']}), fwd+dgrad+wgrad into main_grad:", "",
                  "| variant | ms (median) | range | TFLOP/s | vs TE BF16 | GPU busy ms | "
                  "idle ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for v, row in r["rows"].items():
            ratio = f"{row['vs_te_bf16']:.2f}x" if row["vs_te_bf16"] else "-"
            lines.append(f"| {v} | {row['ms']:.3f} | {row['min_ms']:.3f}-{row['max_ms']:.3f} | "
                         f"{row['tflops']:.0f} | {ratio} | {row['profile']['busy_ms']:.3f} | "
                         f"{row['profile']['idle_ms']:.3f} |")
        lines += [f"- `{v}` failed: {e}" for v, e in r["errors"].items()]
        lines.append("")
    return "\n".join(lines)


START, END = "<!-- expert_module:start -->", "<!-- expert_module:end -->"


def section(results: list[dict]) -> str:
    """The docs section: each run's machine, command and tables."""
    text = ("## Routed-expert module, module against module "
            "(`python -m benchmarks.fp8.expert_module`)\n\n")
    for result in results:
        m = result["machine"]
        text += (f"Machine: {m.get('gpu', 'CPU')}, torch {m.get('torch')}, CUDA {m.get('cuda')}, "
                 f"Transformer Engine {m.get('transformer_engine')}, cuBLASLt "
                 f"{m.get('cublaslt')}. Command: `{result['command']}` ({result['rounds']} "
                 f"interleaved rounds of {result['iters']} calls; DeepGEMM quantizer "
                 f"`{result['quantizer']}`).\n\n" + render(result) + "\n")
    return text


def main(argv=None) -> int:
    from benchmarks.docs_section import read_json, write_benchmark_section, write_json

    args = parse_args(argv)
    if args.from_json:
        write_benchmark_section(section, read_json(args.from_json), START, END)
        return 0
    result = run(args)
    print(render(result), flush=True)
    for shape, r in result["shapes"].items():
        for v, row in r["rows"].items():
            print(f"[{shape} {v}] kernels: " + "; ".join(
                f"{name} {ms:.2f}/{n}" for name, ms, n in row["profile"]["kernels"][:10]))
    write_json(args.json, result)
    if args.write_docs:
        write_benchmark_section(section, [result], START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
