#!/usr/bin/env python
"""Overlapped F&B chunks on 2 GPUs: Megatron-Core 1F1B vs combined 1F1B vs our DualPipeV.

    python benchmarks/overlap_bench.py              # all variants; writes the overlap_bench
                                                    # section of docs/benchmarks.md
    python benchmarks/overlap_bench.py --dry-run    # the plan (variants, recipes), no CUDA
    python benchmarks/overlap_bench.py --variants a,d --no-write

The same proxy MoE (recipes/deepseek_v3_proxy_2gpu.yaml sized down by PROXY_SET: BF16, MLA,
1 dense + 7 MoE layers, 128 experts top-8, MTP, 4K tokens per micro-batch, 16 micro-batches per
step) in every variant. Layouts (``--gpus``):

==========================  =================================  ================================
variant                     --gpus 2                           --gpus 4
==========================  =================================  ================================
(a) ``mcore-1f1b``          Megatron 1F1B, PP=1 EP=2           Megatron interleaved 1F1B,
                            (``forward_backward_no_pipelining``) PP=2 VPP=2 EP=2
(b) ``mcore-combined``      (a) + overlap_moe_expert_parallel_comm (combined 1F1B: forward of
                            one micro-batch fused with the backward of another, all-to-alls
                            on a communication stream)
(c) ``dualpipev``           DualPipeV PP=1 EP=2, F&B           DualPipeV PP=2 EP=2, F&B
                            sequential                         sequential
(d) ``dualpipev-overlap``   (c) with F&B chunks fused (schedules/overlap.py, ``overlap_fb``)
==========================  =================================  ================================

On 2 GPUs every variant is PP=1 x EP=2 (DP=2): DualPipeV with one pipeline rank holds both
stages of the V on each GPU, so its steady state still pairs the forward of one chunk with the
backward of the other, and each fused F&B chunk has the expert all-to-alls of both halves to
hide. With 4 GPUs: the same 4-stage split as (a)/(b) (two chunks per rank, V-shaped vs
interleaved). Megatron allows (b) with PP=1 or with VPP, EP > 1,
alltoall/flex dispatcher, BF16, no MoE recompute, ``moe_shared_expert_overlap`` off, MTP <= 1
layer: all true here; ``delay_wgrad_compute`` stays off (as in (d)). The flag is set on the
built model's TransformerConfig (our recipes have no field for it).

Each variant is one torchrun job of 2 processes (a crash is reported in its row, the others
still run): warm-up steps, timed steps (synchronized; median of the slower rank), then one
profiled step whose per-rank Chrome traces give the all-to-all time and the part of it
overlapped by compute kernels (`megatron_dualpipe.trace_analysis`), over the whole step and,
for (d), inside the fused F&B chunks only. Peak memory is `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.docs_section import write_section  # noqa: E402

MARK_START, MARK_END = "<!-- overlap_bench:start -->", "<!-- overlap_bench:end -->"
RECIPE = "recipes/deepseek_v3_proxy_2gpu.yaml"
PROXY_SET = [
    "model.num_layers=8", "model.num_dense_layers=1", "model.recompute_modules=[]",
    "fp8.recipe=none", "moe.num_experts=128", "moe.topk=8",
    "train.micro_batch_size=1", "train.global_batch_size=16",
]
LAYOUTS = {  # --gpus -> variant -> recipe overrides
    2: {"a": ["parallel.schedule=1f1b", "parallel.pp=1", "parallel.ep=2"],
        "b": ["parallel.schedule=1f1b", "parallel.pp=1", "parallel.ep=2"],
        "c": ["parallel.schedule=dualpipev", "parallel.pp=1", "parallel.ep=2"],
        "d": ["parallel.schedule=dualpipev", "parallel.pp=1", "parallel.ep=2"]},
    4: {"a": ["parallel.schedule=interleaved", "parallel.pp=2", "parallel.vpp=2",
              "parallel.ep=2"],
        "b": ["parallel.schedule=interleaved", "parallel.pp=2", "parallel.vpp=2",
              "parallel.ep=2"],
        "c": ["parallel.schedule=dualpipev", "parallel.pp=2", "parallel.ep=2"],
        "d": ["parallel.schedule=dualpipev", "parallel.pp=2", "parallel.ep=2"]},
}
VARIANTS = {  # key -> (name, description, overrides on top of the layout, TransformerConfig)
    "a": ("mcore-1f1b", "Megatron-Core 1F1B", [], {}),
    "b": ("mcore-combined", "Megatron-Core combined 1F1B (overlap_moe_expert_parallel_comm)",
          [], {"overlap_moe_expert_parallel_comm": True}),
    "c": ("dualpipev", "DualPipeV, F&B sequential", ["parallel.overlap_fb=false"], {}),
    "d": ("dualpipev-overlap", "DualPipeV, F&B fused", ["parallel.overlap_fb=true"], {}),
}
CPU_RECIPE = "recipes/tiny_moe_cpu.yaml"
CPU_SET = ["model.num_layers=4", "train.global_batch_size=8", "train.micro_batch_size=2"]
TARGET_OVERLAP = 0.80


# =============================================================================================
# Recipe
# =============================================================================================


def load(args, overrides: list[str]):
    from megatron_dualpipe.config import load_recipe

    return load_recipe(ROOT / (CPU_RECIPE if args.cpu_smoke else RECIPE), overrides)


def variant_overrides(args, key: str) -> list[str]:
    proxy = CPU_SET if args.cpu_smoke else PROXY_SET
    return [*proxy, *LAYOUTS[args.gpus][key], f"parallel.nproc_per_node={args.gpus}",
            *VARIANTS[key][2], *args.set]


# =============================================================================================
# Worker (one torchrun job per variant)
# =============================================================================================


def _forward_backward_func(overlap_fb: bool, schedule: str, *, zero_bubble: bool = True,
                           overlap: bool = False):
    from megatron_dualpipe.schedules.registry import forward_backward_func

    return forward_backward_func(schedule, zero_bubble=zero_bubble, overlap=overlap_fb)


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from megatron_dualpipe import train as T
    from megatron_dualpipe.data import make_source
    from megatron_dualpipe.distributed import destroy_distributed
    from megatron_dualpipe.profiling import StepProfiler
    from megatron_dualpipe.schedules.overlap import cpu_record_stream_noop

    key = args.worker
    trace_dir = Path(args.trace_dir)
    recipe = load(args, [*variant_overrides(args, key), f"train.log_dir={trace_dir}"])
    state = T.setup(recipe)
    # train_step enables overlap_fb on CUDA only; here the recipe decides (also --cpu-smoke).
    T.forward_backward_func = partial(_forward_backward_func, recipe.parallel.overlap_fb)
    for name, value in VARIANTS[key][3].items():
        setattr(state.config, name, value)
    rank = dist.get_rank()
    source = make_source(recipe, T._dp_rank(), state.device)
    cache = {mb: source.batch(0, mb) for mb in range(source.num_microbatches)}
    source.batch = lambda step, mb: cache[mb]
    profiler = StepProfiler(f"{args.warmup + args.steps}:{args.warmup + args.steps + 1}",
                            trace_dir, rank, state.device, verbose=False)
    # Megatron's plan nodes call Tensor.record_stream, which CPU tensors lack (--cpu-smoke).
    on_cpu = state.device.type == "cpu"
    times, losses = [], []
    for step in range(args.warmup + args.steps + (1 if args.profile else 0)):
        with profiler.step(step), (cpu_record_stream_noop() if on_cpu else nullcontext()):
            record = T.train_step(state, source, step)
        if args.warmup <= step < args.warmup + args.steps:
            times.append(record["step_time_s"])
        losses.append(record["loss"])
    profiler.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if state.device.type == "cuda" else 0.0
    local = torch.tensor([*times, peak], dtype=torch.float64, device=state.device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    if rank == 0:
        rows = torch.stack(gathered).cpu()
        step_times = rows[:, :-1].max(dim=0).values.tolist()  # the slower rank
        median = statistics.median(step_times)
        tokens = recipe.train.global_batch_size * recipe.model.seq_length
        p = recipe.parallel
        layout = f"{p.schedule} PP={p.pp}" + (f" VPP={p.vpp}" if p.vpp else "") + f" EP={p.ep}"
        result = {
            "variant": key, "layout": layout, "step_times_s": step_times, "median_step_s": median,
            "tokens_per_s_per_gpu": tokens / median / dist.get_world_size(),
            "peak_memory_gb": float(rows[:, -1].max()), "losses": losses,
            "num_microbatches": source.num_microbatches,
            "config_overlap_moe_expert_parallel_comm": bool(
                getattr(state.config, "overlap_moe_expert_parallel_comm", False)),
        }
        Path(args.result).write_text(json.dumps(result))
    destroy_distributed()
    return 0


# =============================================================================================
# Driver
# =============================================================================================


def _worker_cmd(args, key: str, result: Path, trace_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.gpus}", str(Path(__file__).resolve()), "--worker", key,
           "--result", str(result), "--trace-dir", str(trace_dir),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--gpus", str(args.gpus)]
    if not args.profile:
        cmd.append("--no-profile")
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    for item in args.set:
        cmd += ["--set", item]
    return cmd


def run_variant(args, key: str, workdir: Path) -> dict:
    result = workdir / f"{key}.json"
    trace_dir = workdir / f"traces_{key}"
    cmd = _worker_cmd(args, key, result, trace_dir)
    start = time.time()
    env = dict(os.environ, PYTHONWARNINGS="ignore", NCCL_NVLS_ENABLE="0")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s,
                              env=env, cwd=ROOT, check=False)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        log, rc = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {args.timeout_s} s", -1
    (workdir / f"{key}.log").write_text(log if isinstance(log, str) else log.decode())
    out = {"variant": key, "wall_s": round(time.time() - start, 1), "rc": rc}
    if rc == 0 and result.exists():
        out.update(json.loads(result.read_text()))
        if args.profile:
            out["trace"] = analyze_traces(trace_dir, key)
    else:
        out["error"] = error_summary(str(log), rc)
    return out


def error_summary(log: str, rc: int) -> str:
    """The root exception of a worker log (not torchrun's summary, not a peer's hang-up)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    if "timed out after" in log:
        return lines[-1]
    errors = [line for line in lines
              if re.match(r"^(\[rank\d+\]:\s*)?[\w.]+(Error|Exception)\b:", line)
              and "ChildFailedError" not in line]
    root = [line for line in errors if "closed by peer" not in line] or errors
    return (root[0] if root else " | ".join(lines[-3:]) or f"exit {rc}")[-300:]


