"""Live rebalance: plan a new placement and move expert weights and optimizer state.

`plan(layers, loads, ...)` asks the planner for a placement per layer and keeps it only where
the planner's balancedness gain reaches ``min_gain``.

`move_experts(layers, access, new_phy2log)` is a transaction run between optimizer steps:

1. Every slot whose logical expert changes gets a *source*: a slot holding that expert under
   the old placement, on the same EP rank when possible (a local copy), else replica
   ``k % count`` (``k`` counts the moves of that expert, spreading the sends).
2. For each moved slot the payload is: every expert weight, then per weight the optimizer's
   full flat tensors (fp32 main param where it is not the weight itself, Adam ``exp_avg``,
   ``exp_avg_sq``, ``step``) in sorted key order. Both ends derive the same list.
3. Payloads for one peer are packed per dtype into one buffer; all sends and receives of the
   EP group go out in one ``torch.distributed.batch_isend_irecv``. Received data and local
   copies land in *temporaries*; nothing live is written.
4. All ranks agree (an all-reduce of an ok flag) that every step succeeded; only then the
   temporaries are copied in place, the routers switch to the new placement and the gradient
   norm flags follow. On any failure before that, the temporaries are dropped and the old
   placement, weights and optimizer state are untouched (`RebalanceError`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_dualpipe.eplb.mapping import rank_of_slot
from megatron_dualpipe.eplb.replicas import ExpertLayer, OptimizerAccess, mark_duplicates


class RebalanceError(RuntimeError):
    """The move failed on some rank; the old placement is intact everywhere."""


@dataclass
class Plan:
    """Placements ``[L, S]`` before and after, and the planner's balancedness per layer."""

    old: torch.Tensor
    new: torch.Tensor
    balancedness_before: torch.Tensor
    balancedness_after: torch.Tensor

    @property
    def changed(self) -> torch.Tensor:
        """``[L]`` whether the layer's placement changes."""
        return (self.old != self.new).any(dim=1)


@dataclass
class MoveStats:
    slots_moved: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    layers: list[int] = field(default_factory=list)


def plan(layers: list[ExpertLayer], loads: torch.Tensor, *, num_groups: int, num_nodes: int,
         policy: str = "auto", migration_aware: bool = True, min_gain: float = 0.0,
         force: bool = False) -> Plan:
    """Plan every local layer from ``loads [L, E]``; a layer keeps its placement unless the
    planned balancedness beats the current one by ``min_gain`` (or ``force``)."""
    from megatron_dualpipe.eplb import rebalance_experts, report

    old = torch.stack([layer.phy2log for layer in layers])
    ep = layers[0].ep_size
    weight = loads.to(torch.float64).clamp_min(0)
    if float(weight.sum()) == 0:
        weight = torch.ones_like(weight)
    new, _, _ = rebalance_experts(
        weight, old.shape[1], num_groups, num_nodes, ep, mode="fast", policy=policy,
        current_phy2log=old if migration_aware else None)
    before = torch.as_tensor(report(weight, old, ep, num_nodes).balancedness)
    after = torch.as_tensor(report(weight, new, ep, num_nodes).balancedness)
    keep = (after - before < min_gain) & (not force)
    new = torch.where(keep.unsqueeze(1), old, new)
    return Plan(old, new, before, torch.where(keep, before, after))


@dataclass
class _Move:
    layer: int  # index into the local layer list
    dst: int  # global slot that receives
    src: int  # global slot that sends (holds the expert under the old placement)


