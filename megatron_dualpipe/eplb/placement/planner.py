"""EPLB planner: argument validation, policy dispatch and the fast vectorized mode.

The fast mode solves every (layer, domain) row at once with numpy; a domain is a node for the
hierarchical policy and the whole layer for the global one. Python loops run over item *ranks*
(at most the number of slots in a domain) or over improvement rounds, never over layers.
See ``docs/eplb_planner.md`` for the algorithm and how it compares with the DeepSeek greedy.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

POLICIES = ("auto", "hierarchical", "global")
_MAX_SWAP_ROUNDS = 256
# Fresh plans cap the improvement rounds (a fixed number, so every rank computes the same plan):
# 8-GPU nodes converge in ~12 rounds; a 64-GPU global domain keeps improving slowly up to ~100.
_PLAN_SWAP_ROUNDS = 32


@dataclass(frozen=True)
class Layout:
    """Validated problem shape. A *domain* (a node for the hierarchical policy, else the whole
    layer) owns its experts, slots and GPUs; fast-mode planning is independent per domain."""

    num_layers: int
    num_logical: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    hierarchical: bool
    slots_per_gpu: int
    num_domains: int
    gpus_per_domain: int
    experts_per_domain: int
    slots_per_domain: int
    dup_avoidable: bool  # enough distinct experts that no GPU needs two replicas of one


def _check_int(name: str, value: object) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def as_weight_array(weight: object) -> np.ndarray:
    """Return ``weight`` as a float64 ``[layers, experts]`` array, validating it."""
    if hasattr(weight, "detach"):  # a torch.Tensor (this package does not import torch)
        arr = weight.detach().cpu().double().numpy()
    else:
        try:
            arr = np.asarray(weight, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"weight must be numeric: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"weight must be a non-empty 2-D [layers, experts] array, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("weight must be finite (found NaN or inf)")
    if (arr < 0).any():
        raise ValueError("weight must be non-negative")
    return arr


def make_layout(
    shape: tuple[int, int],
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str = "auto",
) -> Layout:
    """Validate sizes and resolve ``policy``; raises ``ValueError`` naming the bad argument."""
    num_layers, num_logical = shape
    num_replicas = _check_int("num_replicas", num_replicas)
    num_groups = _check_int("num_groups", num_groups)
    num_nodes = _check_int("num_nodes", num_nodes)
    num_gpus = _check_int("num_gpus", num_gpus)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_replicas % num_gpus:
        raise ValueError(
            f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_replicas < num_logical:
        raise ValueError(
            f"num_replicas ({num_replicas}) must be >= the number of logical experts "
            f"({num_logical}) so that every expert gets a replica"
        )
    hierarchical = policy == "hierarchical" or (policy == "auto" and num_groups % num_nodes == 0)
    if hierarchical:
        if num_groups % num_nodes:
            raise ValueError(
                f"num_groups ({num_groups}) must be a multiple of num_nodes ({num_nodes}) "
                "for the hierarchical policy"
            )
        if num_logical % num_groups:
            raise ValueError(
                f"num_groups ({num_groups}) must divide the number of logical experts "
                f"({num_logical}) for the hierarchical policy"
            )
    domains = num_nodes if hierarchical else 1
    slots_per_gpu = num_replicas // num_gpus
    return Layout(num_layers, num_logical, num_replicas, num_groups, num_nodes, num_gpus,
                  hierarchical, slots_per_gpu, domains, num_gpus // domains,
                  num_logical // domains, num_replicas // domains,
                  num_logical // domains >= slots_per_gpu)


def build_log2phy(phy2log_LR: np.ndarray, num_logical: int,
                  replica_rank_LR: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(log2phy [L, E, max_count] padded with -1, logcnt [L, E])`` for a placement.

    Replica ``k`` of an expert is its ``k``-th slot in increasing slot order unless
    ``replica_rank_LR`` gives the ranks explicitly (compat mode keeps DeepSeek's ranks).
    """
    num_layers, num_replicas = phy2log_LR.shape
    flat_LR = phy2log_LR + (np.arange(num_layers) * num_logical)[:, None]
    logcnt = np.bincount(flat_LR.ravel(), minlength=num_layers * num_logical)
    if replica_rank_LR is None:
        slot_base = (np.arange(num_layers) * num_replicas)[:, None]
        if num_logical < 2**15:  # a stable sort of int16 keys is a fast radix sort
            order = np.argsort(phy2log_LR.astype(np.int16), axis=1, kind="stable")
        else:
            order = np.argsort(phy2log_LR * num_replicas + np.arange(num_replicas), axis=1)
        order = (order + slot_base).ravel()
        start = np.cumsum(logcnt.reshape(num_layers, -1), axis=1).ravel() - logcnt
        rank = np.empty(num_layers * num_replicas, np.int64)
        rank[order] = np.tile(np.arange(num_replicas), num_layers) - start[flat_LR.ravel()[order]]
        replica_rank_LR = rank.reshape(num_layers, num_replicas)
    max_count = int(logcnt.max())
    log2phy = np.full(num_layers * num_logical * max_count, -1, np.int64)
    log2phy[(flat_LR * max_count + replica_rank_LR).ravel()] = np.tile(
        np.arange(num_replicas), num_layers)
    return (log2phy.reshape(num_layers, num_logical, max_count),
            logcnt.reshape(num_layers, num_logical))


