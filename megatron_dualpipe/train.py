"""The training loop: Megatron-Core model, optimizer and pipeline schedule from a recipe."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from megatron_dualpipe import console
from megatron_dualpipe.checkpoint_files import already_complete, check_fresh_start
from megatron_dualpipe.config import Recipe, data_parallel_size, num_microbatches
from megatron_dualpipe.config.dump import write_resolved
from megatron_dualpipe.config.rules import TRAIN_RULES, check_recipe
from megatron_dualpipe.config.to_megatron import fusion_kwargs, optimizer_config
from megatron_dualpipe.data import make_sources
from megatron_dualpipe.distributed import destroy_distributed, init_distributed, resolve_device
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.evaluate import evaluate, evaluation_due
from megatron_dualpipe.features import extensions, run_hooks
from megatron_dualpipe.lifetime import STOP
from megatron_dualpipe.lr_scheduler import build_scheduler
from megatron_dualpipe.model.build import build_model
from megatron_dualpipe.model.cuda_graphs import seed_rng
from megatron_dualpipe.schedules.registry import forward_backward_func
from megatron_dualpipe.schedules.spec import run_options
from megatron_dualpipe.token_schedules import BatchSchedule, config_values, step_source

__all__ = ["TrainState", "build_scheduler", "setup", "train", "train_step"]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses, token count, and the pair for logging."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Megatron forward step; with `return_schedule_plan` (overlapped F&B chunks, see
    schedules/overlap.py) the model's schedule plan instead of its output."""
    batch = next(data_iterator)
    if return_schedule_plan:  # [overlap]
        plan = model.build_schedule_plan(
            batch["tokens"],
            batch["position_ids"],
            None,
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        return plan, partial(loss_func, batch["loss_mask"])
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(loss_func, batch["loss_mask"])


@dataclass
class TrainState:
    """Everything the loop owns; returned so tests can inspect it."""

    recipe: Recipe
    device: torch.device
    config: object
    model: list
    optimizer: object
    scheduler: object
    step: int = 0
    history: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    batches: BatchSchedule | None = None  # global batch per step (train.batch_ramp)
    warnings: list = field(default_factory=list)  # recipe warnings (printed by rank 0)
    stopped_by: str | None = None  # the signal that stopped training early (SIGTERM, SIGUSR1)
    saved: object = None  # the last checkpoint this run wrote


def setup(recipe: Recipe) -> TrainState:
    """Process groups, model chunks, optimizer and LR schedule."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_dualpipe.fp8 import check_fp8_environment, fp8_environment_variables
    from megatron_dualpipe.patches import (
        apply_cpu_patches,
        enable_rope_cache_copy,
        enable_routing_map_copy,
        needs_rope_cache_copy,
        needs_routing_map_copy,
    )

    # The launcher ran these before starting this process; they return the warnings to print
    # and guard callers that train without the command line.
    warnings = check_recipe(recipe, rules=TRAIN_RULES)
    device = resolve_device(recipe)
    check_fp8_environment(recipe, device)
    fusion_kwargs(recipe, device.type == "cuda")  # its errors before any process group starts
    graphs = recipe.model.cuda_graphs != "none"
    if graphs and device.type != "cuda":
        raise UserError(f"model.cuda_graphs={recipe.model.cuda_graphs} needs a GPU (train.device="
                        f"{recipe.train.device} resolved to {device.type}); allowed here: "
                        "model.cuda_graphs=none")
    if needs_routing_map_copy(recipe, device.type):
        enable_routing_map_copy()
    if needs_rope_cache_copy(recipe):
        enable_rope_cache_copy()
    os.environ.update(fp8_environment_variables(recipe))
    if device.type == "cpu":
        apply_cpu_patches()
    init_distributed(recipe, device)
    torch.manual_seed(recipe.train.seed)
    seed_rng(recipe.train.seed, graphs)
    if recipe.train.deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    router_cls, hooks = extensions(recipe)
    config, model = build_model(recipe, device, router_cls=router_cls)
    optimizer = get_megatron_optimizer(optimizer_config(recipe), model)
    config.finalize_model_grads_func = finalize_model_grads
    batches = BatchSchedule(recipe)
    scheduler = build_scheduler(recipe, optimizer, batches)
    state = TrainState(recipe, device, config, model, optimizer, scheduler, hooks=hooks,
                       batches=batches, warnings=warnings)
    for hook in hooks:
        hook.on_build(state)
    return state


def _global_loss(forward_data_store: list, device: torch.device) -> tuple[float, list[float]]:
    """Per-token loss over the whole global batch, and this rank's per-micro-batch losses."""
    from megatron.core import parallel_state

    per_microbatch = [float(o["lm loss"][0] / o["lm loss"][1]) for o in forward_data_store]
    pair = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        for o in forward_data_store:
            pair += o["lm loss"].to(torch.float64)
    dist.all_reduce(pair)
    return float(pair[0] / pair[1]), per_microbatch


def train_step(state: TrainState, source, step: int, forward_only: bool = False,
               forward_step_func=forward_step) -> dict:
    """One optimizer step over the global batch; returns the step's record.

    With `train.batch_ramp` the step's micro-batch count and samples follow `state.batches`;
    token-scheduled config values (MTP loss weight, router bias update rate) are set first.
    """
    recipe = state.recipe
    if not forward_only:
        for hook in state.hooks:
            hook.on_step_begin(state, step)
    if state.batches is not None:
        source = step_source(source, state.batches, step)
    schedule_values = apply_config_schedules(state, step)
    zero_bubble, overlap = run_options(recipe.parallel, state.device.type == "cuda")
    fb = forward_backward_func(recipe.parallel.schedule, zero_bubble=zero_bubble,
                               overlap=overlap)
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    data_iterator = source.iterators(step, len(state.model))
    start = time.perf_counter()
    store = fb(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=state.model,
        num_microbatches=source.num_microbatches,
        seq_length=recipe.model.seq_length,
        micro_batch_size=recipe.train.micro_batch_size,
        forward_only=forward_only,
    )
    grad_norm = 0.0
    lr = state.optimizer.param_groups[0]["lr"]  # the LR this step uses
    if not forward_only:
        for hook in state.hooks:
            hook.on_grads_ready(state)
        _, grad_norm, _ = state.optimizer.step()
        state.scheduler.step(increment=1)
    if state.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    loss, per_microbatch = _global_loss(store, state.device)
    global_batch = (state.batches.global_batch(step) if state.batches is not None
                    else recipe.train.global_batch_size)
    tokens = global_batch * recipe.model.seq_length
    record = {
        "step": step,
        "loss": loss,
        "lr": float(lr),
        "grad_norm": float(grad_norm or 0.0),
        "tokens_per_s": tokens / elapsed,
        "step_time_s": elapsed,
        "microbatch_losses": per_microbatch,
    }
    if recipe.train.batch_ramp is not None:
        record["global_batch"] = global_batch
    record.update(schedule_values)
    if not forward_only:
        for hook in state.hooks:
            hook.on_step_end(state, record)
    return record


def apply_config_schedules(state: TrainState, step: int) -> dict[str, float]:
    """Set the token-scheduled TransformerConfig fields for `step`; returns them for the
    step's record. Megatron reads them at run time (the MTP loss scale in the forward, the bias
    update rate in `finalize_model_grads`), but chunks and some modules hold their own config
    copies, so every config object reachable from the model is updated."""
    recipe = state.recipe
    if not (recipe.model.mtp_loss_scaling_schedule or recipe.moe.bias_update_rate_schedule):
        return {}
    from megatron.core.transformer import TransformerConfig

    batches = state.batches or BatchSchedule(recipe)
    values = config_values(recipe, batches.samples_before(step) * recipe.model.seq_length)
    configs = {id(state.config): state.config}
    for chunk in state.model:
        for module in chunk.modules():
            config = getattr(module, "config", None)
            if isinstance(config, TransformerConfig):
                configs[id(config)] = config
    for config in configs.values():
        for name, value in values.items():
            setattr(config, name, value)
    return values


def train(recipe: Recipe, stop_after: int | None = None) -> TrainState:
    """Run (or resume) training as this process's part of the job."""
    from megatron_dualpipe import checkpoint

    console.collect_warnings()
    console.say(f"{recipe.name}: building the model, optimizer and data "
                f"({os.environ.get('WORLD_SIZE', 1)} processes)...")
    start = time.perf_counter()
    state = setup(recipe)
    rank = dist.get_rank()
    source, valid_source = make_sources(recipe, _dp_rank(), state.device)
    built_s = time.perf_counter() - start
    check_fresh_start(recipe)
    if recipe.train.ckpt_dir and recipe.train.resume:
        state.step = checkpoint.load(state, recipe.train.ckpt_dir)
        if state.step >= recipe.train.steps:
            if rank == 0:
                print(f"[megatron_dualpipe] {already_complete(recipe, state.step)}", flush=True)
            return state
    # the run's hooks: metrics (written by rank 0) and the profiler window (train.profile_steps)
    state.hooks.extend(run_hooks(recipe, rank, state.device, resume_step=state.step))
    if rank == 0:
        for warning in state.warnings:
            print(f"[megatron_dualpipe] warning: {warning}", flush=True)
        ramp = ""
        if state.batches.ramp_steps:
            ramp = (f" (batch ramp: {state.batches.num_microbatches(0)} in the first step, "
                    f"all from step {state.batches.ramp_steps})")
        print(
            f"[megatron_dualpipe] {recipe.name}: world {dist.get_world_size()}, "
            f"tp={recipe.parallel.tp} pp={recipe.parallel.pp} ep={recipe.parallel.ep} "
            f"dp={data_parallel_size(recipe)}, schedule={recipe.parallel.schedule}, "
            f"{num_microbatches(recipe)} micro-batches/step{ramp}, device={state.device.type}"
            + (f", resuming at step {state.step}" if state.step else "")
            + f"; built in {built_s:.0f} s; resolved recipe: "
            f"{write_resolved(recipe, recipe.train.log_dir)}",
            flush=True,
        )
    console.say(f"step {state.step + 1} warms up (allocations, first calls): slower than the rest")
    last = recipe.train.steps if stop_after is None else min(recipe.train.steps, stop_after)
    while state.step < last:
        record = train_step(state, source, state.step)
        record.pop("microbatch_losses")
        state.step += 1
        if evaluation_due(recipe.train, state.step):
            record["val_loss"] = evaluate(state, valid_source, forward_step)
        state.history.append(record)
        console.flush_warnings()
        for hook in state.hooks:
            hook.on_record(state, record)
        interval = recipe.train.save_interval
        state.stopped_by = STOP.check(state.device)  # SIGTERM/SIGUSR1 on any rank
        if recipe.train.ckpt_dir and (
            (interval and state.step % interval == 0) or state.step == recipe.train.steps
            or state.stopped_by
        ):
            state.saved = checkpoint.save(state, recipe.train.ckpt_dir)
        if state.stopped_by and state.step < last:
            if rank == 0:
                print(f"[megatron_dualpipe] {stopped_message(state)}", flush=True)
            break
    for hook in state.hooks:
        hook.on_train_end(state)
    console.flush_warnings()
    return state


def stopped_message(state: TrainState) -> str:
    where = (f"checkpoint saved to {state.saved}; run the same command again to resume"
             if state.saved else "no checkpoint (train.ckpt_dir is not set): the steps so far "
             "are lost")
    steps = state.recipe.train.steps
    return f"{state.stopped_by}: stopped after step {state.step} of {steps}; {where}"


def _dp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def run_worker(recipe: Recipe) -> int:
    hang_dump_s = float(os.environ.get("MDP_HANG_DUMP_S", 0))
    if hang_dump_s:
        # Debugging aid: print every thread's stack and exit if the run is still going.
        import faulthandler

        faulthandler.dump_traceback_later(hang_dump_s, exit=True)
    try:
        state = train(recipe)
    finally:
        destroy_distributed()
    if state.stopped_by and not state.saved:
        return 128 + signal.Signals[state.stopped_by].value
    return 0
