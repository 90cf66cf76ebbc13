"""Checkpoints with Megatron-Core dist-checkpointing (layout-independent sharded tensors)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dualpipe import checkpoint_files as files
from megatron_dualpipe.errors import UserError

# Optimizer state as the distributed optimizer's flat shards: every rank saves and loads its
# own part without communication (resumable with the same parallel layout, any DP size).
METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded_state_dict(state, is_loading: bool = False):
    model_sd = {
        f"model{i}": chunk.module.sharded_state_dict(metadata=METADATA)
        for i, chunk in enumerate(state.model)
    }
    sd = dict(model_sd)
    sd["optimizer"] = state.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata=METADATA
    )
    for hook in _hooks(state):  # e.g. EPLB keeps routed experts in logical layout
        sd = hook.checkpoint_state_dict(state, sd)
    return sd


def _hooks(state) -> list:
    return getattr(state, "hooks", [])


def save(state, ckpt_dir: str) -> Path:
    """Save model, optimizer, LR schedule and step to `<ckpt_dir>/step_<N>` atomically.

    Everything is written into `step_<N>.tmp`; once every rank has finished, the ranks
    checksum the files (each its share), rank 0 writes the manifest, renames the directory and
    only then replaces `latest.json` (see checkpoint_files.py). An interrupted save never
    replaces or damages the last good checkpoint.
    """
    from megatron.core import dist_checkpointing

    rank, world = dist.get_rank(), dist.get_world_size()
    final = Path(ckpt_dir) / files.step_dir_name(state.step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        files.remove_tree(tmp)  # left by an interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(state), str(tmp))
    for hook in _hooks(state):
        hook.on_save(state, tmp)
    if rank == 0:
        torch.save({"scheduler": state.scheduler.state_dict(), "step": state.step},
                   tmp / "train_state.pt")
    dist.barrier()
    names = [files.files_of(tmp) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    shares = [None] * world
    dist.all_gather_object(shares, files.describe(tmp, names[0][rank::world]))
    if rank == 0:
        entries = {name: entry for share in shares for name, entry in share.items()}
        files.publish(tmp, final, state.step, entries)
    dist.barrier()
    return final


def _init_optimizer_state(optimizer) -> None:
    """Create Adam's state tensors (zeros, then overwritten by the load) before the first step.

    Megatron-Core's state_dict() needs them to exist; this is what its own loader does.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam `step` tensor, equal to the saved iteration.

    Without Apex/TE, Megatron-Core 0.19's DistributedOptimizer saves the iteration in each
    param group's "step" but its loader leaves torch Adam's per-parameter `step` at the value
    of the state-initialization step, or one tensor shared by all parameters (which Adam then
    increments once per parameter); either breaks bias correction after a resume.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def choose(ckpt_dir: str) -> Path | None:
    """The newest intact checkpoint in `ckpt_dir` (collective; every rank gets the same).

    Each rank verifies its share of the files against the manifest; a corrupt or incomplete
    checkpoint is reported by path and skipped for the next older one. None when there is no
    checkpoint at all; a `UserError` when there are some but none is usable.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    steps, notes = files.candidates(ckpt_dir)
    skipped = []
    for step in steps:
        path = Path(ckpt_dir) / files.step_dir_name(step)
        names = files.manifest_files(path)
        shares = [None] * world
        dist.all_gather_object(shares, files.problems(path, names[rank::world]))
        found = sorted({p for share in shares for p in share})
        if not found:
            if rank == 0:
                for note in notes:
                    print(f"[megatron_dualpipe] warning: {note}", flush=True)
                for bad in skipped:
                    print(f"[megatron_dualpipe] warning: skipped a damaged checkpoint: {bad}",
                          flush=True)
                if skipped:
                    print(f"[megatron_dualpipe] using the newest intact checkpoint: {path}",
                          flush=True)
            return path
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        skipped.append(f"{found[0]}{more}")
    if not steps:
        return None
    raise UserError(
        f"no usable checkpoint in {ckpt_dir}: " + "; ".join(notes + skipped)
        + "; restore a checkpoint, or give another train.ckpt_dir to start over"
    )


def load(state, ckpt_dir: str) -> int:
    """Load the latest checkpoint into `state`; returns the step to resume from (0 if none)."""
    from megatron.core import dist_checkpointing

    path = choose(ckpt_dir)
    if path is None:
        return 0
    _init_optimizer_state(state.optimizer)
    sharded = _sharded_state_dict(state, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path))
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        if not any(hook.load_state_dict(state, loaded) for hook in _hooks(state)):
            for i, chunk in enumerate(state.model):
                chunk.module.load_state_dict(loaded[f"model{i}"])
            state.optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(state.optimizer)
    for hook in _hooks(state):
        hook.on_load(state, path)
    train_state = torch.load(path / "train_state.pt", weights_only=False)
    state.scheduler.load_state_dict(train_state["scheduler"])
    return int(train_state["step"])