def analyze_traces(trace_dir: Path, key: str) -> dict:
    """All-to-all time and overlapped fraction of the profiled step, summed over ranks."""
    from megatron_dualpipe.schedules.overlap import FB_ANNOTATION
    from megatron_dualpipe.trace_analysis import analyze

    total = {"a2a_ms": 0.0, "a2a_overlapped_ms": 0.0, "fb_a2a_ms": 0.0,
             "fb_a2a_overlapped_ms": 0.0, "ranks": 0}
    for path in sorted((trace_dir / "traces").glob("rank*.json")):  # StepProfiler's layout
        report = analyze(path, window=FB_ANNOTATION if key == "d" else None)
        a2a = report["comm"]["alltoall"]
        total["a2a_ms"] += a2a["time_us"] / 1e3
        total["a2a_overlapped_ms"] += a2a["overlapped_us"] / 1e3
        if "window" in report:
            w = report["window"]["alltoall"]
            total["fb_a2a_ms"] += w["time_us"] / 1e3
            total["fb_a2a_overlapped_ms"] += w["overlapped_us"] / 1e3
        total["ranks"] += 1
    for prefix in ("a2a", "fb_a2a"):
        t = total[f"{prefix}_ms"]
        total[f"{prefix}_fraction"] = total[f"{prefix}_overlapped_ms"] / t if t else None
    return total


