"""Logical-expert <-> physical-slot maps of one MoE layer, and the token-to-slot rule.

A layer has ``num_slots`` physical slots spread evenly over the expert-parallel (EP) ranks:
slot ``s`` lives on EP rank ``s // (num_slots / ep)``. ``phy2log[s]`` is the logical expert
whose weights slot ``s`` holds; every logical expert has at least one slot.

Token-to-slot rule (``slot_choices``): a token routed to logical expert ``e`` on EP rank ``r``
goes to one of the *candidate* slots of ``e`` for ``r``: the replicas of ``e`` on rank ``r``
when there are any (no all-to-all traffic for it), otherwise all replicas of ``e``. Among the
``c`` candidates (in slot order) the token with index ``t`` in the micro-batch takes number
``t % c``: a deterministic round-robin that splits ``e``'s tokens evenly over its candidates.
With uniform traffic from every rank this gives each replica ``load(e) / count(e)``, which is
the model the planner optimizes for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def static_placement(num_logical: int, num_slots: int) -> torch.Tensor:
    """The initial placement: slot ``s`` holds expert ``s % num_logical`` (the planner CLI's
    "before"); with ``num_slots == num_logical`` the identity."""
    if num_slots < num_logical:
        raise ValueError(f"num_slots ({num_slots}) must be >= num_logical ({num_logical})")
    return torch.arange(num_slots, dtype=torch.long) % num_logical


@dataclass(frozen=True)
class ExpertMap:
    """The placement of one layer: ``phy2log [S]``, ``log2phy [E, max_count]`` (slot order,
    padded with -1) and ``logcnt [E]``; all int64 CPU tensors."""

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor

    @classmethod
    def from_phy2log(cls, phy2log, num_logical: int) -> ExpertMap:
        """Build the map from a placement; every expert must have a slot."""
        phy2log = torch.as_tensor(phy2log, dtype=torch.long).cpu().clone()
        if phy2log.dim() != 1:
            raise ValueError(f"phy2log must be 1-D, got shape {tuple(phy2log.shape)}")
        if phy2log.min() < 0 or phy2log.max() >= num_logical:
            raise ValueError(f"phy2log ids must lie in [0, {num_logical})")
        logcnt = torch.bincount(phy2log, minlength=num_logical)
        if (logcnt == 0).any():
            missing = torch.nonzero(logcnt == 0).flatten().tolist()
            raise ValueError(f"logical experts without a slot: {missing}")
        log2phy = torch.full((num_logical, int(logcnt.max())), -1, dtype=torch.long)
        order = torch.argsort(phy2log * len(phy2log) + torch.arange(len(phy2log)))
        start = torch.cumsum(logcnt, 0) - logcnt
        rank = torch.arange(len(phy2log)) - start[phy2log[order]]
        log2phy[phy2log[order], rank] = order
        return cls(phy2log, log2phy, logcnt)

    @property
    def num_slots(self) -> int:
        return len(self.phy2log)

    @property
    def num_logical(self) -> int:
        return len(self.logcnt)

    def canonical(self) -> torch.Tensor:
        """``[E]`` the first (lowest) slot of each expert: the copy that is checkpointed and
        counted once in the gradient norm."""
        return self.log2phy[:, 0].clone()

    def is_identity(self) -> bool:
        return self.num_slots == self.num_logical and bool(
            (self.phy2log == torch.arange(self.num_slots)).all()
        )

    def candidates(self, ep_rank: int, ep_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cand [E, max_count], count [E])``: the slots that tokens on EP rank ``ep_rank``
        use for each expert (its local replicas if any, else all replicas), padded with -1."""
        per_rank = self.num_slots // ep_size
        lo, hi = ep_rank * per_rank, (ep_rank + 1) * per_rank
        valid = self.log2phy >= 0
        local = valid & (self.log2phy >= lo) & (self.log2phy < hi)
        use_local = local.any(dim=1, keepdim=True)
        keep = torch.where(use_local, local, valid)
        count = keep.sum(dim=1)
        # Stable compaction of the kept slots to the front of each row.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        cand = torch.gather(torch.where(keep, self.log2phy, -1), 1, order)
        return cand, count


def slot_choices(cand: torch.Tensor, count: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[T, E]`` the slot that token ``t`` uses for expert ``e``: ``cand[e, t % count[e]]``."""
    device = cand.device
    token = torch.arange(num_tokens, device=device).unsqueeze(1)
    pick = token % count.to(device).unsqueeze(0)
    expert = torch.arange(cand.shape[0], device=device).unsqueeze(0)
    return cand.to(device)[expert, pick]


def to_slots(probs: torch.Tensor, routing_map: torch.Tensor, slots: torch.Tensor,
             num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map logical ``probs``/``routing_map [T, E]`` to physical ``[T, S]``.

    Distinct experts never share a slot, so each row is a scatter without collisions: the values
    are copied exactly, and the gradient of ``probs`` is the matching gather.
    """
    num_tokens = probs.shape[0]
    out_probs = probs.new_zeros(num_tokens, num_slots).scatter(1, slots, probs)
    out_map = routing_map.new_zeros(num_tokens, num_slots).scatter(1, slots, routing_map)
    return out_probs, out_map


def rank_of_slot(slot: int, num_slots: int, ep_size: int) -> int:
    """EP rank that holds physical slot ``slot``."""
    return slot // (num_slots // ep_size)
