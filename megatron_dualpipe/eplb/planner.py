"""EPLB planner: argument validation, policy dispatch and the fast vectorized mode.

The fast mode solves every (layer, domain) row at once with numpy; a domain is a node for the
hierarchical policy and the whole layer for the global one. Python loops run over item *ranks*
(at most the number of slots in a domain) or over improvement rounds, never over layers.
See ``docs/eplb_planner.md`` for the algorithm and why it balances at least as well as the
DeepSeek greedy.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch

from megatron_dualpipe.eplb.compat import plan_compat

MODES = ("fast", "compat")
POLICIES = ("auto", "hierarchical", "global")
_MAX_SWAP_ROUNDS = 256
_MAX_PARTNERS = 16


@dataclass(frozen=True)
class Layout:
    """Validated problem shape. A *domain* is the unit that owns its experts and slots."""

    num_layers: int
    num_logical: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    hierarchical: bool

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    @property
    def num_domains(self) -> int:
        return self.num_nodes if self.hierarchical else 1

    @property
    def gpus_per_domain(self) -> int:
        return self.num_gpus // self.num_domains

    @property
    def experts_per_domain(self) -> int:
        return self.num_logical // self.num_domains

    @property
    def slots_per_domain(self) -> int:
        return self.num_replicas // self.num_domains

    @property
    def dup_avoidable(self) -> bool:
        """True when no GPU ever needs two replicas of one expert (enough distinct experts)."""
        return self.experts_per_domain >= self.slots_per_gpu


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
    if isinstance(weight, torch.Tensor):
        arr = weight.detach().to("cpu", torch.float64).numpy()
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
    """Validate the problem sizes and resolve ``policy``; raises ``ValueError`` naming the argument."""
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
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
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
    return Layout(num_layers, num_logical, num_replicas, num_groups, num_nodes, num_gpus,
                  hierarchical)


def build_log2phy(phy2log_LR: np.ndarray, num_logical: int,
                  replica_rank_LR: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(log2phy [L, E, max_count] padded with -1, logcnt [L, E])`` for a placement.

    Replica ``k`` of an expert is its ``k``-th slot in increasing slot order unless
    ``replica_rank_LR`` gives the ranks explicitly (compat mode keeps DeepSeek's ranks).
    """
    num_layers, num_replicas = phy2log_LR.shape
    flat = phy2log_LR + (np.arange(num_layers) * num_logical)[:, None]
    logcnt = np.bincount(flat.ravel(), minlength=num_layers * num_logical).reshape(
        num_layers, num_logical)
    if replica_rank_LR is None:
        order = np.argsort(phy2log_LR, axis=1, kind="stable")
        start = np.cumsum(logcnt, axis=1) - logcnt  # first sorted position of each expert
        sorted_ids = np.take_along_axis(phy2log_LR, order, axis=1)
        rank_sorted = np.arange(num_replicas) - np.take_along_axis(start, sorted_ids, axis=1)
        replica_rank_LR = np.empty_like(phy2log_LR)
        np.put_along_axis(replica_rank_LR, order, rank_sorted, axis=1)
    max_count = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical * max_count), -1, np.int64)
    np.put_along_axis(log2phy, phy2log_LR * max_count + replica_rank_LR,
                      np.broadcast_to(np.arange(num_replicas), phy2log_LR.shape), axis=1)
    return log2phy.reshape(num_layers, num_logical, max_count), logcnt


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

    Items are sorted by load; round ``k`` gives the ``k``-th block of ``num_bins`` items to the
    bins, heaviest item to the currently lightest bin. Rows are processed together.

    With ``avoid_dup`` the items of one id must be contiguous in ``item_id_RN`` and at most
    ``num_bins`` long; after the (stable) sort each id then occupies a contiguous run that lies in
    one round or straddles two. Within a round every bin gets one item, so the only possible
    clash is the run crossing into round ``k``: its head items are sent to the lightest bins that
    do not hold the id yet, the rest of the round to the remaining bins by load. The result is
    duplicate-free by construction. Returns ``(bin_w [R, B, S], bin_id [R, B, S])``.
    """
    num_rows, num_items = item_w_RN.shape
    size = num_items // num_bins
    order = np.argsort(-item_w_RN, axis=1, kind="stable")
    w_RSB = np.take_along_axis(item_w_RN, order, axis=1).reshape(num_rows, size, num_bins)
    id_RSB = np.take_along_axis(item_id_RN, order, axis=1).reshape(num_rows, size, num_bins)
    bin_w = np.empty((num_rows, num_bins, size))
    bin_id = np.empty((num_rows, num_bins, size), np.int64)
    load = np.zeros((num_rows, num_bins))
    rows = np.arange(num_rows)[:, None]
    ranks = np.arange(num_bins)
    for k in range(size):
        key = load
        if avoid_dup and k:
            first = id_RSB[:, k, :1]
            holds = bin_id[:, :, 0] == first
            for j in range(1, k):
                holds |= bin_id[:, :, j] == first
            if holds.any():
                head = (id_RSB[:, k, :] == first).sum(axis=1, keepdims=True)
                lift = load.max(axis=1, keepdims=True) + 1.0
                free_first = np.argsort(load + holds * lift, axis=1, kind="stable")
                is_head = np.empty((num_rows, num_bins), bool)
                np.put_along_axis(is_head, free_first, ranks < head, axis=1)
                key = load - is_head * lift
        bins = np.argsort(key, axis=1, kind="stable")
        bin_w[rows, bins, k] = w_RSB[:, k]
        bin_id[rows, bins, k] = id_RSB[:, k]
        load[rows, bins] += w_RSB[:, k]
    return bin_w, bin_id


def bin_loads(bin_w: np.ndarray) -> np.ndarray:
    """Sum over the (short) last axis; much faster than ``.sum(-1)`` for a handful of slots."""
    load = bin_w[..., 0].copy()
    for j in range(1, bin_w.shape[-1]):
        load += bin_w[..., j]
    return load


def _any_equal(ids_XS: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """``(ids_XS == probe[..., None]).any(-1)`` without a slow reduction over a short axis."""
    out = ids_XS[..., 0] == probe
    for j in range(1, ids_XS.shape[-1]):
        out |= ids_XS[..., j] == probe
    return out


def swap_search(bin_w: np.ndarray, bin_id: np.ndarray, avoid_dup: bool,
                target_R: np.ndarray | None = None, max_rounds: int = _MAX_SWAP_ROUNDS,
                moved: np.ndarray | None = None, max_partners: int = _MAX_PARTNERS) -> int:
    """Lower each row's heaviest bin by swapping one of its items with an item of another bin.

    Per round and row, among the ``max_partners`` lightest bins, the swap minimizing ``max(new
    load of the heaviest bin, new load of the partner)`` is applied if it is below the current
    maximum and (``avoid_dup``) puts no second copy of an id into a bin. A row stops when there is
    no such swap, or once its maximum is ``<= target_R[row]``. Works in place; sets ``moved``
    (bool ``[R, B, S]``, optional) where a slot's content changed. Returns the rounds used.
    """
    num_rows, num_bins, size = bin_w.shape
    num_partners = min(max_partners, num_bins)
    load_all = bin_loads(bin_w)
    active = np.arange(num_rows)
    rounds = 0
    while active.size and rounds < max_rounds:
        rounds += 1
        load = load_all[active]
        top = load.argmax(axis=1)
        top_load = np.take_along_axis(load, top[:, None], axis=1)[:, 0]
        if target_R is not None:
            keep = top_load > target_R[active]
            active, load, top, top_load = active[keep], load[keep], top[keep], top_load[keep]
            if not active.size:
                break
        if num_partners < num_bins:
            part = np.argpartition(load, num_partners - 1, axis=1)[:, :num_partners]
        else:
            part = np.broadcast_to(np.arange(num_bins), load.shape)
        w_a, id_a = bin_w[active, top], bin_id[active, top]  # [k, S]
        w_b, id_b = bin_w[active[:, None], part], bin_id[active[:, None], part]  # [k, M, S]
        load_b = np.take_along_axis(load, part, axis=1)
        delta = w_a[:, :, None, None] - w_b[:, None]  # [k, S(a), M, S(b)]
        limit = (top_load * (1 - 1e-12))[:, None, None, None]
        # hi < limit implies 0 < delta < top_load - load_b, so the partner cannot be `top`.
        hi = np.maximum(top_load[:, None, None, None] - delta, load_b[:, None, :, None] + delta)
        bad = hi >= limit
        if avoid_dup:
            bad |= _any_equal(id_b[:, None], id_a[:, :, None])[..., None]  # a's id in partner
            bad |= _any_equal(id_a[:, None, None], id_b)[:, None]  # b's id in the top bin
        hi[bad] = np.inf
        best = hi.reshape(active.size, -1).argmin(axis=1)
        found = np.isfinite(hi.reshape(active.size, -1)[np.arange(active.size), best])
        if not found.any():
            break
        active, best, top, part = active[found], best[found], top[found], part[found]
        slot_a, rest = np.divmod(best, num_partners * size)
        pidx, slot_b = np.divmod(rest, size)
        bin_b = part[np.arange(active.size), pidx]
        delta = bin_w[active, top, slot_a] - bin_w[active, bin_b, slot_b]
        _apply_swaps(bin_w, bin_id, active, top, slot_a, bin_b, slot_b)
        load_all[active, top] -= delta
        load_all[active, bin_b] += delta
        if moved is not None:
            moved[active, top, slot_a] = True
            moved[active, bin_b, slot_b] = True
    return rounds


def _apply_swaps(bin_w, bin_id, rows, bin_a, slot_a, bin_b, slot_b):
    w_a, id_a = bin_w[rows, bin_a, slot_a], bin_id[rows, bin_a, slot_a]
    bin_w[rows, bin_a, slot_a] = bin_w[rows, bin_b, slot_b]
    bin_id[rows, bin_a, slot_a] = bin_id[rows, bin_b, slot_b]
    bin_w[rows, bin_b, slot_b] = w_a
    bin_id[rows, bin_b, slot_b] = id_a


def pack_replicas(weight_RE: np.ndarray, count_RE: np.ndarray, num_bins: int, avoid_dup: bool,
                  target_R: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Place ``count_RE[r, e]`` replicas of each expert (load ``w / count`` each) into bins."""
    num_rows, num_experts = weight_RE.shape
    flat_ids = np.repeat(np.arange(num_rows * num_experts), count_RE.ravel())
    item_id = flat_ids.reshape(num_rows, -1) % num_experts  # expert-contiguous, as required
    item_w = np.take_along_axis(weight_RE / count_RE, item_id, axis=1)
    bin_w, bin_id = rounds_pack(item_w, item_id, num_bins, avoid_dup)
    swap_search(bin_w, bin_id, avoid_dup, target_R)
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
        group_ids = np.broadcast_to(np.arange(lay.num_groups), group_load.shape)
        bin_w, bin_id = rounds_pack(group_load, group_ids, lay.num_nodes, False)
        swap_search(bin_w, bin_id, False)
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
    target_R = np.repeat(lower.max(axis=1) * (1 + 1e-9), num_domains)
    _, bin_id = pack_replicas(weight_RE, count_RE, lay.gpus_per_domain, lay.dup_avoidable,
                              target_R)
    local = bin_id.reshape(num_layers, num_domains, -1)
    return np.take_along_axis(dom2log, local, axis=2).reshape(num_layers, lay.num_replicas)


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
        mode: ``"fast"`` (vectorized, duplicate-free, balances at least as well as the greedy)
            or ``"compat"`` (bit-exact DeepSeek greedy).
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
        from megatron_dualpipe.eplb.migration import plan_migration

        phy2log = plan_migration(weight_LE, current_phy2log, lay)
    else:
        phy2log = plan_fast(weight_LE, lay)
    log2phy, logcnt = build_log2phy(phy2log, lay.num_logical, rank)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)

