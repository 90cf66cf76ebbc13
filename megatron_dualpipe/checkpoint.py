"""Checkpoints with Megatron-Core dist-checkpointing (layout-independent sharded tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest.json"


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

    `latest.json` is rewritten only after every rank has finished writing, so an
    interrupted save never replaces the last good checkpoint.
    """
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    path = root / f"step_{state.step:07d}"
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(state), str(path))
    for hook in _hooks(state):
        hook.on_save(state, path)
    if dist.get_rank() == 0:
        torch.save({"scheduler": state.scheduler.state_dict(), "step": state.step},
                   path / "train_state.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(json.dumps({"step": state.step, "path": path.name}))
        tmp.replace(root / LATEST)
    dist.barrier()
    return path


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


def latest(ckpt_dir: str) -> Path | None:
    marker = Path(ckpt_dir) / LATEST
    if not marker.exists():
        return None
    return Path(ckpt_dir) / json.loads(marker.read_text())["path"]


def load(state, ckpt_dir: str) -> int:
    """Load the latest checkpoint into `state`; returns the step to resume from (0 if none)."""
    from megatron.core import dist_checkpointing

    path = latest(ckpt_dir)
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
