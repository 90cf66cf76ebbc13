"""Migration-aware planning: stay within ``tol`` of a fresh plan while moving few slots.

Per layer the target is ``max GPU load <= fresh max / (1 - tol)``, i.e. balancedness at least
``(1 - tol)`` times that of a fresh fast-mode plan for the new loads. Three stages, cheapest first:

1. keep the current placement (its replica counts, new loads) where it already meets the target;
2. otherwise swap pairs of slots inside a domain (node / layer), heaviest GPU first, and stop as
   soon as the domain's heaviest GPU is under the target (2 slots per swap);
3. for domains still over the target, take the fresh plan's content for that domain (hierarchical:
   the fresh node holding the same experts; else the whole layer), with its GPUs matched to the
   current GPUs and every expert kept in its current slot where possible.

Stage 3 meets the target by construction, so the result always does; every logical expert keeps
at least one replica (stages 1-2 keep counts, stage 3 uses a complete plan).
"""

from __future__ import annotations

import numpy as np

from megatron_dualpipe.eplb.placement.planner import Layout, bin_loads, plan_fast, swap_search
from megatron_dualpipe.eplb.placement.report import gpu_loads

DEFAULT_TOL = 0.01


def as_placement(phy2log: object, lay: Layout, name: str = "current_phy2log") -> np.ndarray:
    """Validate a ``[layers, num_replicas]`` placement and return it as int64 numpy."""
    if hasattr(phy2log, "detach"):  # a torch.Tensor
        phy2log = phy2log.detach().cpu().numpy()
    arr = np.asarray(phy2log)
    if arr.shape != (lay.num_layers, lay.num_replicas):
        raise ValueError(f"{name} must have shape {(lay.num_layers, lay.num_replicas)} "
                         f"(layers, num_replicas), got {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and (arr == arr.round()).all()):
        raise ValueError(f"{name} must hold integer logical expert ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= lay.num_logical:
        raise ValueError(f"{name} ids must lie in [0, {lay.num_logical}), "
                         f"got range [{arr.min()}, {arr.max()}]")
    return arr


def _domain_view(current: np.ndarray, lay: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Express ``current`` in fast-mode domain terms.

    Returns ``(dom2log [L, D, E/D], ok_L, domain_of_expert [L, E])``: the experts each domain
    holds (sorted), whether
    the layer's placement fits the policy (every expert present; for the hierarchical policy
    every group on exactly one node, each node holding ``num_groups / num_nodes`` groups).
    """
    num_layers, num_logical, num_domains = lay.num_layers, lay.num_logical, lay.num_domains
    rows = np.repeat(np.arange(num_layers), lay.num_replicas)
    node_of_slot = np.tile(np.arange(lay.num_replicas) // lay.slots_per_domain, num_layers)
    lowest = np.full((num_layers, num_logical), num_domains)
    highest = np.full((num_layers, num_logical), -1)
    np.minimum.at(lowest, (rows, current.ravel()), node_of_slot)
    np.maximum.at(highest, (rows, current.ravel()), node_of_slot)
    ok = (highest >= 0).all(axis=1) & (lowest == highest).all(axis=1)
    if lay.hierarchical:
        per_group = lowest.reshape(num_layers, lay.num_groups, -1)
        ok &= (per_group == per_group[:, :, :1]).all(axis=(1, 2))
        sizes = np.stack([np.bincount(np.minimum(n, num_domains - 1), minlength=num_domains)
                          for n in lowest])
        ok &= (sizes == lay.experts_per_domain).all(axis=1)
    key = np.where(ok[:, None], lowest, 0) * num_logical + np.arange(num_logical)
    dom2log = np.argsort(key, axis=1).reshape(num_layers, num_domains, -1)
    return dom2log, ok, lowest


def _match_bins(new_ids: np.ndarray, old_ids: np.ndarray) -> np.ndarray:
    """``perm [X, B]``: new bin ``perm[x, b]`` should replace old bin ``b`` (max id overlap)."""
    num_rows, num_bins, _ = new_ids.shape
    overlap = np.zeros((num_rows, num_bins, num_bins))
    for j in range(new_ids.shape[2]):
        overlap += (new_ids[:, :, None, j, None] == old_ids[:, None, :, :]).sum(axis=3)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # greedy matching is good enough without scipy
        linear_sum_assignment = None
    perm = np.empty((num_rows, num_bins), np.int64)
    for x in range(num_rows):  # fallback path only
        if linear_sum_assignment is not None:
            new_b, old_b = linear_sum_assignment(overlap[x], maximize=True)
            perm[x, old_b] = new_b
            continue
        score = overlap[x].copy()
        for _ in range(num_bins):
            new_b, old_b = np.unravel_index(score.argmax(), score.shape)
            perm[x, old_b] = new_b
            score[new_b, :] = -1
            score[:, old_b] = -1
    return perm


def _keep_slots(new_bin: np.ndarray, old_bin: np.ndarray) -> np.ndarray:
    """Arrange each row of ``new_bin [X, S]`` so ids also in ``old_bin`` keep their old slot.

    Matching is one-to-one, so repeated ids (unavoidable duplicates) are handled too.
    """
    num_rows, size = new_bin.shape
    rows = np.arange(num_rows)
    old_free = np.ones((num_rows, size), bool)
    new_kept = np.zeros((num_rows, size), bool)
    for j in range(size):
        cand = (old_bin == new_bin[:, j:j + 1]) & old_free
        hit = cand.any(axis=1)
        old_free[rows[hit], cand[hit].argmax(axis=1)] = False
        new_kept[hit, j] = True
    out = old_bin.copy()
    out[old_free] = new_bin[~new_kept]  # equal counts per row, both taken in row-major order
    return out


def align_to_current(new_LR: np.ndarray, current_LR: np.ndarray, lay: Layout) -> np.ndarray:
    """Permute nodes/GPUs/slots of ``new_LR`` (balance unchanged) to reuse current slots."""
    num_layers, spg = new_LR.shape[0], lay.slots_per_gpu
    new_LR = new_LR.copy()
    if lay.hierarchical and lay.num_nodes > 1:  # nodes are interchangeable as a whole
        shape = (num_layers, lay.num_nodes, -1)
        perm = _match_bins(new_LR.reshape(shape), current_LR.reshape(shape))
        new_LR = np.take_along_axis(new_LR.reshape(shape), perm[:, :, None], axis=1)
    # GPUs are interchangeable within a domain (a node, or the whole layer for global).
    rows = num_layers * lay.num_domains
    shape = (rows, lay.gpus_per_domain, spg)
    perm = _match_bins(new_LR.reshape(shape), current_LR.reshape(shape))
    new_RBS = np.take_along_axis(new_LR.reshape(shape), perm[:, :, None], axis=1)
    kept = _keep_slots(new_RBS.reshape(-1, spg), current_LR.reshape(-1, spg))
    return kept.reshape(num_layers, lay.num_replicas)


def plan_migration(weight_LE: np.ndarray, current: object, lay: Layout,
                   tol: float = DEFAULT_TOL) -> np.ndarray:
    """Migration-aware placement ``phy2log [L, R]``; see the module docstring."""
    if not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol}")
    current = as_placement(current, lay)
    num_layers, num_domains = lay.num_layers, lay.num_domains
    fresh = plan_fast(weight_LE, lay)
    target_L = gpu_loads(weight_LE, fresh, lay.num_gpus).max(axis=1) / (1 - tol)

    # Stages 1-2 on layers whose placement fits the policy; counts stay as they are.
    dom2log, ok_L, node_of_expert = _domain_view(current, lay)
    log2local = np.empty((num_layers, lay.num_logical), np.int64)
    np.put_along_axis(log2local, dom2log.reshape(num_layers, -1),
                      np.tile(np.arange(lay.experts_per_domain), num_domains)[None], axis=1)
    flat = current + (np.arange(num_layers) * lay.num_logical)[:, None]
    count = np.bincount(flat.ravel(), minlength=weight_LE.size)
    per_replica = (weight_LE.ravel() / np.maximum(count, 1))[flat]
    shape = (num_layers * num_domains, lay.gpus_per_domain, lay.slots_per_gpu)
    bin_w = per_replica.reshape(shape).copy()
    bin_id = np.take_along_axis(log2local, current, axis=1).reshape(shape)
    target_R = np.repeat(target_L, num_domains)
    usable_R = np.repeat(ok_L, num_domains)
    if lay.dup_avoidable:  # the swap search assumes no repeated expert on a GPU
        srt = np.sort(bin_id, axis=2)
        usable_R &= ~(srt[:, :, 1:] == srt[:, :, :-1]).any(axis=(1, 2))
    rows = np.flatnonzero(usable_R)
    if rows.size:
        w_sub, id_sub = bin_w[rows], bin_id[rows]
        swap_search(w_sub, id_sub, lay.experts_per_domain if lay.dup_avoidable else None,
                    target_R[rows])
        bin_w[rows], bin_id[rows] = w_sub, id_sub
    local = bin_id.reshape(num_layers, num_domains, -1)
    result = np.where(ok_L[:, None], np.take_along_axis(dom2log, local, axis=2).reshape(
        num_layers, -1), current)
    done_R = usable_R & (bin_loads(bin_w).max(axis=1) <= target_R)

    # Stage 3: fresh content, aligned to the current placement.
    if done_R.all():
        return result
    aligned = align_to_current(fresh, current, lay)
    if not lay.hierarchical:
        return np.where(done_R[:, None], result, aligned)
    node_shape = (num_layers, num_domains, -1)
    # A node can take its fresh content alone only if the fresh plan gives it the same experts.
    fresh_node = _domain_view(aligned, lay)[2]
    moved_away = (fresh_node != node_of_expert) & ok_L[:, None]
    changed = np.zeros((num_layers, num_domains + 1), bool)
    changed[np.nonzero(moved_away)[0], node_of_expert[moved_away]] = True
    same_set = ~changed[:, :num_domains] & ok_L[:, None]
    done_LD = done_R.reshape(num_layers, num_domains)
    whole_layer = (~done_LD & ~same_set).any(axis=1)
    take_fresh = (~done_LD | whole_layer[:, None])[:, :, None]
    out = np.where(take_fresh, aligned.reshape(node_shape), result.reshape(node_shape))
    return out.reshape(num_layers, lay.num_replicas)
