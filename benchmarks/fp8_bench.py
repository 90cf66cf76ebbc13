#!/usr/bin/env python
"""FP8 vs BF16 on one Hopper GPU, side by side in one run (DeepSeek-V3 shapes).

    python benchmarks/fp8_bench.py             # everything; writes the fp8_bench section of
                                               # docs/benchmarks.md
    python benchmarks/fp8_bench.py --dry-run   # the plan, without CUDA
    python benchmarks/fp8_bench.py --parts gemm --no-write

Parts, each in its own worker process (a crash or a sticky CUDA error in one is reported in
the table and the others still run):

* gemm:     (a) dense `te.Linear` forward+backward TFLOP/s, BF16 vs FP8 delayed / current /
            blockwise (and blockwise with the FP8 weight cached, as from the second micro-batch
            on), at hidden 7168, dense/shared FFN 18432, MLA projections, 4096-token
            micro-batches; (b) grouped expert GEMM (`te.GroupedLinear`, 8 local experts x ~4096
            tokens, uneven splits) for BF16 and each recipe, plus TE's CUTLASS grouped GEMM
            (NVTE_USE_CUTLASS_GROUPED_GEMM, Hopper BF16), TE's single-launch grouped GEMM
            (`use_grouped_tensor=True` / NVTE_GROUPED_LINEAR_USE_FUSED_GROUPED_GEMM) and
            `torch._grouped_mm`.
* deepgemm: DeepGEMM's FP8 grouped GEMMs (fprop, dgrad, wgrad kernels on pre-quantized
            operands), if `import deep_gemm` works (pip: sgl-deep-gemm); skipped otherwise.
* proxy:    (c) the whole proxy model (recipes/fp8_proxy_1gpu.yaml with DeepSeek-V3-sized
            layers, see DEFAULT_PROXY_SET) through `megatron_dualpipe.train`: step time and
            tokens/s, BF16 vs blockwise FP8 (one worker per variant).

Timing: warm-up first, then CUDA events around each iteration and the median (GEMMs); the
proxy times whole optimizer steps (synchronized) and takes the median. Every GEMM path is also
checked against an FP32 reference (relative error column).

The code lives in benchmarks/fp8/ (common, gemm, deepgemm, proxy, report); this script is
the entry point. The single-process training harness (also used by the GPU tests) is
megatron_dualpipe/in_process.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fp8.common import (  # noqa: E402
    DENSE_SHAPES,
    FP8_RECIPES,
    GROUPED_SHAPES,
    RESULT_TAG,
    _short,
)
from benchmarks.fp8.deepgemm import worker_deepgemm  # noqa: E402
from benchmarks.fp8.gemm import GROUPED_VARIANTS, make_splits, worker_gemm  # noqa: E402
from benchmarks.fp8.proxy import (  # noqa: E402
    DEFAULT_PROXY_SET,
    PROXY_MODIFIERS,
    PROXY_PRECISIONS,
    PROXY_RECIPE,
    proxy_overrides,
    variant_overrides,
    worker_proxy,
)
from benchmarks.fp8.report import (  # noqa: E402
    MARK_START,
    driver_version,
    render,
    write_section,
)
from benchmarks.portable import command_line  # noqa: E402


def _worker_cmd(args, part: str, variant: str | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part,
           "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--experts", str(args.experts), "--tokens-per-expert", str(args.tokens_per_expert),
           "--seed", str(args.seed), "--deepgemm-budget-s", str(args.deepgemm_budget_s),
           "--proxy-recipe", args.proxy_recipe, "--proxy-steps", str(args.proxy_steps),
           "--proxy-warmup", str(args.proxy_warmup)]
    if not args.proxy_default_set:
        cmd.append("--no-proxy-default-set")
    for item in args.proxy_set:
        cmd += ["--proxy-set", item]
    if variant:
        cmd += ["--variant", variant]
    return cmd


def run_worker(args, part: str, variant: str | None = None) -> dict:
    """Run one worker process, echo its output, return its result (or {"error": ...})."""
    cmd = _worker_cmd(args, part, variant)
    tag = part + (f":{variant}" if variant else "")
    print(f"\n=== worker {tag}: {shlex.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    tail: list[str] = []
    result = None
    timed_out = threading.Event()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)
        watchdog = threading.Timer(args.worker_timeout_s,
                                   lambda: (timed_out.set(), proc.kill()))
        watchdog.start()
        try:
            for line in proc.stdout:
                if line.startswith(RESULT_TAG):
                    result = json.loads(line[len(RESULT_TAG):])
                    continue
                sys.stdout.write(f"  [{tag}] {line}")
                tail = (tail + [line.rstrip()])[-15:]
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
    except Exception as err:  # noqa: BLE001
        return {"error": _short(err), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    print(f"=== worker {tag}: exit {proc.returncode} after {seconds:.0f} s", flush=True)
    if timed_out.is_set():
        return {"error": f"worker killed after --worker-timeout-s {args.worker_timeout_s}",
                "seconds": seconds}
    if result is None:
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        return {"error": f"worker exited {proc.returncode}: {last[-200:]}", "seconds": seconds}
    result["seconds"] = seconds
    return result


def merge_results(runs: list[dict]) -> dict:
    """One results dict from several runs' --json files, in order: a later run's gemm /
    deepgemm part replaces an earlier one, proxy variants are merged (later wins); each part
    keeps the command that produced it."""
    merged: dict = {"commands": {}, "merged": True}
    for run in runs:
        commands = run.get("commands") or {}
        for part in ("gemm", "deepgemm"):
            if part in run:
                merged[part] = run[part]
                merged["commands"][part] = commands.get(part, "(command not recorded)")
        if run.get("proxy"):
            merged.setdefault("proxy", {}).update(run["proxy"])
            key = "proxy"
            while key in merged["commands"]:  # one entry per run (the command names its variants)
                key += "'"
            merged["commands"][key] = commands.get("proxy", "(command not recorded)")
            if run.get("proxy_set") is not None:
                merged["proxy_set"] = run["proxy_set"]
        if run.get("driver"):
            merged["driver"] = run["driver"]
    return merged


def dry_run(args) -> int:
    from megatron_dualpipe.config import load_recipe

    print("fp8_bench plan (no CUDA used)\n")
    print(f"parts: {', '.join(args.parts)}; warm-up {args.warmup}, timed {args.iters} calls")
    print("\n(a) dense te.Linear fwd+bwd, recipes: bf16, " + ", ".join(FP8_RECIPES)
          + ", blockwise cachedW")
    for label, M, K, N in DENSE_SHAPES:
        print(f"  {label:<36} M={M} K={K} N={N}  {6 * M * K * N / 1e12:.2f} TFLOP per call")
    splits = make_splits(args.experts, args.tokens_per_expert, args.seed)
    print(f"\n(b) grouped te.GroupedLinear, {args.experts} experts, splits {splits}")
    for label, K, N in GROUPED_SHAPES:
        print(f"  {label:<36} M={sum(splits)} K={K} N={N}  "
              f"{6 * sum(splits) * K * N / 1e12:.2f} TFLOP per call")
    for v in GROUPED_VARIANTS:
        print(f"    - {v['name']}")
    print("    - DeepGEMM FP8 (if `import deep_gemm` works; pip: sgl-deep-gemm), "
          f"budget {args.deepgemm_budget_s} s incl. JIT")
    recipe_path = ROOT / args.proxy_recipe
    print(f"\n(c) proxy {args.proxy_recipe}, variants {', '.join(args.proxy_variants)}, "
          f"{args.proxy_warmup} warm-up + {args.proxy_steps} timed steps")
    for variant in args.proxy_variants:
        overrides = proxy_overrides(args, variant)
        try:
            r = load_recipe(recipe_path, overrides)
            m, moe = r.model, r.moe
            print(f"  {variant:<16} hidden {m.hidden_size}, {m.num_layers} layers "
                  f"({m.num_dense_layers} dense, FFN {m.ffn_hidden_size}), {moe.num_experts} "
                  f"experts top-{moe.topk} FFN {moe.ffn_hidden_size}, seq {m.seq_length}, "
                  f"{r.train.global_batch_size}x{r.train.micro_batch_size}.. tokens/step "
                  f"{r.train.global_batch_size * m.seq_length}, fp8.recipe={r.fp8.recipe}")
        except Exception as err:  # noqa: BLE001
            print(f"  {variant:<16} recipe error: {err}")
    print("\nworkers:")
    for part in args.parts:
        if part == "proxy":
            for v in args.proxy_variants:
                print("  " + shlex.join(_worker_cmd(args, part, v)))
        else:
            print("  " + shlex.join(_worker_cmd(args, part)))
    print(f"\nwould write the {MARK_START} section of {args.out}"
          if not args.no_write else "\n--no-write: docs untouched")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan; no CUDA needed")
    p.add_argument("--parts", default="gemm,deepgemm,proxy",
                   help="comma list of gemm, deepgemm, proxy (default: all)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per GEMM case")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls per GEMM case")
    p.add_argument("--experts", type=int, default=8, help="local experts (grouped GEMM)")
    p.add_argument("--tokens-per-expert", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deepgemm-budget-s", type=float, default=240.0,
                   help="stop starting DeepGEMM cases after this long (its JIT is slow)")
    p.add_argument("--proxy-recipe", default=PROXY_RECIPE)
    p.add_argument("--proxy-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for the proxy (repeatable)")
    p.add_argument("--no-proxy-default-set", dest="proxy_default_set", action="store_false",
                   help="do not apply DEFAULT_PROXY_SET (DeepSeek-V3-sized layers)")
    p.add_argument("--proxy-variants", default="bf16,blockwise,blockwise+bf16mla",
                   help="comma list of PRECISION[+MODIFIER...]; precisions: "
                   f"{', '.join(PROXY_PRECISIONS)}; modifiers: {', '.join(PROXY_MODIFIERS)}")
    p.add_argument("--proxy-steps", type=int, default=15, help="timed proxy steps")
    p.add_argument("--proxy-warmup", type=int, default=5, help="untimed proxy steps")
    p.add_argument("--worker-timeout-s", type=float, default=900.0)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    p.add_argument("--json", default=None, help="also write all raw results to this file")
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="run nothing: render the section from --json files of earlier runs "
                   "(later files replace a part, proxy variants are merged)")
    p.add_argument("--worker", choices=["gemm", "deepgemm", "proxy"], help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.proxy_variants = [x.strip() for x in args.proxy_variants.split(",") if x.strip()]
    for part in args.parts:
        if part not in ("gemm", "deepgemm", "proxy"):
            p.error(f"--parts: unknown part {part!r}")
    for v in args.proxy_variants:
        try:
            variant_overrides(v)
        except ValueError as err:
            p.error(f"--proxy-variants: {err}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        fn = {"gemm": worker_gemm, "deepgemm": worker_deepgemm, "proxy": worker_proxy}[args.worker]
        try:
            result = fn(args)
        except Exception as err:  # noqa: BLE001 - fail soft: report it in the table
            traceback.print_exc()
            sys.stderr.flush()
            result = {"error": _short(err)}
        print(RESULT_TAG + json.dumps(result, default=str), flush=True)
        return 0
    if args.dry_run:
        return dry_run(args)
    command = command_line("benchmarks/fp8_bench.py", sys.argv[1:] if argv is None else [])
    if args.from_json:
        results = merge_results([json.loads(Path(f).read_text()) for f in args.from_json])
        section = render(results, args, command)
        print(section)
        if not args.no_write:
            write_section(Path(args.out), section)
            print(f"wrote the fp8_bench section of {args.out}")
        return 0
    start = time.perf_counter()
    results: dict = {"driver": driver_version(), "commands": {}}
    for part in ("gemm", "deepgemm", "proxy"):
        if part in args.parts:
            results["commands"][part] = command
    if "gemm" in args.parts:
        results["gemm"] = run_worker(args, "gemm")
    if "deepgemm" in args.parts:
        results["deepgemm"] = run_worker(args, "deepgemm")
    if "proxy" in args.parts:
        results["proxy"] = {v: run_worker(args, "proxy", v) for v in args.proxy_variants}
        results["proxy_set"] = ((DEFAULT_PROXY_SET if args.proxy_default_set else [])
                                + args.proxy_set)
    section = render(results, args, command)
    print("\n" + section)
    parts = {k: v.get("seconds", 0) for k, v in results.items() if isinstance(v, dict)
             and "seconds" in v}
    parts.update({f"proxy:{k}": v.get("seconds", 0) for k, v in results.get("proxy", {}).items()})
    print(f"fp8_bench: {time.perf_counter() - start:.0f} s in all ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in parts.items()) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if not args.no_write:
        write_section(Path(args.out), section)
        print(f"wrote the fp8_bench section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
