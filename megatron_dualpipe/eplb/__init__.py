"""Expert-parallel load balancer (EPLB) planner.

``rebalance_experts`` decides how many replicas each logical expert gets and which GPU holds
each physical slot (DeepSeek EPLB semantics); ``report`` and ``slot_moves`` describe a plan.
"""

from megatron_dualpipe.eplb.api import MODES, rebalance_experts
from megatron_dualpipe.eplb.placement.migration import DEFAULT_TOL, align_to_current
from megatron_dualpipe.eplb.placement.planner import POLICIES, Layout, make_layout
from megatron_dualpipe.eplb.placement.report import (
    EplbReport,
    balancedness,
    count_duplicates,
    gpu_loads,
    report,
    slot_moves,
)

__all__ = [
    "DEFAULT_TOL",
    "MODES",
    "POLICIES",
    "EplbReport",
    "Layout",
    "align_to_current",
    "balancedness",
    "count_duplicates",
    "gpu_loads",
    "make_layout",
    "rebalance_experts",
    "report",
    "slot_moves",
]
