"""Text output of `plan --predict` and `plan --search`."""

from __future__ import annotations

PART_NAMES = {
    "attention": "attention (MLA/GQA, core attention)",
    "experts": "experts (router, shared, routed)",
    "dense_mlp": "dense MLP",
    "head": "output head (+ MTP heads)",
    "dispatch_combine": "EP dispatch/combine",
    "pipeline_p2p": "pipeline p2p",
    "dp_reduce": "DP reduce-scatter + all-gather",
    "optimizer": "optimizer",
    "bubble": "pipeline bubble (idle)",
}


def format_prediction(p: dict) -> str:
    """The `--predict` section of the text report."""
    cal = p["calibration"]
    lines = [
        f"prediction on {p['world_size']} x {p['hardware']} (calibration {cal['source']}, "
        f"for {cal['hardware']}: {cal['path']}):",
        f"  step {p['step_time_s']:.3f} s ({p['num_microbatches']} micro-batches, "
        f"{p['tokens_per_step']:,} tokens), {p['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, "
        f"MFU {p['mfu']:.1%} ({p['model_tflops_per_gpu']:.0f} TFLOP/s of BF16 peak)",
        f"  pipeline bubble {p['bubble_fraction']:.1%} of the pipeline's "
        f"{p['pipeline_makespan_s']:.3f} s; exposed communication {p['exposed_comm_fraction']:.1%}"
        f" of the step (without any: {p['step_time_without_comm_s']:.3f} s)",
        f"  {p['gpu_hours_per_trillion_tokens'] / 1e3:.1f}K GPU-hours per trillion tokens; "
        f"memory up to {p['max_memory_per_gpu_gb']:.1f} GB per GPU",
        f"  per step on pipeline rank {p['breakdown_rank']} (the busiest), seconds: "
        f"{'busy':>8} {'on the step':>12}",
    ]
    for k, v in p["breakdown_s"].items():
        lines.append(f"    {PART_NAMES.get(k, k):<44} {v['total']:8.3f} {v['exposed']:12.3f}")
    return "\n".join(lines)


def format_search(layouts: list, gpus: int, hardware: str) -> str:
    """The `--search` table: feasible layouts by throughput, then a count of the others."""
    ok = [c for c in layouts if c.feasible]
    lines = [f"layouts of {gpus} x {hardware} by predicted throughput ({len(ok)} feasible of "
             f"{len(layouts)}):",
             f"  {'#':>3} {'pp':>4} {'ep':>4} {'dp':>5} {'schedule':<11} {'mb':>2} {'M':>5} "
             f"{'step s':>8} {'tok/s/GPU':>10} {'GB/GPU':>7}"]
    for i, c in enumerate(ok[:30], 1):
        lines.append(f"  {i:>3} {c.pp:>4} {c.ep:>4} {c.dp:>5} {c.schedule:<11} "
                     f"{c.micro_batch_size:>2} {c.num_microbatches:>5} {c.step_time_s:8.2f} "
                     f"{c.tokens_per_s_per_gpu:10.0f} {c.max_memory_gb:7.1f}")
    if len(ok) > 30:
        lines.append(f"  ... {len(ok) - 30} more feasible (--json lists all)")
    over = sum(1 for c in layouts if not c.feasible and c.reason.startswith("memory"))
    lines.append(f"  not feasible: {over} over memory, {len(layouts) - len(ok) - over} rejected "
                 "by the recipe rules (--json gives each reason)")
    return "\n".join(lines)
