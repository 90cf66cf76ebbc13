"""Checkpoints with Megatron-Core dist-checkpointing (layout-independent sharded tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest.json"


def _sharded_state_dict(state):
    model_sd = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(state.model)}
    sd = dict(model_sd)
    sd["optimizer"] = state.optimizer.sharded_state_dict(model_sd)
    return sd


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
    sharded = _sharded_state_dict(state)
    loaded = dist_checkpointing.load(sharded, str(path))
    for i, chunk in enumerate(state.model):
        chunk.load_state_dict(loaded[f"model{i}"])
    state.optimizer.load_state_dict(loaded["optimizer"])
    train_state = torch.load(path / "train_state.pt", weights_only=False)
    state.scheduler.load_state_dict(train_state["scheduler"])
    return int(train_state["step"])
