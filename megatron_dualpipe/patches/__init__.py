"""Every monkeypatch of the project, in one table (`PATCHES`).

Each file of this folder patches one target, every patch is version-guarded (megatron-core
0.19.x; `record_stream`: torch 2.x) and reversible. `PATCHES` says, per patch, what it replaces
and when it is applied:

* ``cpu-only``: Megatron-Core's CUDA assumptions, applied together by `apply_cpu_patches()`
  when CUDA is absent (`revert_cpu_patches()` restores Megatron-Core as it was);
* ``cpu-only, scoped``: applied on CPU only around one call (`record_stream`);
* ``feature``: applied, on CPU and GPU, when a feature needs it (`enable_*`;
  `revert_feature_patches()` undoes them).

The same changes as unified diffs against Megatron-Core's source, for users who vendor
Megatron-LM: `python -m megatron_dualpipe.patches.export_diffs patches/` (repository root).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from megatron_dualpipe.patches.base import Patch


@dataclass(frozen=True)
class PatchEntry:
    """One row of the table: the file `patches/<name>.py` and when its patches apply."""

    name: str
    target: str
    condition: str  # "cpu-only", "cpu-only, scoped" or "feature"
    applied_by: str

    def make(self) -> list[Patch]:
        module = importlib.import_module(f"megatron_dualpipe.patches.{self.name}")
        if hasattr(module, "make_patches"):
            return module.make_patches()
        return [module.make_patch()]


PATCHES: tuple[PatchEntry, ...] = (
    PatchEntry("cuda_calls", "module-global `torch` of 46 megatron.core modules "
               "(`cuda_calls.MODULES`)", "cpu-only", "apply_cpu_patches (train.setup)"),
    PatchEntry("rng_tracker", "megatron.core.tensor_parallel.random._get_cuda_rng_state, "
               "_set_cuda_rng_state", "cpu-only", "apply_cpu_patches (train.setup)"),
    PatchEntry("alltoall_splits", "megatron.core.transformer.moe.token_dispatcher."
               "maybe_move_tensor_to_cpu", "cpu-only", "apply_cpu_patches (train.setup)"),
    PatchEntry("clip_grads", "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32",
               "cpu-only", "apply_cpu_patches (train.setup)"),
    PatchEntry("distrib_optimizer_init", "megatron.core.optimizer.distrib_optimizer."
               "DistributedOptimizer.__init__", "cpu-only", "apply_cpu_patches (train.setup)"),
    PatchEntry("float16_optimizer_init", "megatron.core.optimizer.optimizer."
               "Float16OptimizerWithFloat16Params.__init__", "cpu-only",
               "apply_cpu_patches (train.setup)"),
    PatchEntry("record_stream", "torch.Tensor.record_stream", "cpu-only, scoped",
               "schedules/overlap.py, around an overlapped F&B plan on CPU"),
    PatchEntry("deferred_wgrad_linear", "megatron.core.tensor_parallel.layers."
               "linear_with_grad_accumulation_and_async_allreduce", "feature",
               "enable_deferred_wgrad: DualPipe(V) with the zero-bubble W split, CPU and GPU"),
    PatchEntry("forward_backward_func", "megatron.core.pipeline_parallel.schedules."
               "get_forward_backward_func (and its imported bindings)", "feature",
               "enable_schedule_selection: megatron_dualpipe.register()"),
    PatchEntry("pad_routing_map", "megatron.core.transformer.moe.token_dispatcher."
               "pad_routing_map", "feature",
               "enable_routing_map_copy: GPU with moe.router_fusion, or FP8 with "
               "moe.capacity_factor (FP8 router padding; needs_routing_map_copy)"),
    PatchEntry("rope_cache_copy", "megatron.core.models.common.embeddings."
               "yarn_rotary_pos_embedding.YarnRotaryEmbedding.get_cached_cos_sin", "feature",
               "enable_rope_cache_copy: MLA attention in CUDA graphs with model.rope_fusion "
               "(needs_rope_cache_copy)"),
)

ENTRIES = {entry.name: entry for entry in PATCHES}
_MADE: dict[str, list[Patch]] = {}


def patches_of(name: str) -> list[Patch]:
    """The `Patch` objects of table entry `name`, created once (applying is idempotent)."""
    if name not in _MADE:
        _MADE[name] = ENTRIES[name].make()
    return _MADE[name]


def cpu_patches() -> list[Patch]:
    """The patches `apply_cpu_patches()` applies, in table order."""
    return [p for e in PATCHES if e.condition == "cpu-only" for p in patches_of(e.name)]


def apply_cpu_patches(force: bool = False) -> bool:
    """Apply the CPU patches when CUDA is absent (or `force`). Returns whether they are on."""
    if torch.cuda.is_available() and not force:
        return False
    for patch in cpu_patches():
        patch.apply()
    return True


def revert_cpu_patches() -> None:
    for patch in reversed(cpu_patches()):
        patch.revert()


def _enable(name: str) -> None:
    for patch in patches_of(name):
        patch.apply()


def enable_deferred_wgrad() -> None:
    """Megatron linears defer their weight GEMM inside a DualPipe zero-bubble B (CPU and GPU)."""
    _enable("deferred_wgrad_linear")


def enable_schedule_selection() -> None:
    """Megatron's get_forward_backward_func() answers with the selected DualPipe schedule."""
    _enable("forward_backward_func")


def enable_routing_map_copy() -> None:
    """Router padding for FP8 pads a copy of the routing map (see `needs_routing_map_copy`)."""
    _enable("pad_routing_map")


def needs_routing_map_copy(recipe, device_type: str) -> bool:
    """Whether Megatron's in-place FP8 router padding would write into a routing map that
    autograd saved: the fused router's (GPU) or the capacity-dropped one (`moe.capacity_factor`
    under FP8, without `moe.pad_to_capacity`, which pads no routing map)."""
    if device_type != "cuda":
        return False
    moe = recipe.moe
    dropped = (moe.capacity_factor is not None and not moe.pad_to_capacity
               and recipe.fp8.recipe != "none")
    return moe.router_fusion or dropped


def enable_rope_cache_copy() -> None:
    """MLA's fused rope saves copies of the cached cos/sin, not module buffers."""
    _enable("rope_cache_copy")


def needs_rope_cache_copy(recipe) -> bool:
    """Whether MLA's fused rope runs inside Megatron's CUDA graphs, whose capture restores
    module buffers in place after the forward (see `rope_cache_copy`)."""
    m = recipe.model
    graphs_attention = not m.cuda_graph_modules or "attn" in m.cuda_graph_modules
    return (m.cuda_graphs != "none" and m.attention == "mla" and m.rope_fusion
            and graphs_attention)


def revert_feature_patches() -> None:
    for entry in PATCHES:
        if entry.condition == "feature" and entry.name in _MADE:
            for patch in reversed(_MADE[entry.name]):
                patch.revert()
