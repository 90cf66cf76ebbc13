"""Recipe rules for the training-loop features: batch ramp, token schedules, Adam moment dtype,
selective recompute, FP8 dispatch.

`check_training_rules(recipe)` raises `UserError` (naming the recipe field and what is valid)
and returns warnings; `unsupported_for_training(recipe)` lists what `plan` accepts but `train`
refuses with Megatron-Core 0.19. Neither needs process groups.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from megatron_dualpipe.config.validate import data_parallel_size
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.schedules.spec import SPECS

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe

def batch_increment(recipe: Recipe) -> int:
    """Smallest global-batch step that keeps the micro-batch count valid for the schedule:
    micro_batch_size x dp, twice that for dualpipe (an even number of micro-batches)."""
    unit = recipe.train.micro_batch_size * data_parallel_size(recipe)
    return SPECS[recipe.parallel.schedule].microbatch_multiple * unit


def min_global_batch(recipe: Recipe) -> int:
    """Smallest global batch the schedule runs (DualPipe/V: 2 x pp micro-batches per DP rank)."""
    unit = recipe.train.micro_batch_size * data_parallel_size(recipe)
    p = recipe.parallel
    return SPECS[p.schedule].min_microbatches(p.pp) * unit


def check_batch_ramp(recipe: Recipe) -> list[str]:
    """`train.batch_ramp` = [start, end, ramp_samples]; returns warnings."""
    t, p = recipe.train, recipe.parallel
    if t.batch_ramp is None:
        return []
    start, end, samples = t.batch_ramp
    name = f"train.batch_ramp={list(t.batch_ramp)}"
    if end != t.global_batch_size:
        raise UserError(
            f"train.batch_ramp ends at {end} but train.global_batch_size="
            f"{t.global_batch_size}; they must be equal"
        )
    if not 0 < start <= end or samples < 0 or (start < end and samples == 0):
        raise UserError(f"{name}: need 0 < start <= end and ramp_samples > 0 (>= 0 when "
                         "start = end)")
    inc = batch_increment(recipe)
    bidirectional = SPECS[p.schedule].bidirectional
    why = (f"train.micro_batch_size x data-parallel size = {inc}" if not bidirectional
           else f"2 x train.micro_batch_size x data-parallel size = {inc} (dualpipe runs an "
           "even number of micro-batches)")
    for label, value in (("start", start), ("end - start", end - start)):
        if value % inc:
            raise UserError(
                f"{name}: {label} = {value} must be a multiple of {why}; nearest valid start: "
                f"{_nearest_multiple(start, inc)}"
            )
    floor = min_global_batch(recipe)
    if start >= floor:
        return []
    # Increments k with start + k * inc < floor run with `floor`: until ceil(k_min * samples / n)
    # samples are consumed, i.e. for that many samples / floor steps.
    n = (end - start) // inc
    k_min = -(-(floor - start) // inc)
    raised = -(-k_min * samples // n)
    unit = floor // (2 * p.pp)
    return [
        f"train.batch_ramp starts at {start} = {start // unit} micro-batches per step; "
        f"{p.schedule} with pp={p.pp} needs >= {2 * p.pp}: the ramp's batches below {floor} "
        f"are raised to {floor} (the first {raised:,} ramp samples, {-(-raised // floor):,} "
        f"steps); start the ramp at {floor} to make this explicit"
    ]


def _nearest_multiple(value: int, unit: int) -> int:
    return max(unit, round(value / unit) * unit)


SCHEDULES = (
    ("optimizer.lr_schedule_tokens", lambda r: r.optimizer.lr_schedule_tokens),
    ("model.mtp_loss_scaling_schedule", lambda r: r.model.mtp_loss_scaling_schedule),
    ("moe.bias_update_rate_schedule", lambda r: r.moe.bias_update_rate_schedule),
)


def check_token_schedules(recipe: Recipe) -> None:
    """Token boundaries are positive and increase; values are >= 0."""
    for name, get in SCHEDULES:
        rows = get(recipe)
        bounds = [r[0] for r in rows]
        if any(b <= 0 for b in bounds) or any(b <= a for a, b in itertools.pairwise(bounds)):
            raise UserError(f"{name}: token boundaries must be > 0 and increase, got {bounds}")
        if any(r[1] < 0 for r in rows):
            raise UserError(f"{name}: values must be >= 0, got {[r[1] for r in rows]}")


def check_moment_dtype(recipe: Recipe) -> None:
    """BF16 Adam moments are Megatron's precision-aware optimizer: Adam + distributed optimizer.

    (It also needs Transformer Engine's FusedAdam; `to_megatron.optimizer_config` checks that
    when the optimizer is built, since `plan` runs without TE.)
    """
    o = recipe.optimizer
    if o.moment_dtype == "fp32":
        return
    if o.name != "adam":
        raise UserError(f"optimizer.moment_dtype={o.moment_dtype} needs optimizer.name=adam "
                         f"(got {o.name}); allowed values with {o.name}: fp32")
    if not recipe.parallel.distributed_optimizer:
        raise UserError(f"optimizer.moment_dtype={o.moment_dtype} needs "
                         "parallel.distributed_optimizer=true (Megatron-Core's precision-aware "
                         "optimizer); allowed values without it: fp32")


def check_recompute(recipe: Recipe) -> None:
    """`model.recompute_modules` entries that Megatron-Core 0.19 accepts for this model."""
    m, moe = recipe.model, recipe.moe
    rc = m.recompute_modules
    if "mla_up_proj" in rc and m.attention != "mla":
        raise UserError("model.recompute_modules: mla_up_proj needs model.attention=mla "
                         f"(got {m.attention})")
    if "moe_act" in rc and not moe.grouped_gemm:
        raise UserError("model.recompute_modules: moe_act needs moe.grouped_gemm=true (Megatron-"
                         "Core recomputes the activation of the grouped-GEMM experts only)")
    if "moe_act" in rc and recipe.train.device == "cpu":
        raise UserError("model.recompute_modules: moe_act needs a GPU (the grouped-GEMM experts "
                         "are GPU-only); train.device is cpu")


def check_training_rules(recipe: Recipe) -> list[str]:
    """All rules of this module; raises `UserError`, returns warnings."""
    check_token_schedules(recipe)
    check_moment_dtype(recipe)
    check_recompute(recipe)
    return check_batch_ramp(recipe)


def unsupported_for_training(recipe: Recipe) -> list[str]:
    """Recipe values `plan` accepts but `train` refuses (Megatron-Core 0.19 cannot run them)."""
    problems = []
    if recipe.fp8.dispatch and recipe.fp8.recipe != "none":
        problems.append(
            "fp8.dispatch=true (FP8 payloads in the MoE all-to-all, DeepSeek-V3 §3.3.3) is not "
            "supported by Megatron-Core 0.19's token dispatchers (alltoall and allgather send "
            "BF16; flex/DeepEP and HybridEP have no FP8 dispatch option); allowed values: false"
        )
    m = recipe.model
    local = ("train.device=cpu" if recipe.train.device == "cpu"
             else "model.spec=local" if m.spec == "local" else None)
    if m.attention == "mla" and local:
        problems.append(
            f"model.attention=mla needs Transformer Engine layers on a GPU ({local} builds "
            "Megatron-Core 0.19's local layers, whose attention has no MLA head sizes); allowed "
            f"values with {local}: mha"
        )
    return problems
