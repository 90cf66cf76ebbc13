"""`python -m benchmarks.speed`: plain Megatron-Core vs our 1F1B vs our DualPipeV (PP=1), BF16
and FP8, interleaved in one process on one GPU. See benchmarks/speed/__init__.py."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback
from pathlib import Path

from benchmarks.portable import command_line

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "deepseek_v3_rank_1gpu.yaml"
SYSTEMS = ("mcore_1f1b", "ours_1f1b", "ours_dualpipev")
TINY_SET = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
            "model.vocab_size=256", "model.seq_length=64", "model.spec=local",
            "model.dtype=fp32", "model.attention=mha", "model.rope_fusion=false",
            "model.cross_entropy_fusion=false",
            "moe.ffn_hidden_size=32", "moe.shared_expert_ffn_hidden_size=32",
            "moe.grouped_gemm=false", "moe.permute_fusion=false", "fp8.recipe=none",
            "model.mla.q_lora_rank=32", "model.mla.kv_lora_rank=16",
            "model.mla.qk_head_dim=16", "model.mla.qk_pos_emb_head_dim=8",
            "model.mla.v_head_dim=16", "train.device=cpu", "train.global_batch_size=4"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__)
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="recipe override for every system (repeatable)")
    p.add_argument("--layers", type=int, default=2,
                   help="decoder layers per model (all systems live in one GPU's memory)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated, from {', '.join(SYSTEMS)}")
    p.add_argument("--precisions", default="bf16,fp8",
                   help="bf16, fp8 (the recipe's fp8.recipe, e.g. blockwise, and its "
                   "fp8.bf16_modules) and fp8:GROUP[+GROUP] (these TE GEMMs stay BF16; "
                   "GROUP: none, mla, shared)")
    p.add_argument("--warmup-steps", type=int, default=5,
                   help="consecutive steps per variant first (their times show the warm-up)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds after warm-up")
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--profile", action="store_true",
                   help="after timing, one profiled step per variant: GPU kernel ms by category")
    p.add_argument("--trace-dir", default=None,
                   help="with --profile: keep each profiled step's Chrome trace here (gzip)")
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument("--write-docs", action="store_true",
                   help="write the table into docs/benchmarks.md (section speed)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU check: a tiny model on gloo, BF16 only")
    return p.parse_args(argv)


def load(args, schedule: str, extra=()):
    from megatron_dualpipe.config import load_recipe

    overrides = [f"model.num_layers={args.layers}", *(TINY_SET if args.tiny else []),
                 *args.overrides, f"parallel.schedule={schedule}", "parallel.pp=1",
                 "parallel.ep=1", "parallel.nproc_per_node=1", "parallel.num_nodes=1", *extra]
    return load_recipe(args.recipe, overrides)


def build(args, name: str, device):
    """`mcore_1f1b`, or `ours_<schedule>[+modifier...]` with modifiers from MODIFIERS."""
    from benchmarks.speed.systems import MegatronCore, Ours
    from benchmarks.speed.variants import MCORE_MODIFIERS, MODIFIERS

    base, *modifiers = name.split("+")
    schedule = base.removeprefix("ours_")
    allowed = MCORE_MODIFIERS if base == "mcore_1f1b" else MODIFIERS
    if (base != "mcore_1f1b" and schedule not in ("1f1b", "dualpipev")) or any(
            m not in allowed for m in modifiers):
        raise SystemExit(f"--systems: unknown system {name!r}; allowed: mcore_1f1b[+"
                         f"{'|+'.join(MCORE_MODIFIERS)}], ours_1f1b or ours_dualpipev with "
                         f"+{', +'.join(MODIFIERS)}")
    recipe = load(args, "1f1b" if base == "mcore_1f1b" else schedule,
                  [o for m in modifiers for o in MODIFIERS[m]])
    if "padcap" in modifiers and recipe.moe.topk != recipe.moe.num_experts:
        raise SystemExit(f"--systems {name}: +padcap would drop tokens (moe.topk "
                         f"{recipe.moe.topk} != moe.num_experts {recipe.moe.num_experts})")
    system = (MegatronCore if base == "mcore_1f1b" else Ours)(recipe, device)
    system.name = name
    return system


def check_graphed(names: list[str], precisions: list[str]) -> None:
    """`+graphs` (model.cuda_graphs=local): Megatron-Core's CUDA graphs are process-global (one
    capturing model per process) and replay the kernels of their capture (no BF16/FP8 switch),
    so a run holds at most one such system and one precision."""
    graphed = [n for n in names if "graphs" in n.split("+")[1:]]
    if len(graphed) > 1 or (graphed and len(precisions) > 1):
        raise SystemExit(f"--systems {','.join(graphed)}: a +graphs system runs alone of its "
                         f"kind and with one precision (got --precisions {','.join(precisions)})"
                         "; Megatron-Core's CUDA graphs are one set per process")


def init_process_groups(device) -> None:
    """A world of one process with Megatron-Core's own calls; every system uses these groups.
    On CPU (--tiny) Megatron-Core needs the project's CPU patches (megatron_dualpipe/patches)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if device.type == "cuda":
        torch.cuda.set_device(0)
    else:
        from megatron_dualpipe.patches import apply_cpu_patches

        apply_cpu_patches()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def memory_gb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0


