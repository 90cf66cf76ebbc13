"""The planner's view of a recipe's expert-parallel layout."""

from __future__ import annotations


def planner_topology(recipe) -> tuple[int, int]:
    """``(num_groups, num_nodes)`` for the planner: the routing groups (1 without group-limited
    routing) and the nodes one EP group spans (its ranks are ``tp`` apart, contiguous)."""
    from megatron_dualpipe.config import world_size

    p = recipe.parallel
    num_groups = recipe.moe.num_groups or 1
    if recipe.moe.num_experts % num_groups:
        num_groups = 1
    per_node = p.nproc_per_node or max(1, world_size(recipe) // p.num_nodes)
    span = p.ep * p.tp
    num_nodes = span // per_node if span > per_node and span % per_node == 0 else 1
    if p.ep % num_nodes:
        num_nodes = 1
    return num_groups, num_nodes
