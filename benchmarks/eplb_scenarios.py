"""Routing scenarios for the EPLB benchmarks: which experts a router prefers, step by step.

A scenario gives, for every training step, a logit offset per logical expert that the
benchmark adds to the router's logits (`EPLBRouter.logit_offset`). All scenarios use one
load shape, a circular ramp of slope ``skew``: the expert at the hot spot ``c`` gets
``(E - 1) * skew``, the one after it 0, then ``skew``, ``2 * skew``, ... around the circle, so
``skew=s`` at hot spot ``E - 1`` is exactly the fixed skew ``moe.router_bias_init=s`` (``e * s``).

* ``static``: the hot spot stays at expert ``E - 1``.
* ``drift``: the hot spot moves ``drift_experts`` experts forward every ``drift_every`` steps
  (a slow change of the data mix; the aux-loss-free bias must chase it).
* ``burst``: domain switches: during the last ``burst_len`` steps of every ``burst_period``
  steps the router sees another domain, the same ramp over a fixed random permutation of the
  experts, then switches back.
* ``uniform``: no skew (every variant balanced; measures the replicas' own overhead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("static", "drift", "burst", "uniform")


@dataclass(frozen=True)
class Scenario:
    """Per-step router logit offsets for ``num_experts`` logical experts (see module doc)."""

    kind: str
    num_experts: int
    skew: float
    drift_every: int = 1
    drift_experts: int = 1
    burst_period: int = 8
    burst_len: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"scenario {self.kind!r}: allowed {', '.join(KINDS)}")
        if min(self.drift_every, self.burst_period, self.num_experts) < 1:
            raise ValueError("drift_every, burst_period and num_experts must be >= 1")
        if not 0 <= self.burst_len < self.burst_period:
            raise ValueError(f"burst_len={self.burst_len} must be in [0, burst_period)")

    def domain(self, step: int) -> int:
        """0: the usual data; 1: the other domain (``burst`` steps only)."""
        if self.kind != "burst":
            return 0
        return int(step % self.burst_period >= self.burst_period - self.burst_len)

    def burst_steps(self, steps: int) -> list[int]:
        """The steps in ``range(steps)`` that see the other domain."""
        return [s for s in range(steps) if self.domain(s)]

    def hot_spot(self, step: int) -> int:
        """The expert with the largest offset (before any permutation)."""
        shift = (step // self.drift_every) * self.drift_experts if self.kind == "drift" else 0
        return (self.num_experts - 1 + shift) % self.num_experts

    def permutation(self) -> torch.Tensor:
        """The other domain's expert order (fixed by ``seed``; never the identity for E > 1)."""
        gen = torch.Generator().manual_seed(self.seed + 7919)
        perm = torch.randperm(self.num_experts, generator=gen)
        if self.num_experts > 1 and torch.equal(perm, torch.arange(self.num_experts)):
            perm = perm.roll(1)
        return perm

    def offsets(self, step: int) -> torch.Tensor:
        """``[E]`` float32 logit offsets at ``step``."""
        e = self.num_experts
        if self.kind == "uniform":
            return torch.zeros(e)
        rank = (torch.arange(e) - self.hot_spot(step) - 1) % e  # 0 right after the hot spot
        ramp = rank.to(torch.float32) * self.skew
        if self.domain(step):
            out = torch.empty(e)
            out[self.permutation()] = ramp  # expert perm[i] takes position i's offset
            return out
        return ramp

    def hottest(self, step: int) -> int:
        """The expert with the largest offset at ``step`` (the intended hottest expert)."""
        return int(self.offsets(step).argmax())

    def describe(self) -> str:
        if self.kind == "drift":
            return (f"drift: ramp skew {self.skew}/expert, hot spot +{self.drift_experts} "
                    f"expert(s) every {self.drift_every} step(s)")
        if self.kind == "burst":
            return (f"burst: ramp skew {self.skew}/expert; the last {self.burst_len} of every "
                    f"{self.burst_period} steps see another domain (permuted experts)")
        if self.kind == "static":
            return f"static: ramp skew {self.skew}/expert, hot spot fixed"
        return "uniform: no skew"


def apply(routers, scenario: Scenario, step: int) -> None:
    """Set every router's logit offset for ``step`` (routers: `EPLBRouter` instances)."""
    offsets = scenario.offsets(step)
    for router in routers:
        router.logit_offset = offsets.to(router.weight.device)
