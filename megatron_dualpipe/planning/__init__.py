"""Dry-run planning: parameter counts, rank layout, memory and bubble, without building a model.

`make_plan(recipe)` returns one JSON-able dict (what `plan --json` prints).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_dualpipe.config.stage_split import num_stages, stage_sizes
from megatron_dualpipe.config.validate import (
    data_parallel_size,
    num_microbatches,
    num_physical_experts,
    world_size,
)
from megatron_dualpipe.config.validate_training import (
    batch_increment,
    check_training_rules,
    unsupported_for_training,
)
from megatron_dualpipe.planning import memory
from megatron_dualpipe.planning.layout import ep_group_nodes, experts_per_rank, pipeline_ranks
from megatron_dualpipe.planning.params import ACTIVATED_CONVENTION, count_params
from megatron_dualpipe.schedules.actions import build_actions
from megatron_dualpipe.schedules.simulator import Costs, closed_form_bubble, simulate
from megatron_dualpipe.schedules.spec import SPECS, run_options
from megatron_dualpipe.token_schedules import BatchSchedule

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe

PER_RANK_SCOPE = "one entry per pipeline rank; all tp x dp GPUs of a pipeline rank are alike"


def check_plan_rules(recipe: Recipe) -> list[str]:
    """Rules on the training-loop fields (`config/validate_training.py`); raises `ValueError`,
    returns warnings, including what `train` would refuse."""
    warnings = check_training_rules(recipe)
    return warnings + [f"train refuses: {u}" for u in unsupported_for_training(recipe)]


def training_tokens(recipe: Recipe) -> int:
    """Tokens of `train.steps` steps, batch ramp included (`token_schedules.BatchSchedule`)."""
    return BatchSchedule(recipe).samples_before(recipe.train.steps) * recipe.model.seq_length


def batch_schedule_summary(recipe: Recipe) -> dict | None:
    """The batch ramp as `train` runs it, or None without one."""
    if recipe.train.batch_ramp is None:
        return None
    b = BatchSchedule(recipe)
    return {"start": recipe.train.batch_ramp[0], "first_batch": b.global_batch(0),
            "final_batch": b.final,
            "increment": batch_increment(recipe), "ramp_steps": b.ramp_steps,
            "ramp_tokens": b.samples_before(b.ramp_steps) * recipe.model.seq_length,
            "first_microbatches": b.num_microbatches(0)}


def simulate_recipe(recipe: Recipe, costs: Costs | None = None,
                    microbatches: int | None = None):
    """(per-rank action lists, SimResult) of the recipe's schedule (DeepSeek's unit costs),
    over the recipe's micro-batches or `microbatches`."""
    costs = costs or Costs()
    p = recipe.parallel
    m = microbatches or num_microbatches(recipe)
    chunks = p.vpp or 2
    zero_bubble, overlap = run_options(p)
    actions = build_actions(p.schedule, p.pp, m, overlap=overlap, zero_bubble=zero_bubble,
                            num_chunks=chunks)
    return actions, simulate(p.schedule, actions, m, costs, chunks)


