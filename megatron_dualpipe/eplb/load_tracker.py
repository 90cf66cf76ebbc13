"""Expert load statistics: per step counts from the routers, and the planning window.

`step_counts(layers)` reads this step's tokens per logical expert and per physical slot from
every local `EPLBRouter` and sums them over the ranks that see different tokens of the same
layer (the router's tensor x data x context parallel group, the group Megatron reduces the
expert-bias counts over; it contains the expert-parallel ranks). `LoadWindow` keeps the
estimate the planner uses: the sum of the last ``window`` steps (``sliding``) or an
exponential moving average with span ``window`` (``ema``, alpha = 2 / (window + 1)).
`balance_stats` turns slot counts into what the metrics log: balancedness (mean EP-rank load /
max EP-rank load) and max / mean.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist


def step_counts(layers) -> tuple[torch.Tensor, torch.Tensor]:
    """``(experts [L, E], slots [L, S])`` float64 token counts of this step, reduced over the
    data-parallel group (all local layers in one all-reduce); the routers' counters restart."""
    if not layers:
        return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64)
    experts, slots = zip(*(layer.router.take_counts() for layer in layers))
    num_logical = experts[0].numel()
    flat = torch.cat([torch.stack(experts).reshape(-1), torch.stack(slots).reshape(-1)])
    flat = flat.to(torch.float64)
    group = layers[0].router.tp_dp_cp_group
    if group is not None and group.size() > 1:
        dist.all_reduce(flat, group=group)
    flat = flat.cpu()
    num_layers = len(layers)
    split = num_layers * num_logical
    return flat[:split].view(num_layers, -1), flat[split:].view(num_layers, -1)


def balance_stats(slot_counts: torch.Tensor, ep_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer ``(balancedness, max/mean)`` of the EP-rank loads given ``[L, S]`` slot counts
    (slot ``s`` on EP rank ``s // (S / ep)``); 1.0 for a layer without tokens."""
    rank_loads = slot_counts.view(slot_counts.shape[0], ep_size, -1).sum(dim=2)
    top = rank_loads.max(dim=1).values
    mean = rank_loads.mean(dim=1)
    busy = top > 0
    bal = torch.where(busy, mean / torch.where(busy, top, 1.0), torch.ones_like(top))
    over = torch.where(busy, top / torch.where(busy, mean, 1.0), torch.ones_like(top))
    return bal, over


class LoadWindow:
    """Per layer load estimate ``[L, E]`` over the last ``window`` steps (sliding) or an EMA."""

    def __init__(self, num_layers: int, num_logical: int, window: int, kind: str = "sliding"):
        if kind not in ("sliding", "ema"):
            raise ValueError(f"window kind must be 'sliding' or 'ema', got {kind!r}")
        self.shape = (num_layers, num_logical)
        self.window = int(window)
        self.kind = kind
        self.steps = 0
        self._recent: deque[torch.Tensor] = deque(maxlen=self.window)
        self._ema = torch.zeros(self.shape, dtype=torch.float64)

    def update(self, loads: torch.Tensor) -> None:
        """Add one step's ``[L, E]`` counts."""
        loads = loads.detach().to(torch.float64).cpu().reshape(self.shape)
        self.steps += 1
        if self.kind == "sliding":
            self._recent.append(loads.clone())
        else:
            alpha = 2.0 / (self.window + 1.0)
            first = self.steps == 1
            self._ema = loads.clone() if first else (1 - alpha) * self._ema + alpha * loads

    def estimate(self) -> torch.Tensor:
        """``[L, E]`` float64 load estimate (zeros before the first update)."""
        if self.kind == "ema":
            return self._ema.clone()
        if not self._recent:
            return torch.zeros(self.shape, dtype=torch.float64)
        return torch.stack(list(self._recent)).sum(dim=0)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "window": self.window, "steps": self.steps,
                "recent": [t.clone() for t in self._recent], "ema": self._ema.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved window; a different kind or size keeps what can be used."""
        self.steps = int(state.get("steps", 0))
        recent = [t.to(torch.float64) for t in state.get("recent", [])
                  if tuple(t.shape) == self.shape]
        self._recent = deque(recent[-self.window:], maxlen=self.window)
        ema = state.get("ema")
        if ema is not None and tuple(ema.shape) == self.shape:
            self._ema = ema.to(torch.float64).clone()
        elif recent:
            self._ema = torch.stack(recent).mean(dim=0)
