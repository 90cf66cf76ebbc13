"""`rebalance_experts`: the EPLB planner as DeepSeek's EPLB calls it (torch tensors in and out).

The planning itself is pure numpy in `eplb/placement/` (fresh plans, migration-aware plans,
reports); ``mode="compat"`` runs DeepSeek's greedy bit for bit (`eplb/compat.py`, which sorts
with torch as the reference does).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_dualpipe.eplb.compat import plan_compat
from megatron_dualpipe.eplb.placement.migration import plan_migration
from megatron_dualpipe.eplb.placement.planner import (
    as_weight_array,
    build_log2phy,
    make_layout,
    plan_fast,
)

MODES = ("fast", "compat")


def rebalance_experts(
    weight: torch.Tensor | np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    mode: str = "fast",
    policy: str = "auto",
    current_phy2log: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan expert replication and placement (DeepSeek EPLB semantics).

    Args:
        weight: ``[layers, num_logical]`` non-negative load estimates.
        num_replicas: physical slots per layer; a multiple of ``num_gpus``, ``>= num_logical``.
        num_groups: expert groups (``num_logical`` must be a multiple for the hierarchical policy).
        num_nodes: server nodes; ``num_gpus`` must be a multiple.
        num_gpus: GPUs; slot ``s`` lives on GPU ``s // (num_replicas // num_gpus)``.
        mode: ``"fast"`` (vectorized, no avoidable duplicates, better mean balancedness than
            the greedy on skewed loads) or ``"compat"`` (bit-exact DeepSeek greedy).
        policy: ``"auto"`` (hierarchical iff ``num_groups % num_nodes == 0``), ``"hierarchical"``
            or ``"global"``.
        current_phy2log: ``[layers, num_replicas]`` current placement; switches on migration-aware
            planning (fast mode only): balancedness within 1% of a fresh plan, few slots moved.

    Returns:
        ``(phy2log [L, R], log2phy [L, E, max_count] padded with -1, logcnt [L, E])``, int64.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    weight_LE = as_weight_array(weight)
    lay = make_layout(weight_LE.shape, num_replicas, num_groups, num_nodes, num_gpus, policy)
    rank = None
    if mode == "compat":
        if current_phy2log is not None:
            raise ValueError("current_phy2log is only supported with mode='fast' "
                             "(DeepSeek's greedy has no migration-aware variant)")
        groups, nodes = (num_groups, num_nodes) if lay.hierarchical else (1, 1)
        phy2log, rank, _ = plan_compat(weight_LE, num_replicas, groups, nodes, num_gpus)
    elif current_phy2log is not None:
        phy2log = plan_migration(weight_LE, current_phy2log, lay)
    else:
        phy2log = plan_fast(weight_LE, lay)
    log2phy, logcnt = build_log2phy(phy2log, lay.num_logical, rank)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)