def _moves(layers: list[ExpertLayer], new: torch.Tensor) -> list[_Move]:
    moves = []
    for li, layer in enumerate(layers):
        old = layer.phy2log
        spr, num_slots, ep = layer.slots_per_rank, layer.num_slots, layer.ep_size
        sent = {}
        for dst in torch.nonzero(old != new[li]).flatten().tolist():
            expert = int(new[li, dst])
            holders = torch.nonzero(old == expert).flatten().tolist()
            local = [s for s in holders if s // spr == dst // spr]
            k = sent.get(expert, 0)
            sent[expert] = k + 1
            src = local[0] if local else holders[k % len(holders)]
            assert rank_of_slot(src, num_slots, ep) == src // spr
            moves.append(_Move(li, dst, src))
    return moves


def slot_payload(layer: ExpertLayer, access: OptimizerAccess, j: int) -> list[torch.Tensor]:
    """Weights, then per weight its optimizer tensors (sorted keys), of local slot ``j``."""
    out = [param.data.reshape(-1) for _, param in layer.params[j]]
    for _, param in layer.params[j]:
        state = access.read(param)
        out.extend(state[key] for key in sorted(state))
    return out


def _commit_slot(layer: ExpertLayer, access: OptimizerAccess, j: int,
                 tensors: list[torch.Tensor]) -> None:
    params = layer.params[j]
    for (_, param), value in zip(params, tensors):
        param.data.view(-1).copy_(value)
    rest = tensors[len(params):]
    for _, param in params:
        keys = sorted(access.read(param))
        access.write(param, dict(zip(keys, rest[:len(keys)])))
        rest = rest[len(keys):]


def _agree(ok: bool, device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def move_experts(layers: list[ExpertLayer], access: OptimizerAccess, new: torch.Tensor,
                 fault=None) -> MoveStats:
    """Move weights and optimizer state to placement ``new [L, S]`` and switch the routers.

    Collective over all ranks (every rank calls it, with its own local layers). ``fault`` is a
    test hook called with ``"before_transfer"`` and ``"before_commit"``; an exception there (or
    anywhere before the commit, on any rank) raises `RebalanceError` with nothing changed.
    """
    start = time.perf_counter()
    stats = MoveStats()
    device = layers[0].router.weight.device if layers else torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    staged: list[tuple[int, int, list[torch.Tensor]]] = []  # (layer, local dst, tensors)
    error = None
    try:
        moves = _moves(layers, new) if layers else []
        if fault is not None:
            fault("before_transfer")
        staged, stats.bytes_received = _transfer(layers, access, moves)
        if fault is not None:
            fault("before_commit")
    except Exception as err:  # noqa: BLE001 - any failure aborts the transaction everywhere
        error = err
    if not _agree(error is None, device):
        staged.clear()
        where = f"here: {error!r}" if error is not None else "on another rank"
        raise RebalanceError(f"expert move aborted, placement unchanged (failed {where})") \
            from error
    with torch.no_grad():
        for li, j, tensors in staged:
            _commit_slot(layers[li], access, j, tensors)
    for li, layer in enumerate(layers):
        if bool((layer.phy2log != new[li]).any()):
            stats.layers.append(layer.layer_id)
            stats.slots_moved += int((layer.phy2log != new[li]).sum())
            layer.router.set_placement(new[li])
    mark_duplicates(layers, access)
    stats.seconds = time.perf_counter() - start
    return stats


def _transfer(layers, access, moves) -> tuple[list, int]:
    """Fetch every payload this rank needs into temporaries (batched P2P within EP groups)."""
    staged, sends, recvs = [], {}, {}
    for move in moves:
        layer = layers[move.layer]
        spr = layer.slots_per_rank
        dst_rank, src_rank = move.dst // spr, move.src // spr
        me = layer.ep_rank
        if src_rank == me and dst_rank == me:
            payload = slot_payload(layer, access, layer.local_slot(move.src))
            staged.append((move.layer, layer.local_slot(move.dst), [t.clone() for t in payload]))
        elif src_rank == me:
            sends.setdefault(dst_rank, []).append((layer, slot_payload(layer, access,
                                                                   layer.local_slot(move.src))))
        elif dst_rank == me:
            j = layer.local_slot(move.dst)
            like = slot_payload(layer, access, j)
            temps = [torch.empty_like(t) for t in like]
            staged.append((move.layer, j, temps))
            recvs.setdefault(src_rank, []).append((layer, temps))
    ops, unpack = [], []
    group = layers[0].router.ep_group if layers else None
    for peer in sorted(sends):
        for buf in _pack([t for _, payload in sends[peer] for t in payload]).values():
            ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(group, peer), group))
    received = 0
    for peer in sorted(recvs):
        temps = [t for _, tensors in recvs[peer] for t in tensors]
        for dtype, buf in _pack(temps, empty=True).items():
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
            unpack.append((buf, [t for t in temps if t.dtype == dtype]))
            received += buf.numel() * buf.element_size()
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for buf, temps in unpack:
        offset = 0
        for t in temps:
            t.view(-1).copy_(buf[offset:offset + t.numel()])
            offset += t.numel()
    return staged, received


def _pack(tensors: list[torch.Tensor], empty: bool = False) -> dict[torch.dtype, torch.Tensor]:
    """One flat buffer per dtype (in first-seen order) holding ``tensors`` in order."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    if empty:
        return {d: torch.empty(sum(t.numel() for t in ts), dtype=d, device=ts[0].device)
                for d, ts in by_dtype.items()}
    return {d: torch.cat(ts) for d, ts in by_dtype.items()}
