"""DeepSeek-EPLB-exact greedy planner (``mode="compat"``).

Re-implements the three greedy steps of DeepSeek's reference ``eplb.py`` so that the output is
bit-for-bit identical, including tie-breaking:

* all arithmetic is float32, like the reference (it calls ``weight.float()``),
* items are packed in the order of ``torch.sort(descending=True)``, the very call the reference
  makes (so equal loads come out in torch's order),
* a pack/replica choice among equals goes to the lowest index (Python ``min`` / ``max(dim)``).

Unlike the reference, each greedy step runs vectorized across all rows (layers, or layer x node
pairs): the per-row decisions are independent, so stepping all rows in lock-step gives the same
result. Known weaknesses that are reproduced on purpose: two replicas of one expert can land on
the same GPU, and an expert can get more replicas than there are GPUs to hold them.
"""

from __future__ import annotations

import numpy as np
import torch


def greedy_pack(weight_RN: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``n`` items per row into ``num_packs`` packs of ``n / num_packs`` items each.

    Items are visited heaviest first and each goes to the lightest pack that still has room
    (lowest pack index on ties). Returns ``(pack_index, rank_in_pack)``, both ``[rows, n]``.
    """
    num_rows, num_items = weight_RN.shape
    per_pack = num_items // num_packs
    rows = np.arange(num_rows)
    if per_pack == 1:
        # The reference short-circuits this case to the identity assignment.
        identity = np.tile(np.arange(num_items), (num_rows, 1))
        return identity, np.zeros((num_rows, num_items), np.int64)
    # Same call as the reference (not stable=True): ties come out in torch's own order.
    order_RN = torch.from_numpy(weight_RN).sort(dim=-1, descending=True).indices.numpy()
    pack_load = np.zeros((num_rows, num_packs), np.float32)
    pack_fill = np.zeros((num_rows, num_packs), np.int64)
    pack_index = np.empty((num_rows, num_items), np.int64)
    rank_in_pack = np.empty((num_rows, num_items), np.int64)
    inf = np.float32(np.inf)
    for j in range(num_items):
        item = order_RN[:, j]
        pack = np.where(pack_fill < per_pack, pack_load, inf).argmin(axis=1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_fill[rows, pack]
        pack_load[rows, pack] += weight_RN[rows, item]
        pack_fill[rows, pack] += 1
    return pack_index, rank_in_pack


def greedy_replicate(
    weight_RE: np.ndarray, num_phy: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each extra physical slot to the expert with the largest per-replica load.

    Slots ``0..E-1`` hold one replica of each expert in order; slot ``E + k`` holds the k-th extra
    replica. Returns ``(phy2log [rows, num_phy], replica_rank [rows, num_phy], count [rows, E])``.
    """
    num_rows, num_log = weight_RE.shape
    rows = np.arange(num_rows)
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (num_rows, 1))
    rank = np.zeros((num_rows, num_phy), np.int64)
    count = np.ones((num_rows, num_log), np.int64)
    count_f = np.ones((num_rows, num_log), np.float32)
    for slot in range(num_log, num_phy):
        pick = (weight_RE / count_f).argmax(axis=1)  # first maximum, like torch.max(dim)
        phy2log[:, slot] = pick
        rank[:, slot] = count[rows, pick]
        count[rows, pick] += 1
        count_f[rows, pick] += 1
    return phy2log, rank, count


def _inverse_perm(perm_RN: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm_RN)
    np.put_along_axis(inv, perm_RN, np.arange(perm_RN.shape[1]), axis=1)
    return inv


def plan_compat(
    weight_LE: torch.Tensor | np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's hierarchical greedy; ``num_groups = num_nodes = 1`` gives the global policy.

    Arguments are assumed validated. Returns ``(phy2log [L, R], replica_rank [L, R],
    logcnt [L, E])`` as int64 numpy arrays.
    """
    weight = torch.as_tensor(weight_LE).float().cpu()
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_logical // num_nodes
    phy_per_node = num_replicas // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # Step 1: groups -> nodes. The group sums are taken with torch so float32 rounding matches.
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1).numpy()
    node_of_group, rank_in_node = greedy_pack(group_load, num_nodes)
    # Node-major ("mlog") position of every logical expert, and its inverse.
    group_base = (node_of_group * groups_per_node + rank_in_node) * group_size
    log2mlog = (group_base[:, :, None] + np.arange(group_size)).reshape(num_layers, num_logical)
    mlog2log = _inverse_perm(log2mlog)

    # Step 2: replicate within each node; one row per (layer, node).
    weight_np = weight.numpy()
    mlog_load = np.take_along_axis(weight_np, mlog2log, axis=1).reshape(-1, log_per_node)
    phy2mlog, phy_rank, mlog_count = greedy_replicate(mlog_load, phy_per_node)

    # Step 3: replicas -> GPUs within each node.
    replica_load = np.take_along_axis(mlog_load / mlog_count.astype(np.float32), phy2mlog, axis=1)
    gpu_of_phy, rank_on_gpu = greedy_pack(replica_load, num_gpus // num_nodes)
    placed2phy = _inverse_perm(gpu_of_phy * slots_per_gpu + rank_on_gpu)

    placed2mlog = np.take_along_axis(phy2mlog, placed2phy, axis=1)
    node_base = (np.arange(num_nodes) * log_per_node)[None, :, None]
    placed2mlog = (placed2mlog.reshape(num_layers, num_nodes, -1) + node_base).reshape(
        num_layers, -1)
    phy2log = np.take_along_axis(mlog2log, placed2mlog, axis=1)
    replica_rank = np.take_along_axis(phy_rank, placed2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlog_count.reshape(num_layers, -1), log2mlog, axis=1)
    return phy2log, replica_rank, logcnt