def make_plan(recipe: Recipe, gpu_memory_gb: float = 80.0) -> dict:
    """Everything `plan` reports, as a JSON-able dict."""
    p, m = recipe.parallel, recipe.model
    world = world_size(recipe)
    dp = data_parallel_size(recipe)
    warnings = check_plan_rules(recipe)
    params = count_params(recipe)
    actions, sim = simulate_recipe(recipe)
    ranks = pipeline_ranks(recipe)
    mem = [memory.rank_memory(recipe, r, actions[r.pp_rank], sim.peak_activations_per_rank[
        r.pp_rank]) for r in ranks]
    over = [r.pp_rank for r in mem if r.total > gpu_memory_gb]
    if over:
        warnings.append(f"pipeline ranks {over} exceed {gpu_memory_gb:g} GB per GPU")
    # DeepSeek's table assumes the schedule as published: overlapped F&B and the W split.
    closed = closed_form_bubble(p.schedule, p.pp, sim.costs) if all(run_options(p)) or \
        not SPECS[p.schedule].dualpipe_family else None
    return {
        "name": recipe.name,
        "world_size": world,
        "num_nodes": p.num_nodes,
        "gpus_per_node": world // p.num_nodes,
        "parallel": {"tp": p.tp, "pp": p.pp, "ep": p.ep, "dp": dp, "expert_dp": dp // p.ep,
                     "schedule": p.schedule, "vpp": p.vpp, "zero1": p.distributed_optimizer},
        "num_microbatches": num_microbatches(recipe),
        "training_tokens": training_tokens(recipe),
        "batch_ramp": batch_schedule_summary(recipe),
        "mtp_num_layers": m.mtp_num_layers,
        "total_params": params.total,
        "activated_params": params.activated,
        "activated_convention": ACTIVATED_CONVENTION,
        "params": params.to_json(),
        "stages": {"count": num_stages(recipe), "layers_per_stage": stage_sizes(recipe)},
        "pipeline_ranks": [
            {"pp_rank": r.pp_rank,
             "global_ranks": [r.global_ranks.start, r.global_ranks.stop - 1],
             "nodes": [r.nodes.start, r.nodes.stop - 1],
             "chunks": [{"chunk": c.chunk, "stage": c.stage,
                         "layers": [c.layers.start, c.layers.stop - 1] if len(c.layers) else [],
                         "embedding": c.embedding, "head_and_mtp": c.head}
                        for c in r.chunks]}
            for r in ranks
        ],
        "experts": {"physical": num_physical_experts(recipe), "per_ep_rank": experts_per_rank(
            recipe), "ep_group_nodes": ep_group_nodes(recipe)},
        "per_rank_memory_gb": [round(r.total, 3) for r in mem],
        "per_rank_memory_scope": PER_RANK_SCOPE,
        "memory": [r.to_json() for r in mem],
        "gpu_memory_gb": gpu_memory_gb,
        "bubble": sim.bubble,
        "bubble_fraction": sim.bubble / sim.makespan if sim.makespan else 0.0,
        "closed_form_bubble": closed,
        "makespan": sim.makespan,
        "costs": {"f": sim.costs.f, "b": sim.costs.b, "w": sim.costs.w, "fb": sim.costs.fb},
        "memory_assumptions": memory_assumptions(recipe),
        "warnings": warnings,
    }


def memory_assumptions(recipe: Recipe) -> str:
    """One line saying what the memory numbers assume (details: `planning/memory.py`)."""
    p, m, f = recipe.parallel, recipe.model, recipe.fp8
    dp = data_parallel_size(recipe)
    weights = f"{m.dtype} weights" + (" (GEMM weights FP8)" if f.param_gather and
                                      f.recipe != "none" else "")
    cache = ", FP8 weight caches" if f.recipe != "none" and not f.param_gather else ""
    shard = (f"sharded over dp {dp} (experts over expert dp {dp // p.ep})"
             if p.distributed_optimizer else "unsharded")
    moments = recipe.optimizer.moment_dtype
    main = "fp32 master + " if m.dtype == "bf16" else ""
    spec = SPECS[p.schedule]
    copies = "2 stages per rank" if spec.dualpipe_family else "1 chunk per rank"
    if spec.needs_vpp:
        copies = f"{p.vpp} chunks per rank"
    gemm_in = "FP8" if f.recipe != "none" else m.dtype
    act = (f"activations = peak in-flight micro-batch chunks (schedule walk) x bytes per chunk "
           f"({m.seq_length} tokens x mb {recipe.train.micro_batch_size}, recompute "
           f"{m.recompute_modules or 'none'}, GEMM inputs {gemm_in})")
    return (f"{weights}, fp32 grads, {main}{moments} Adam m/v {shard}{cache}; {copies}; {act}")
