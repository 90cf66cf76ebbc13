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
3. Each rank allocates temporaries for the slots it fills (no communication), then all ranks
   agree (an all-reduce of an ok flag) before any communication starts.
4. Payloads for one peer are packed per dtype into one buffer; all sends and receives of the
   EP group go out in one ``torch.distributed.batch_isend_irecv``; local copies are made.
   Everything lands in the temporaries; nothing live is written.
5. A second agreement: only if every rank succeeded are the temporaries copied in place, the
   routers switched to the new placement and the gradient-norm flags updated. On a failure
   before that (on any rank) the temporaries are dropped and the old placement, weights and
   optimizer state are untouched (`RebalanceError`). A rank that dies *inside* a collective
   cannot be recovered from, as with any collective.
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
    """Weights, then per weight its optimizer tensors (sorted keys), of local slot ``j``.

    Collective over the expert-data-parallel group when the optimizer state is sharded.
    """
    out = [param.data.reshape(-1) for _, param in layer.params[j]]
    for _, param in layer.params[j]:
        state = access.read(param)
        out.extend(state[key] for key in sorted(state))
    return out


def _empty_payload(layer: ExpertLayer, access: OptimizerAccess, j: int) -> list[torch.Tensor]:
    """Uninitialized tensors shaped like `slot_payload` of local slot ``j`` (no communication)."""
    out = [torch.empty_like(param.data).reshape(-1) for _, param in layer.params[j]]
    for _, param in layer.params[j]:
        out.extend(torch.empty(numel, dtype=dtype, device=param.device)
                   for _, dtype, numel in access.layout(param))
    return out


def _commit_slot(layer: ExpertLayer, access: OptimizerAccess, j: int,
                 tensors: list[torch.Tensor]) -> None:
    params = layer.params[j]
    for (_, param), value in zip(params, tensors):
        param.data.view(-1).copy_(value)
    rest = tensors[len(params):]
    for _, param in params:
        keys = [key for key, _, _ in access.layout(param)]
        access.write(param, dict(zip(keys, rest[:len(keys)])))
        rest = rest[len(keys):]


def _agree(ok: bool, device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass
class _Staged:
    """This rank's part of a move: temporaries for every slot it fills, and who sends what."""

    fills: list = field(default_factory=list)  # (layer index, local dst slot, temporaries)
    copies: list = field(default_factory=list)  # (layer index, local src slot, temporaries)
    sends: dict = field(default_factory=dict)  # peer EP rank -> [(layer index, local src slot)]
    recvs: dict = field(default_factory=dict)  # peer EP rank -> [temporaries]


def move_experts(layers: list[ExpertLayer], access: OptimizerAccess, new: torch.Tensor,
                 fault=None) -> MoveStats:
    """Move weights and optimizer state to placement ``new [L, S]`` and switch the routers.

    Collective over all ranks (every rank calls it, with its own local layers). Two agreement
    points (all-reduces of an ok flag) bracket the communication: a failure while planning the
    transfer or allocating temporaries, or after the transfer, on any rank, raises
    `RebalanceError` everywhere with nothing changed. ``fault`` is a test hook called with
    ``"before_transfer"`` and ``"before_commit"``.
    """
    stats = MoveStats()
    device = layers[0].router.weight.device if layers else torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    _agree(True, device)  # start together, so the time is the move's, not a wait for planning
    start = time.perf_counter()
    staged = _Staged()
    error = None
    for phase in ("before_transfer", "before_commit"):
        try:
            if phase == "before_transfer":
                staged = _stage(layers, access, _moves(layers, new) if layers else [])
            else:
                stats.bytes_received = _exchange(layers, access, staged)
            if fault is not None:
                fault(phase)
        except Exception as err:  # noqa: BLE001 - any failure aborts the transaction everywhere
            error = err
        if not _agree(error is None, device):
            staged = _Staged()
            where = f"here: {error!r}" if error is not None else "on another rank"
            raise RebalanceError(f"expert move aborted, placement unchanged (failed {where})") \
                from error
    with torch.no_grad():
        for li, j, tensors in staged.fills:
            _commit_slot(layers[li], access, j, tensors)
    for li, layer in enumerate(layers):
        if bool((layer.phy2log != new[li]).any()):
            stats.layers.append(layer.layer_id)
            stats.slots_moved += int((layer.phy2log != new[li]).sum())
            layer.router.set_placement(new[li])
    mark_duplicates(layers, access)
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - start
    return stats


def _stage(layers, access, moves) -> _Staged:
    """Allocate the temporaries and list the transfers of this rank (no communication)."""
    staged = _Staged()
    for move in moves:
        layer = layers[move.layer]
        spr, me = layer.slots_per_rank, layer.ep_rank
        dst_rank, src_rank = move.dst // spr, move.src // spr
        if dst_rank == me:
            j = layer.local_slot(move.dst)
            temps = _empty_payload(layer, access, j)
            staged.fills.append((move.layer, j, temps))
            if src_rank == me:
                staged.copies.append((move.layer, layer.local_slot(move.src), temps))
            else:
                staged.recvs.setdefault(src_rank, []).append(temps)
        elif src_rank == me:
            staged.sends.setdefault(dst_rank, []).append((move.layer, layer.local_slot(move.src)))
    return staged


def _exchange(layers, access, staged: _Staged) -> int:
    """Fill the temporaries: local copies, then one batched P2P round within the EP group.
    Returns the bytes received."""
    for li, j, temps in staged.copies:
        for dst, src in zip(temps, slot_payload(layers[li], access, j)):
            dst.copy_(src)
    ops, unpack, received = [], [], 0
    group = layers[0].router.ep_group if layers else None
    for peer in sorted(staged.sends):
        payload = [t for li, j in staged.sends[peer] for t in slot_payload(layers[li], access, j)]
        for buf in _pack(payload).values():
            ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(group, peer), group))
    for peer in sorted(staged.recvs):
        temps = [t for tensors in staged.recvs[peer] for t in tensors]
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
            t.copy_(buf[offset:offset + t.numel()])
            offset += t.numel()
    return received


def _pack(tensors: list[torch.Tensor], empty: bool = False) -> dict[torch.dtype, torch.Tensor]:
    """One flat buffer per dtype (in first-seen order) holding ``tensors`` in order."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    if empty:
        return {d: torch.empty(sum(t.numel() for t in ts), dtype=d, device=ts[0].device)
                for d, ts in by_dtype.items()}
    return {d: torch.cat(ts) for d, ts in by_dtype.items()}