def run(args) -> dict:

    from benchmarks.fp8.common import _short
    from benchmarks.speed.flops import H200_BF16_DENSE_TFLOPS, training_flops_per_token
    from benchmarks.speed.systems import CachedBatches
    from benchmarks.speed.variants import precision_setting, runs_precision
    from megatron_dualpipe.distributed import resolve_device
    from megatron_dualpipe.in_process import single_process_env

    single_process_env()
    names = [s for s in args.systems.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    check_graphed(names, precisions)
    base = load(args, "1f1b")
    device = resolve_device(base)
    if device.type == "cpu":
        precisions = [p for p in precisions if p == "bf16"]
    if not precisions:
        raise SystemExit("--precisions: nothing to run (the CPU runs bf16 only)")
    init_process_groups(device)
    fp8_format = base.fp8.format if base.fp8.recipe != "none" else None
    if any(p.startswith("fp8") for p in precisions) and fp8_format is None:
        raise SystemExit("--precisions fp8 needs a recipe with fp8.recipe set")
    settings = {p: precision_setting(p, fp8_format) for p in precisions}
    systems, built_gb, errors = {}, {}, {}
    for name in names:  # build all first: the models live side by side
        try:
            systems[name] = build(args, name, device)
        except Exception as err:  # a failing system is reported; the others still run
            errors[name] = _short(err)
            print(f"[speed] {name} failed to build: {errors[name]}", flush=True)
            continue
        built_gb[name] = memory_gb(device)
        print(f"[speed] built {name}: peak {built_gb[name]:.1f} GB", flush=True)
    batches = CachedBatches.from_recipe(base, device)
    variants = [(n, p) for p in precisions for n in systems if runs_precision(n, p)]
    times = {f"{n}/{p}": [] for n, p in variants}
    warmup = {f"{n}/{p}": [] for n, p in variants}
    losses = {f"{n}/{p}": [] for n, p in variants}
    step = 0

    def go(name, precision, count, into):
        nonlocal step
        system = systems[name]
        system.set_precision(*settings[precision])
        for _ in range(count):
            record = system.step(batches, step)
            into[f"{name}/{precision}"].append(record["step_time_s"])
            losses[f"{name}/{precision}"].append(record["loss"])
            step += 1

    for name, precision in list(variants):
        try:
            go(name, precision, args.warmup_steps, warmup)
        except Exception as err:  # e.g. a kernel this variant needs: report, go on
            errors[f"{name}/{precision}"] = _short(err)
            print(f"[speed] {name}/{precision} failed: {errors[f'{name}/{precision}']}",
                  flush=True)
            traceback.print_exception(err, limit=-10, file=sys.stderr)
            if "graphs" in name.split("+")[1:]:
                # a failed capture leaves Megatron's and TE's process-global graph state behind
                # (TE then refuses eager attention as if capturing): nothing after it is valid
                raise SystemExit(f"[speed] {name}/{precision}: CUDA graph capture failed; "
                                 "the run stops") from err
            variants.remove((name, precision))
            for table in (times, warmup, losses):
                table.pop(f"{name}/{precision}")
            if device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            continue
        print(f"[speed] warm-up {name}/{precision}: "
              + " ".join(f"{t * 1e3:.0f}" for t in warmup[f"{name}/{precision}"]) + " ms",
              flush=True)
    for r in range(args.rounds):
        for name, precision in variants:
            go(name, precision, args.steps_per_round, times)
        print(f"[speed] round {r + 1}/{args.rounds} done", flush=True)
    profiles = {}
    if args.profile and device.type == "cuda":
        for name, precision in variants:
            systems[name].set_precision(*settings[precision])
            trace = (Path(args.trace_dir) / f"{name}_{precision}.json.gz".replace(":", "-")
                     if args.trace_dir else None)
            profiles[f"{name}/{precision}"] = profile_step(systems[name], batches, step, trace)
            step += 1
    tokens = base.train.global_batch_size * base.model.seq_length
    flops = training_flops_per_token(base) * tokens
    peak = H200_BF16_DENSE_TFLOPS if device.type == "cuda" else float("nan")
    rows = {}
    for key, ts in times.items():
        median = statistics.median(ts)
        rows[key] = {
            "step_s": median, "min_s": min(ts), "max_s": max(ts),
            "spread_pct": 100 * (max(ts) - min(ts)) / median,
            "tokens_per_s": tokens / median, "tflops": flops / median / 1e12,
            "mfu": flops / median / 1e12 / peak,
            "warmup_s": warmup[key],
            "warmup_vs_steady": [t / median for t in warmup[key]],
            "losses": losses[key],
            "profile": profiles.get(key),
        }
    return {"machine": machine(), "recipe": str(Path(args.recipe).relative_to(ROOT))
            if Path(args.recipe).is_absolute() else args.recipe,
            "overrides": [f"model.num_layers={args.layers}", *args.overrides],
            "tokens_per_step": tokens, "flops_per_step": flops, "peak_tflops": peak,
            "fp8_recipe": base.fp8.recipe, "rows": rows, "built_peak_gb": built_gb,
            "peak_memory_gb": memory_gb(device), "rounds": args.rounds, "errors": errors,
            "steps_per_round": args.steps_per_round,
            "command": command_line("-m benchmarks.speed", sys.argv[1:])}


def profile_step(system, batches, step: int, trace_path: Path | None = None) -> dict:
    """Wall ms of one profiled step, its GPU kernel ms per category (benchmarks/fp8/proxy.py's
    table; every kernel counted in full, also where kernels overlap) and where the GPU idled
    (benchmarks/speed/gaps.py). `trace_path`: also keep the Chrome trace there (gzip)."""
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.fp8.proxy import kernel_category
    from benchmarks.speed.gaps import annotate_modules, chrome_trace_text, idle_gaps, kernel_totals

    handles = [h for chunk in system.model for h in annotate_modules(chunk)]
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            record = system.step(batches, step)
    finally:
        for h in handles:
            h.remove()
    torch.cuda.synchronize()
    text = chrome_trace_text(prof)
    if trace_path is not None:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        trace_path.write_bytes(gzip.compress(text.encode(), compresslevel=6))
    trace = json.loads(text)
    totals = kernel_totals(trace)
    breakdown: dict[str, float] = {}
    for name, (ms, _) in totals.items():
        category = kernel_category(name)
        breakdown[category] = breakdown.get(category, 0.0) + ms
    breakdown = dict(sorted(breakdown.items(), key=lambda kv: -kv[1]))
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:15]
    return {"wall_ms": record["step_time_s"] * 1e3, "busy_ms": sum(breakdown.values()),
            "kernels_ms": breakdown, "launches": sum(n for _, n in totals.values()),
            "top": [(name[:100], round(ms, 2), n, kernel_category(name))
                    for name, (ms, n) in top],
            "gaps": idle_gaps(trace)}


def machine() -> dict:
    from benchmarks.fp8.common import machine_info

    return machine_info()


def main(argv=None) -> int:
    from benchmarks.docs_section import write_json
    from benchmarks.speed.report import render, write_docs

    args = parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    result = run(args)
    print(render(result), flush=True)
    write_json(args.json, result)
    if args.write_docs:
        write_docs([result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