# --------------------------------------------------------------------------- fast mode pieces


def replica_counts(weight_RE: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    """Replica count per expert minimizing the largest per-replica load, each in ``[1, cap]``.

    DeepSeek's greedy gives replicas one at a time to the expert with the largest
    ``load / count``; since each expert's sequence ``w / 1, w / 2, ...`` decreases, it hands out
    exactly the ``num_slots - E`` largest of those values. We find (almost) the cut-off value by a
    vectorized geometric bisection and finish the last few picks greedily.
    """
    num_rows, num_experts = weight_RE.shape
    extra = num_slots - num_experts
    kmax = min(cap - 1, extra)
    if kmax <= 0:
        return np.ones((num_rows, num_experts), np.int64)
    base = np.zeros((num_rows, num_experts))
    if extra > 16:
        total = weight_RE.sum(axis=1)
        # Without the cap the cut-off lies in [W / (extra + E), W / extra].
        lo, hi = total / (extra + num_experts), total / extra

        def picks(cut):
            safe = np.where(cut > 0, cut, 1.0)[:, None]
            return np.minimum(kmax, np.floor(weight_RE / safe))

        lo = np.where(picks(lo).sum(axis=1) >= extra, lo, 0.0)  # the cap can push it lower
        for _ in range(10):
            mid = np.where(lo > 0, np.sqrt(lo * hi), 0.5 * hi)
            over = picks(mid).sum(axis=1) > extra
            lo, hi = np.where(over, mid, lo), np.where(over, hi, mid)
        base = np.where((hi > 0)[:, None], picks(hi), 0.0)
    count = 1 + base.astype(np.int64)
    left = extra - (count.sum(axis=1) - num_experts)
    score = np.where(count <= kmax, weight_RE / count, -1.0)
    flat_score, flat_count, flat_w = score.reshape(-1), count.reshape(-1), weight_RE.reshape(-1)
    for step in range(int(left.max())):
        live = np.flatnonzero(left > step)
        pick = (score if live.size == num_rows else score[live]).argmax(axis=1)
        pick += live * num_experts
        flat_count[pick] += 1
        flat_score[pick] = np.where(flat_count[pick] <= kmax, flat_w[pick] / flat_count[pick], -1.0)
    return count


def rounds_pack(item_w_RN: np.ndarray, item_id_RN: np.ndarray, num_bins: int,
                avoid_dup: bool) -> tuple[np.ndarray, np.ndarray]:
    """Heaviest-first packing into ``num_bins`` equal-size bins, one round per bin slot.

    Items must come sorted heaviest first. Round ``k`` gives the ``k``-th block of ``num_bins``
    items to the bins, heaviest item to the currently lightest bin; rows are processed together.

    With ``avoid_dup`` the items of one id must form one contiguous run of at most ``num_bins``
    items, so a run lies in one round or straddles two. Within a round every bin gets one item,
    so the only possible clash is a run crossing into round ``k``: its head items go to the
    lightest bins that do not hold the id yet, the rest of the round to the remaining bins by
    load. The result is duplicate-free by construction. Returns ``(bin_w, bin_id)``, ``[R, B, S]``.
    """
    num_rows, num_items = item_w_RN.shape
    size = num_items // num_bins
    w_RSB = item_w_RN.reshape(num_rows, size, num_bins)
    id_RSB = item_id_RN.reshape(num_rows, size, num_bins)
    bin_w = np.empty((num_rows * num_bins, size))
    bin_id = np.empty((num_rows * num_bins, size), np.int64)
    load = np.zeros((num_rows, num_bins))
    flat_load = load.reshape(-1)
    base = (np.arange(num_rows) * num_bins)[:, None]
    ranks = np.arange(num_bins)
    for k in range(size):
        key = load
        if avoid_dup and k:
            first = id_RSB[:, k, :1]
            held = bin_id.reshape(num_rows, num_bins, size)
            holds = held[:, :, 0] == first
            for j in range(1, k):
                holds |= held[:, :, j] == first
            if holds.any():
                head = (id_RSB[:, k, :] == first).sum(axis=1, keepdims=True)
                lift = load.max(axis=1, keepdims=True) + 1.0
                free_first = np.argsort(load + holds * lift, axis=1, kind="stable")
                is_head = np.empty(num_rows * num_bins, bool)
                is_head[(free_first + base).ravel()] = np.broadcast_to(ranks < head,
                                                                       free_first.shape).ravel()
                key = load - is_head.reshape(num_rows, num_bins) * lift
        dest = (np.argsort(key, axis=1, kind="stable") + base).ravel()
        bin_w[dest, k] = w_RSB[:, k].ravel()
        bin_id[dest, k] = id_RSB[:, k].ravel()
        flat_load[dest] += w_RSB[:, k].ravel()
    shape = (num_rows, num_bins, size)
    return bin_w.reshape(shape), bin_id.reshape(shape)


def bin_loads(bin_w: np.ndarray) -> np.ndarray:
    """Sum over the (short) last axis; much faster than ``.sum(-1)`` for a handful of slots."""
    load = bin_w[..., 0].copy()
    for j in range(1, bin_w.shape[-1]):
        load += bin_w[..., j]
    return load


def swap_search(bin_w: np.ndarray, bin_id: np.ndarray, num_ids: int | None,
                target_R: np.ndarray | None = None, max_rounds: int = _MAX_SWAP_ROUNDS) -> int:
    """Lower each row's heaviest bin by swapping one of its items with an item of another bin.

    Per round and row, the swap minimizing ``max(new load of the heaviest bin, new load of the
    partner bin)`` is applied if that is below the current maximum and, when ``num_ids`` is
    given (ids in ``[0, num_ids)``), puts no second copy of an id into a bin. A row stops when
    there is no such swap, or once its maximum is ``<= target_R[row]``. Works in place on
    ``bin_w`` / ``bin_id`` (``[R, B, S]``); returns the number of rounds used.
    """
    num_rows, num_bins, size = bin_w.shape
    load_all = bin_loads(bin_w)
    held = None
    if num_ids is not None:
        held = np.zeros((num_rows, num_ids, num_bins), bool)
        held[np.arange(num_rows)[:, None, None], bin_id, np.arange(num_bins)[:, None]] = True
    buf_delta = np.empty((num_rows, size, num_bins * size))
    buf_hi, buf_bad = np.empty_like(buf_delta), np.empty(buf_delta.shape, bool)
    active = np.arange(num_rows)
    rounds = 0
    while active.size and rounds < max_rounds:
        rounds += 1
        load = load_all[active]
        top = load.argmax(axis=1)
        top_load = load.max(axis=1)
        if target_R is not None:
            keep = top_load > target_R[active]
            if not keep.all():
                active, load, top, top_load = active[keep], load[keep], top[keep], top_load[keep]
            if not active.size:
                break
        num = active.size
        w_a, id_a = bin_w[active, top], bin_id[active, top]  # [k, S]
        # Candidates as [k, S(a), B * S(b)] in reused buffers: a long innermost axis keeps numpy's
        # loops fast, and no fresh large temporaries means no page faults per round.
        delta, hi, bad = buf_delta[:num], buf_hi[:num], buf_bad[:num]
        np.subtract(w_a[:, :, None], bin_w[active].reshape(num, 1, -1), out=delta)
        top3 = top_load[:, None, None]
        np.subtract(top3, delta, out=hi)
        np.add(delta, np.repeat(load, size, axis=1)[:, None, :], out=delta)
        # hi < top_load implies 0 < delta < top_load - load_b, so the partner cannot be `top`.
        np.maximum(hi, delta, out=hi)
        np.greater_equal(hi, top3 * (1 - 1e-12), out=bad)
        if held is not None:
            bad |= np.repeat(held[active[:, None], id_a], size, axis=2)  # a's id in partner
            id_b = bin_id[active].reshape(num, -1)
            bad |= held[active[:, None], id_b, top[:, None]][:, None, :]  # b's id in top bin
        np.copyto(hi, np.inf, where=bad)
        flat_hi = hi.reshape(num, -1)
        best = flat_hi.argmin(axis=1)
        found = np.isfinite(flat_hi[np.arange(num), best])
        if not found.any():
            break
        if not found.all():
            active, best, top = active[found], best[found], top[found]
        slot_a, rest = np.divmod(best, num_bins * size)
        bin_b, slot_b = np.divmod(rest, size)
        w_a, id_a = bin_w[active, top, slot_a], bin_id[active, top, slot_a]
        w_b, id_b = bin_w[active, bin_b, slot_b], bin_id[active, bin_b, slot_b]
        bin_w[active, top, slot_a], bin_id[active, top, slot_a] = w_b, id_b
        bin_w[active, bin_b, slot_b], bin_id[active, bin_b, slot_b] = w_a, id_a
        load_all[active, top] += w_b - w_a
        load_all[active, bin_b] += w_a - w_b
        if held is not None:
            held[active, id_a, top] = False
            held[active, id_b, bin_b] = False
            held[active, id_a, bin_b] = True
            held[active, id_b, top] = True
    return rounds


def pack_replicas(weight_RE: np.ndarray, count_RE: np.ndarray, num_bins: int, avoid_dup: bool,
                  target_R: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Place ``count_RE[r, e]`` replicas of each expert (load ``w / count`` each) into bins."""
    num_rows, num_experts = weight_RE.shape
    per_replica = weight_RE / count_RE
    # Sorting experts and then expanding replicas keeps each expert's replicas contiguous.
    order = np.argsort(-per_replica, axis=1)
    flat = (order + (np.arange(num_rows) * num_experts)[:, None]).ravel()
    flat = np.repeat(flat, count_RE.ravel()[flat])
    item_id = flat.reshape(num_rows, -1) % num_experts
    item_w = per_replica.ravel()[flat].reshape(num_rows, -1)
    bin_w, bin_id = rounds_pack(item_w, item_id, num_bins, avoid_dup)
    swap_search(bin_w, bin_id, num_experts if avoid_dup else None, target_R, _PLAN_SWAP_ROUNDS)
    return bin_w, bin_id


def domain_experts(weight_LE: np.ndarray, lay: Layout) -> np.ndarray:
    """``dom2log [L, D, E/D]``: the logical experts owned by each domain (node or whole layer)."""
    num_layers, num_logical = weight_LE.shape
    if not lay.hierarchical:
        return np.broadcast_to(np.arange(num_logical), (num_layers, 1, num_logical))
    group_size = num_logical // lay.num_groups
    per_node = lay.num_groups // lay.num_nodes
    if per_node == 1:
        group_of_slot = np.broadcast_to(np.arange(lay.num_groups), (num_layers, lay.num_groups))
    else:
        group_load = weight_LE.reshape(num_layers, lay.num_groups, group_size).sum(axis=2)
        order = np.argsort(-group_load, axis=1)
        bin_w, bin_id = rounds_pack(np.take_along_axis(group_load, order, axis=1), order,
                                    lay.num_nodes, False)
        swap_search(bin_w, bin_id, None)
        group_of_slot = bin_id.reshape(num_layers, lay.num_groups)
    experts = group_of_slot[:, :, None] * group_size + np.arange(group_size)
    return experts.reshape(num_layers, lay.num_nodes, -1)


def plan_fast(weight_LE: np.ndarray, lay: Layout) -> np.ndarray:
    """Fast-mode placement ``phy2log [L, R]`` (int64) for validated inputs."""
    num_layers, num_domains = weight_LE.shape[0], lay.num_domains
    dom2log = domain_experts(weight_LE, lay)
    weight_RE = np.take_along_axis(weight_LE, dom2log.reshape(num_layers, -1), axis=1).reshape(
        num_layers * num_domains, lay.experts_per_domain)
    # More replicas than GPUs would force two onto one GPU; with enough experts it is avoidable.
    cap = lay.gpus_per_domain if lay.dup_avoidable else lay.slots_per_domain
    count_RE = replica_counts(weight_RE, lay.slots_per_domain, cap)
    # No placement of this layer can beat its lower bound, so a domain (node) whose heaviest GPU
    # is already below it is left alone: that keeps the search on the domains that matter.
    lower = np.maximum(weight_RE.sum(axis=1) / lay.gpus_per_domain,
                       (weight_RE / count_RE).max(axis=1)).reshape(num_layers, num_domains)
    target_R = np.repeat(lower.max(axis=1) * (1 + 1e-3), num_domains)
    _, bin_id = pack_replicas(weight_RE, count_RE, lay.gpus_per_domain, lay.dup_avoidable,
                              target_R)
    local = bin_id.reshape(num_layers, num_domains, -1)
    return np.take_along_axis(dom2log, local, axis=2).reshape(num_layers, lay.num_replicas)
