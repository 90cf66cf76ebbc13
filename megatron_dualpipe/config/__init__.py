"""Recipes: typed schema, YAML loading with include/overrides, validation, Megatron mapping."""

from megatron_dualpipe.config.load import apply_overrides, load_recipe, parse_recipe
from megatron_dualpipe.config.schema import Recipe
from megatron_dualpipe.config.validate import (
    data_parallel_size,
    num_microbatches,
    num_physical_experts,
    world_size,
)

__all__ = [
    "Recipe",
    "apply_overrides",
    "data_parallel_size",
    "load_recipe",
    "num_microbatches",
    "num_physical_experts",
    "parse_recipe",
    "world_size",
]