# =============================================================================================
# Report
# =============================================================================================


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def render(results: dict, machine: dict, command: str, args) -> str:
    title = ("## Overlapped F&B chunks: Megatron-Core 1F1B / combined 1F1B vs DualPipeV "
             "(`benchmarks/overlap_bench.py`)")
    where = (f"Machine: {machine.get('gpu', '?')} x {args.gpus}, torch {machine.get('torch')}, "
             f"CUDA {machine.get('cuda')}, megatron-core {machine.get('megatron_core')}, "
             f"Transformer Engine {machine.get('transformer_engine')}. Command: `{command}`.")
    extra = f" `{' '.join(args.set)}`" if args.set else ""
    proxy = (f"Proxy: `{RECIPE}` with `{' '.join(PROXY_SET)}`{extra}; {args.warmup} warm-up + "
             f"{args.steps} timed steps (median of the slower rank), then 1 profiled step "
             "(all-to-all columns: per rank, from its Chrome trace).")
    header = ("| variant | schedule | step time (s) | tokens/s/GPU | peak memory (GB) | "
              "all-to-all per step (ms) | overlapped (whole step) | overlapped (fused F&B) |")
    lines = [title, "", where, "", proxy, "", header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        name, desc = VARIANTS[key][0], VARIANTS[key][1]
        if "error" in r:
            lines.append(f"| ({key}) {name} | {desc} | failed: {r['error'].replace('|', '/')} "
                         "| | | | | |")
            continue
        t = r.get("trace") or {}
        ranks = t.get("ranks") or 1
        a2a = f"{t['a2a_ms'] / ranks:.1f}" if t else "-"
        lines.append(
            f"| ({key}) {name} | {desc}: {r.get('layout', '?')} | {r['median_step_s']:.3f} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['peak_memory_gb']:.1f} | {a2a} | "
            f"{_pct(t.get('a2a_fraction'))} | "
            f"{_pct(t.get('fb_a2a_fraction')) if key == 'd' else '-'} |")
    lines += ["", *targets(results), ""]
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[str]:
    out = []
    d = results.get("d", {})
    frac = (d.get("trace") or {}).get("fb_a2a_fraction")
    if frac is not None:
        met = "met" if frac >= TARGET_OVERLAP else "NOT met"
        out.append(f"- all-to-all overlapped inside fused F&B chunks >= "
                   f"{100 * TARGET_OVERLAP:.0f}%: {_pct(frac)} ({met})")
    for other in ("a", "c"):
        o = results.get(other, {})
        if "median_step_s" in d and "median_step_s" in o:
            speed = o["median_step_s"] / d["median_step_s"]
            met = "met" if speed > 1 else "NOT met"
            out.append(f"- (d) faster than ({other}): {speed:.2f}x ({met})")
    return out


def machine_info() -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for dist_name, key in (("megatron-core", "megatron_core"),
                           ("transformer-engine", "transformer_engine")):
        try:
            info[key] = md.version(dist_name)
        except md.PackageNotFoundError:
            info[key] = None
    return info


def dry_run(args) -> int:
    print(f"overlap_bench plan: {args.gpus} processes per variant (torchrun), recipe {RECIPE}")
    for key in args.variants:
        name, desc, _, config = VARIANTS[key]
        recipe = load(args, variant_overrides(args, key))
        p = recipe.parallel
        print(f"  ({key}) {name}: {desc}")
        print(f"      overrides: {' '.join(variant_overrides(args, key))}")
        print(f"      schedule={p.schedule} pp={p.pp} ep={p.ep} overlap_fb={p.overlap_fb} "
              f"layers={recipe.model.num_layers} experts={recipe.moe.num_experts} "
              f"seq={recipe.model.seq_length} global_batch={recipe.train.global_batch_size}"
              + (f" config: {config}" if config else ""))
        print("      " + shlex.join(_worker_cmd(args, key, Path("RESULT.json"),
                                                 Path("TRACES"))))
    print(f"  steps: {args.warmup} warm-up + {args.steps} timed"
          + (" + 1 profiled" if args.profile else ""))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--gpus", type=int, choices=sorted(LAYOUTS), default=2,
                   help="GPUs (processes) per variant; layouts in the module docstring")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the profiled step (no all-to-all overlap columns)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every variant (repeatable)")
    p.add_argument("--timeout-s", type=int, default=150, help="per variant")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--workdir", default=None, help="keep logs and traces here")
    p.add_argument("--no-write", dest="write", action="store_false",
                   help="do not update docs/benchmarks.md")
    p.add_argument("--dry-run", action="store_true", help="print the plan (no CUDA needed)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the harness on CPU (gloo) with the tiny recipe: checks the "
                   "plumbing, numbers meaningless (implies --no-write)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--trace-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.write = False
        args.gpus = 2
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.dry_run:
        return dry_run(args)
    import torch

    if not args.cpu_smoke and (not torch.cuda.is_available()
                               or torch.cuda.device_count() < args.gpus):
        print(f"overlap_bench --gpus {args.gpus} needs {args.gpus} CUDA GPUs "
              "(use --dry-run for the plan)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="overlap_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for key in args.variants:
        print(f"[overlap_bench] ({key}) {VARIANTS[key][0]} ...", flush=True)
        results[key] = run_variant(args, key, workdir)
        r = results[key]
        if "error" in r:
            print(f"  failed after {r['wall_s']} s: {r['error']} (log: {workdir}/{key}.log)",
                  flush=True)
        else:
            t = r.get("trace") or {}
            print(f"  {r['median_step_s']:.3f} s/step, {r['tokens_per_s_per_gpu']:,.0f} "
                  f"tok/s/GPU, peak {r['peak_memory_gb']:.1f} GB, all-to-all overlapped "
                  f"{_pct(t.get('a2a_fraction'))} (fused F&B {_pct(t.get('fb_a2a_fraction'))})"
                  f"; {r['wall_s']} s", flush=True)
    command = "python benchmarks/overlap_bench.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    section = render(results, machine_info(), command.strip(), args)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "machine": machine_info()},
                                              indent=1))
    if args.write:
        write_section(ROOT / "docs" / "benchmarks.md", section, MARK_START, MARK_END)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
