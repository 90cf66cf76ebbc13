"""Does EPLB pay? A run-time estimate from numbers the training loop already has.

Between two rebalances the EPLB hook records, per step, the balancedness of the routed tokens
on the current slots (``bal_slots``, replicas included) and the balancedness the *same* tokens
would have had on the plain placement (``bal_plain``: EP rank r holds logical experts
r*E/ep .. (r+1)*E/ep - 1, no replicas), both mean EP-rank load / busiest EP-rank load averaged
over the MoE layers, and the step time. At each rebalance:

    gain  = mean over the steps of (1 - bal_plain / bal_slots)
            the share of the busiest rank's expert work that the replicas removed (the MoE
            layer waits for its busiest rank);
    saved = gain * moe_share * step_time                        per step;
    cost  = (plan + move time) / interval + overhead * moe_share * step_time   per step,

with ``moe_share`` the routed experts' share of the model's forward FLOPs (from the recipe:
top-k experts' weights / all activated weights; it ignores attention's QK/AV products and all
communication, so it is an estimate) and ``overhead`` = REPLICA_OVERHEAD (2% of MoE time: the
bound issue 22 sets for extra local experts, index mapping and replica gradients at equal
balance). When ``saved < cost`` the hook logs one hint line (rank 0): with the aux-loss-free
bias the router is often balanced enough that replicas cannot buy back their cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_dualpipe.eplb.load_tracker import balance_stats

REPLICA_OVERHEAD = 0.02


def plain_balancedness(expert_counts: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Per layer balancedness of ``[L, E]`` logical-expert counts on the plain placement."""
    return balance_stats(expert_counts, ep_size)[0]


def routed_expert_share(recipe) -> float:
    """Routed experts' share of the activated weights per token (main model, no MTP)."""
    from megatron_dualpipe.planning.params import count_params, gated_mlp_params

    m, moe = recipe.model, recipe.moe
    routed = (m.num_layers - m.num_dense_layers) * moe.topk * gated_mlp_params(
        m.hidden_size, moe.ffn_hidden_size)
    return routed / max(1, count_params(recipe).activated_main)


@dataclass
class Verdict:
    """One interval's estimate (milliseconds per step)."""

    gain: float
    saved_ms: float
    cost_ms: float
    move_ms: float
    interval: int
    moe_share: float

    @property
    def pays(self) -> bool:
        return self.saved_ms >= self.cost_ms

    def hint(self) -> str:
        return (f"[eplb] hint: EPLB does not pay here: its replicas cut the busiest EP rank's "
                f"expert load by {100 * self.gain:.1f}% (x MoE share {self.moe_share:.2f} = "
                f"{self.saved_ms:.2f} ms per step) but cost {self.cost_ms:.2f} ms per step "
                f"(plan+move {self.move_ms:.1f} ms / {self.interval} steps + replica overhead "
                f"~{100 * REPLICA_OVERHEAD:.0f}% of MoE time); the expert bias may balance well "
                "enough alone: consider eplb.enabled=false or a longer eplb.interval")


@dataclass
class PayoffTracker:
    """Collects the per-step numbers between rebalances; `check` gives the interval's verdict."""

    moe_share: float
    overhead: float = REPLICA_OVERHEAD
    _gains: list = field(default_factory=list)
    _step_s: list = field(default_factory=list)

    def add_step(self, bal_plain: float, bal_slots: float, step_time_s: float) -> None:
        self._gains.append(1.0 - bal_plain / bal_slots if bal_slots > 0 else 0.0)
        self._step_s.append(step_time_s)

    def check(self, plan_move_s: float) -> Verdict | None:
        """The verdict for the steps since the last call (None without steps); restarts."""
        if not self._step_s:
            return None
        steps = len(self._step_s)
        step_ms = 1e3 * sorted(self._step_s)[steps // 2]  # median: robust to the move step
        gain = sum(self._gains) / steps
        moe_ms = self.moe_share * step_ms
        verdict = Verdict(gain=gain, saved_ms=gain * moe_ms,
                          cost_ms=1e3 * plan_move_s / steps + self.overhead * moe_ms,
                          move_ms=1e3 * plan_move_s, interval=steps, moe_share=self.moe_share)
        self._gains.clear()
        self._step_s.clear()
        return verdict
