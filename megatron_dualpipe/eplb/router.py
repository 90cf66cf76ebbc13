"""`EPLBRouter`: Megatron's `TopKRouter` over logical experts, emitting physical slots.

Megatron builds the router with the layer's config, whose ``num_moe_experts`` is the number of
physical slots (logical experts + redundant replicas). The router keeps its gate weight,
``expert_bias``, ``local_tokens_per_expert`` (the aux-loss-free bias update) and all routing
math (scores, top-k, group limits, aux losses) over the *logical* experts, by giving the parent
class a copy of the config with ``num_moe_experts = num_logical``. After routing, every
(token, logical expert) pair is mapped to one physical slot (see `mapping.py` for the rule), so
the token dispatcher and the experts work on slots. With the identity placement (no redundant
experts, nothing moved) the outputs are Megatron's, bit for bit.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_dualpipe.eplb.mapping import ExpertMap, slot_choices, static_placement, to_slots


class EPLBRouter(TopKRouter):
    """Top-k router with a logical -> physical expert map (set the class attributes with
    :func:`make_router_class`)."""

    num_logical: int = 0
    bias_init: float = 0.0
    # [num_logical] logit offsets that replace the ``bias_init`` ramp when set (routing
    # scenarios of the benchmarks, benchmarks/eplb_scenarios.py); None: the ramp.
    logit_offset: torch.Tensor | None = None

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False):
        if not self.num_logical:
            raise TypeError("use make_router_class(num_logical, ...) to build an EPLBRouter class")
        if getattr(config, "moe_expert_capacity_factor", None) is not None:
            raise NotImplementedError("EPLB with token dropping (moe_expert_capacity_factor): "
                                      "capacities would be per logical expert, not per slot")
        num_slots = config.num_moe_experts
        logical_config = copy.copy(config)
        logical_config.num_moe_experts = self.num_logical
        super().__init__(config=logical_config, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer)
        self.num_slots = num_slots
        self.ep_group = pg_collection.ep
        self.ep_size = self.ep_group.size()
        self.ep_rank = self.ep_group.rank()
        if num_slots % self.ep_size:
            raise ValueError(f"{num_slots} slots do not divide over ep={self.ep_size}")
        device = self.weight.device
        # Per-step counters, read and cleared by the EPLB hook (not part of the state dict).
        # (int64 buffers: Float16Module leaves them alone.)
        self.register_buffer("eplb_tokens_per_expert", torch.zeros(
            self.num_logical, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("eplb_tokens_per_slot", torch.zeros(
            num_slots, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("eplb_cand", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("eplb_count", torch.zeros(0, dtype=torch.long), persistent=False)
        self.set_placement(static_placement(self.num_logical, num_slots))

    # -- placement ------------------------------------------------------------------------
    def set_placement(self, phy2log) -> None:
        """Switch to a new placement ``phy2log [S]`` (the caller moves the weights)."""
        emap = ExpertMap.from_phy2log(phy2log, self.num_logical)
        if emap.num_slots != self.num_slots:
            raise ValueError(f"placement has {emap.num_slots} slots, the layer {self.num_slots}")
        cand, count = emap.candidates(self.ep_rank, self.ep_size)
        device = self.eplb_tokens_per_expert.device
        self.expert_map = emap
        self.eplb_phy2log = emap.phy2log
        self._identity = emap.is_identity()
        self.eplb_cand = cand.to(device)
        self.eplb_count = count.to(device)

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    # -- forward --------------------------------------------------------------------------
    def gating(self, input: torch.Tensor):
        """Megatron's gate; plus ``e * moe.router_bias_init`` on expert ``e``'s logit (a fixed
        skew for tests and benchmarks; zero by default), or ``logit_offset`` when set."""
        logits = super().gating(input)
        if self.logit_offset is not None:
            return logits + self.logit_offset.to(logits.device, logits.dtype)
        if self.bias_init:
            skew = torch.arange(self.num_logical, device=logits.device, dtype=torch.float32)
            logits = logits + (skew * self.bias_init).to(logits.dtype)
        return logits

    def forward(self, input: torch.Tensor, padding_mask=None):
        """Route over logical experts, then map each choice to a physical slot."""
        probs, routing_map = super().forward(input, padding_mask=padding_mask)
        counting = self.training and torch.is_grad_enabled()
        if counting:
            with torch.no_grad():
                self.eplb_tokens_per_expert += routing_map.sum(dim=0)
        if self._identity:
            if counting:
                with torch.no_grad():
                    self.eplb_tokens_per_slot += routing_map.sum(dim=0)
            return probs, routing_map
        slots = slot_choices(self.eplb_cand, self.eplb_count, probs.shape[0])
        probs, routing_map = to_slots(probs, routing_map, slots, self.num_slots)
        if counting:
            with torch.no_grad():
                self.eplb_tokens_per_slot += routing_map.sum(dim=0)
        return probs, routing_map

    def take_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(tokens per logical expert, tokens per slot)`` since the last call."""
        experts = self.eplb_tokens_per_expert.clone()
        slots = self.eplb_tokens_per_slot.clone()
        self.eplb_tokens_per_expert.zero_()
        self.eplb_tokens_per_slot.zero_()
        return experts, slots


def make_router_class(num_logical: int, bias_init: float = 0.0) -> type[EPLBRouter]:
    """An `EPLBRouter` subclass bound to the recipe's logical expert count and logit skew,
    suitable as ``MoESubmodules.router``."""
    return type("EPLBRouter", (EPLBRouter,),
                {"num_logical": int(num_logical), "bias_init": float(bias_init)})
