"""Blockwise-scaled FP8 GEMM routes at DeepSeek-V3's per-GPU shapes, on one Hopper GPU.

    python -m benchmarks.fp8.gemm_routes --out runs/gemm_routes.json [--dry-run]

Routes (each in its own try/except: a failing route records its exact error, the others run):
  bf16               torch.matmul / torch._grouped_mm
  te bf16            TE Linear / GroupedLinear, no FP8 (framework reference for `te blockwise`)
  te blockwise       TE under Float8BlockScaling autocast, weights cached (is_first_microbatch)
  deepgemm           DeepGEMM kernels (`import deep_gemm`), GEMM alone and GEMM + activation
                     quantization; its JIT compiles each kernel with nvcc at first use, so the
                     kernels are compiled first by --jit-workers parallel processes
  torch scaled_mm    torch.nn.functional.scaled_mm / scaled_grouped_mm, blockwise recipes
Parts: fwd (x W^T), dgrad (dy W), wgrad (dy^T x); `+quant` adds the 1x128 quantization of the
activation; `total` is fwd+bwd (measured for TE, summed otherwise). Every result is checked
against a float64 reference before it is timed (median of CUDA-event timings).
`--dry-run` checks the shape table and writes the JSON layout without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.fp8 import routes_dense as RD  # noqa: E402
from benchmarks.fp8 import routes_grouped as RG  # noqa: E402
from benchmarks.fp8.common import machine_info, time_cuda  # noqa: E402

# One V3 GPU (EP64, TP1, 4096-token micro-batch): (label, tokens M, in K, out N).
DENSE_CASES = [
    ("MLA q_down 7168->1536", 4096, 7168, 1536),
    ("MLA q_up 1536->24576", 4096, 1536, 24576),
    ("MLA kv_down 7168->576", 4096, 7168, 576),
    ("MLA kv_up 512->32768", 4096, 512, 32768),
    ("MLA o_proj 16384->7168", 4096, 16384, 7168),
    ("shared expert fc1 7168->4096 (gated)", 4096, 7168, 4096),
    ("shared expert fc2 2048->7168", 4096, 2048, 7168),
]
# (label, local experts, tokens per expert, in K, out N); expert FFN 2048, fc1 gated.
GROUPED_CASES = [
    ("8x4096 experts fc1 7168->4096 (gated)", 8, 4096, 7168, 4096),
    ("8x4096 experts fc2 2048->7168", 8, 4096, 2048, 7168),
    ("4x8192 experts fc1 7168->4096 (gated)", 4, 8192, 7168, 4096),
    ("4x8192 experts fc2 2048->7168", 4, 8192, 2048, 7168),
]
DENSE_ROUTES = {
    "bf16": lambda c, ctx: RD.bf16_torch(c),
    "te bf16": lambda c, ctx: RD.te_linear(c, "bf16", ctx["args"]),
    "te blockwise": lambda c, ctx: RD.te_linear(c, "blockwise", ctx["args"]),
    "deepgemm": lambda c, ctx: RD.deepgemm(c, _dg(ctx), ctx["args"].te_quantizer),
    "torch scaled_mm": lambda c, ctx: RD.torch_scaled_mm(c),
}
GROUPED_ROUTES = {
    "bf16": lambda c, ctx: RG.bf16_grouped_mm(c),
    "te bf16": lambda c, ctx: RG.te_grouped(c, "bf16", ctx["args"]),
    "te blockwise": lambda c, ctx: RG.te_grouped(c, "blockwise", ctx["args"]),
    "deepgemm": lambda c, ctx: RG.deepgemm_grouped(c, _dg(ctx), ctx["args"].te_quantizer),
    "torch scaled_grouped_mm": lambda c, ctx: RG.torch_scaled_grouped_mm(c),
    "torch _scaled_grouped_mm rowwise": lambda c, ctx: RG.torch_scaled_grouped_mm_rowwise(c),
}
TOTAL_PARTS = (("fwd+quant", "fwd"), ("dgrad+quant", "dgrad"), ("wgrad",))


def _dg(ctx):
    if ctx.get("dg") is None:
        raise RuntimeError(f"deep_gemm not usable: {ctx.get('dg_error')}")
    return ctx["dg"]


def validate_cases(dense=DENSE_CASES, grouped=GROUPED_CASES) -> None:
    """Shapes must be positive, K a multiple of 128 (1x128 / 128x128 scale blocks) and N a
    multiple of 16 (FP8 GEMM alignment); labels unique."""
    labels = [d[0] for d in dense] + [g[0] for g in grouped]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate shape labels in {labels}")
    for label, *dims in dense + grouped:
        if not all(isinstance(v, int) and v > 0 for v in dims):
            raise ValueError(f"{label}: dimensions must be positive ints, got {dims}")
        K, N = dims[-2], dims[-1]
        if K % 128 or N % 16:
            raise ValueError(f"{label}: K={K} must be a multiple of 128 and N={N} of 16")


def selected(cases, pattern: str | None):
    if not pattern:
        return list(cases)
    keys = [p.strip() for p in pattern.split(",") if p.strip()]
    return [c for c in cases if any(k in c[0] for k in keys)]


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 1500 else text[:1497] + "..."


def measure(specs: dict, args) -> dict:
    """Check then time every part of one route; a failing part records its error."""
    import torch

    parts = {}
    for name, spec in specs.items():
        try:
            if spec.get("measure") is not None:
                spec["measure"]()
                r = spec["result"]
                res = {k: r[k] for k in ("ms", "min_ms", "max_ms", "err") if k in r}
            else:
                spec["run"]()
                torch.cuda.synchronize()
                res = {"err": spec["check"]()}
                if spec.get("check_dequant") is not None:
                    res["err_kernel"] = spec["check_dequant"]()
                    if not res["err_kernel"] <= RD.KERNEL_BOUND:
                        raise RuntimeError(f"wrong result: relative error {res['err_kernel']:.3g}"
                                           f" against the dequantized operands' product")
            if not res["err"] <= spec["bound"]:
                raise RuntimeError(f"wrong result: relative error {res['err']:.3g} > "
                                   f"{spec['bound']} against the float64 reference")
            if spec.get("measure") is None:
                res.update(time_cuda(spec["run"], args.warmup, args.iters))
            res["tflops"] = spec["flops"] / (res["ms"] * 1e-3) / 1e12
            if spec.get("note"):
                res["note"] = spec["note"]
            parts[name] = res
        except Exception as err:  # noqa: BLE001
            parts[name] = {"error": _error_text(err)}
            print(f"    {name}: {traceback.format_exc()}", flush=True)
    return parts


def add_totals(parts: dict, flops: float) -> None:
    """`total` = fwd(+quant) + dgrad(+quant) + wgrad where the route has no measured total."""
    if "total" in parts:
        return
    picked = []
    for options in TOTAL_PARTS:
        hit = next((o for o in options if "ms" in parts.get(o, {})), None)
        if hit is None:
            return
        picked.append(hit)
    ms = sum(parts[p]["ms"] for p in picked)
    parts["total"] = {"ms": ms, "tflops": 3 * flops / (ms * 1e-3) / 1e12,
                      "sum_of": " + ".join(picked)}


def add_ratios(row: dict) -> None:
    """vs_bf16 = BF16 time / route time for the same part (`x+quant` against BF16 `x`)."""
    base = row["routes"].get("bf16", {})
    for route in row["routes"].values():
        for part, res in route.items():
            ref = base.get(part.split("+")[0])
            if isinstance(res, dict) and isinstance(ref, dict) and "ms" in res and "ms" in ref:
                res["vs_bf16"] = ref["ms"] / res["ms"]


def run_case(kind: str, label: str, case, routes: dict, ctx: dict) -> dict:
    import torch

    row = {"shape": label, "kind": kind, "M": case.M, "K": case.K, "N": case.N, "routes": {}}
    if kind == "grouped":
        row["splits"] = case.splits
    for name, build in routes.items():
        try:
            specs = build(case, ctx)
            parts = measure(specs, ctx["args"])
        except Exception as err:  # noqa: BLE001
            parts = {"error": _error_text(err)}
            print(f"  [{label}] {name}: {traceback.format_exc()}", flush=True)
        add_totals(parts, case.flops)
        row["routes"][name] = parts
        print(f"  [{label}] {name}: {summary(parts)}", flush=True)
        specs = None  # noqa: F841 - frees this route's tensors before the next one
        torch.cuda.empty_cache()
    add_ratios(row)
    return row


def summary(parts: dict) -> str:
    if "error" in parts and len(parts) == 1:
        return f"ERROR {parts['error']}"
    out = []
    for part, r in parts.items():
        if "ms" in r:
            ratio = f" {r['vs_bf16']:.2f}x" if "vs_bf16" in r else ""
            out.append(f"{part} {r['ms']:.3f} ms {r['tflops']:.0f} TF{ratio}")
        else:
            out.append(f"{part} ERROR {r.get('error', '?')[:120]}")
    return " | ".join(out)


def make_cases(args):
    from benchmarks.fp8.gemm import make_splits

    for label, M, K, N in selected(DENSE_CASES, args.shapes):
        yield "dense", label, (lambda M=M, K=K, N=N, refs=True: RD.DenseCase(
            M, K, N, args.seed, refs))
    for label, G, T, K, N in selected(GROUPED_CASES, args.shapes):
        splits = make_splits(G, T, args.seed, multiple=16)
        yield "grouped", label, (lambda G=G, splits=splits, K=K, N=N, refs=True: RG.GroupedCase(
            G, splits, K, N, args.seed, refs))


def load_deepgemm(ctx: dict) -> dict:
    info = {"available": False}
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # deep_gemm derives CUDA_HOME from `which nvcc`, which can be a wrapper script
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import deep_gemm as dg

        ctx["dg"] = dg
        info.update(available=True, version=getattr(dg, "__version__", None),
                    path=os.path.dirname(dg.__file__))
    except Exception as err:  # noqa: BLE001
        ctx["dg"], ctx["dg_error"] = None, _error_text(err)
        info["error"] = ctx["dg_error"]
    return info


def jit_shard(args) -> int:
    """Worker: run this shard's DeepGEMM parts once, so nvcc compiles their kernels into the
    shared JIT cache ($DG_JIT_CACHE_DIR or ~/.deep_gemm)."""
    import torch

    shard, count = (int(v) for v in args.jit_shard.split("/"))
    ctx = {"args": args}
    load_deepgemm(ctx)
    units = [(kind, label, make, part) for kind, label, make in make_cases(args)
             for part in ("fwd", "dgrad", "wgrad")]
    for kind, label, make, part in units[shard::count]:
        start = time.perf_counter()
        try:
            routes = DENSE_ROUTES if kind == "dense" else GROUPED_ROUTES
            specs = routes["deepgemm"](make(refs=False), ctx)
            specs[part]["run"]()
            torch.cuda.synchronize()
            print(f"[jit {shard}] {label} {part}: {time.perf_counter() - start:.1f} s", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"[jit {shard}] {label} {part}: {_error_text(err)}", flush=True)
    return 0


def warm_jit(args, info: dict) -> None:
    """Compile DeepGEMM's kernels in --jit-workers processes at once (nvcc is single-threaded
    and the kernels are specialized per shape; one by one they would take minutes)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "benchmarks.fp8.gemm_routes", "--seed", str(args.seed)]
    if args.shapes:
        cmd += ["--shapes", args.shapes]
    if not args.te_quantizer:
        cmd += ["--no-te-quantizer"]
    procs = [subprocess.Popen(cmd + ["--jit-shard", f"{i}/{args.jit_workers}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(args.jit_workers)]
    deadline = start + args.jit_timeout_s
    lines = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            lines.append(f"worker {p.pid} killed after --jit-timeout-s {args.jit_timeout_s}")
        lines += (out or "").splitlines()
    info["jit_warmup_s"] = round(time.perf_counter() - start, 1)
    info["jit_log_tail"] = lines[-40:]
    print("\n".join(lines), flush=True)
    print(f"DeepGEMM JIT warm-up: {info['jit_warmup_s']} s with {args.jit_workers} workers",
          flush=True)


def write_json(results: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1, default=str))


def markdown_rows(results: dict) -> list[str]:
    """Rows for the table in docs/fp8.md: shape | route | fwd | fwd+quant | total, TFLOP/s and
    ratio to BF16."""
    rows = []
    for row in results.get("dense", []) + results.get("grouped", []):
        if "routes" not in row:
            rows.append(f"| {row['shape']} | - | {row.get('error', '?')} | | | | |")
        for route, parts in row.get("routes", {}).items():
            cells = []
            for part in ("fwd", "fwd+quant", "dgrad", "wgrad", "total"):
                r = parts.get(part, parts if "error" in parts else {})
                cells.append(f"{r['tflops']:.0f} ({r.get('vs_bf16', float('nan')):.2f}x)"
                             if "tflops" in r else ("error" if "error" in r else "-"))
            rows.append(f"| {row['shape']} | {route} | " + " | ".join(cells) + " |")
    return rows


def dry_run(args) -> dict:
    validate_cases()
    results = {"dry_run": True, "settings": vars(args).copy(), "dense": [], "grouped": []}
    for label, M, K, N in selected(DENSE_CASES, args.shapes):
        results["dense"].append({"shape": label, "kind": "dense", "M": M, "K": K, "N": N,
                                 "gflop_per_gemm": 2 * M * K * N / 1e9,
                                 "routes": {r: {} for r in DENSE_ROUTES}})
    for label, G, T, K, N in selected(GROUPED_CASES, args.shapes):
        results["grouped"].append({"shape": label, "kind": "grouped", "M": G * T, "K": K,
                                   "N": N, "experts": G, "gflop_per_gemm": 2 * G * T * K * N / 1e9,
                                   "routes": {r: {} for r in GROUPED_ROUTES}})
    for row in results["dense"] + results["grouped"]:
        print(f"{row['kind']:8s} {row['shape']:40s} M={row['M']:6d} K={row['K']:6d} "
              f"N={row['N']:6d} {row['gflop_per_gemm']:8.1f} GFLOP x3 | "
              f"{', '.join(row['routes'])}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON results file (written after every shape)")
    p.add_argument("--dry-run", action="store_true", help="check shapes, write JSON; no CUDA")
    p.add_argument("--shapes", help="comma list of substrings selecting shapes (default: all)")
    p.add_argument("--routes", help="comma list of route names to run (default: all)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="start no new shape after this many seconds")
    p.add_argument("--jit-workers", type=int, default=12,
                   help="parallel processes compiling DeepGEMM's kernels first (0: none)")
    p.add_argument("--jit-timeout-s", type=float, default=180.0)
    p.add_argument("--no-te-quantizer", dest="te_quantizer", action="store_false",
                   help="DeepGEMM +quant parts use the plain torch quantizer")
    p.add_argument("--jit-shard", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.jit_shard:
        return jit_shard(args)
    if args.dry_run:
        write_json(dry_run(args), args.out)
        return 0
    validate_cases()
    start = time.perf_counter()
    ctx = {"args": args}
    results = {"machine": machine_info(), "settings": vars(args).copy(),
               "deepgemm": load_deepgemm(ctx), "dense": [], "grouped": []}
    print(f"machine: {results['machine']}\ndeepgemm: {results['deepgemm']}", flush=True)
    if ctx["dg"] is not None and args.jit_workers > 0 and _wants(args, "deepgemm"):
        warm_jit(args, results["deepgemm"])
    for kind, label, make in make_cases(args):
        if time.perf_counter() - start > args.budget_s:
            results[kind].append({"shape": label, "error": f"skipped: --budget-s {args.budget_s}"})
            continue
        routes = DENSE_ROUTES if kind == "dense" else GROUPED_ROUTES
        routes = {k: v for k, v in routes.items() if _wants(args, k)}
        print(f"[{kind}] {label}", flush=True)
        try:
            results[kind].append(run_case(kind, label, make(), routes, ctx))
        except Exception as err:  # noqa: BLE001 - e.g. out of memory building the case
            results[kind].append({"shape": label, "error": _error_text(err)})
            print(traceback.format_exc(), flush=True)
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(results, args.out)
    print("\n".join(markdown_rows(results)), flush=True)
    write_json(results, args.out)
    return 0


def _wants(args, route: str) -> bool:
    return not args.routes or route in [r.strip() for r in args.routes.split(",")]


if __name__ == "__main__":
    sys.exit(main())
