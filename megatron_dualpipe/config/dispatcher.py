"""`moe.token_dispatcher`: how routed tokens reach their experts, and what each choice needs.

| value       | Megatron-Core 0.19                                                 |
|-------------|--------------------------------------------------------------------|
| `alltoall`  | `MoEAlltoAllTokenDispatcher` (NCCL all-to-all; the default)        |
| `allgather` | `MoEAllGatherTokenDispatcher`                                      |
| `deepep`    | `MoEFlexTokenDispatcher` with the DeepEP backend (`fused_a2a.py`)  |

DeepEP (github.com/deepseek-ai/DeepEP) fuses permutation and communication and sizes its
transfers on the device (no host sync on the split sizes). The build this project uses
(`benchmarks/deepep/build_on_gpu.sh`: the v1 API Megatron-Core 0.19 calls, intranode kernels
only, no NVSHMEM) brings these limits, checked before any process starts:

* BF16 only (its combine kernel handles no other type): ``model.dtype=bf16``;
* CUDA GPUs, an expert-parallel group of 2, 4 or 8 ranks (``parallel.ep x parallel.tp``; the
  flex dispatcher communicates over TP x EP) on one node (NVLink);
* no token dropping (``moe.capacity_factor`` needs alltoall, `validate.check_moe`);
* the ``deep_ep`` package importable (`check_dispatcher_installed`, a `train` rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megatron_dualpipe.errors import UserError

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe

DISPATCHERS = ("alltoall", "allgather", "deepep")
DEEPEP_GROUP_SIZES = (2, 4, 8)  # DeepEP's intranode kernels (SWITCH_RANKS)


def dispatcher_kwargs(recipe: Recipe) -> dict[str, Any]:
    """TransformerConfig fields for ``moe.token_dispatcher``."""
    value = recipe.moe.token_dispatcher
    if value == "deepep":
        return {"moe_token_dispatcher_type": "flex", "moe_flex_dispatcher_backend": "deepep"}
    return {"moe_token_dispatcher_type": value}


def check_dispatcher(recipe: Recipe) -> None:
    """What ``moe.token_dispatcher=deepep`` cannot be combined with (recipe alone)."""
    if recipe.moe.token_dispatcher != "deepep":
        return
    m, p = recipe.model, recipe.parallel
    field = "moe.token_dispatcher=deepep"
    others = "alltoall, allgather"
    if m.dtype != "bf16":
        raise UserError(f"{field} needs model.dtype=bf16 (DeepEP's combine kernel is BF16 "
                        f"only; got {m.dtype}); allowed with {m.dtype}: {others}")
    if recipe.train.device == "cpu":
        raise UserError(f"{field} needs CUDA GPUs (train.device=cpu); allowed on CPU: {others}")
    group = p.ep * p.tp
    if group not in DEEPEP_GROUP_SIZES:
        raise UserError(
            f"{field} needs an expert-parallel group (parallel.ep x parallel.tp) of "
            f"{', '.join(map(str, DEEPEP_GROUP_SIZES))} ranks (DeepEP's intranode kernels); "
            f"got ep={p.ep} x tp={p.tp} = {group}; use moe.token_dispatcher=alltoall")
    per_node = p.nproc_per_node
    if per_node is not None and group > per_node:
        raise UserError(
            f"{field}: the expert-parallel group ({group} ranks) spans nodes "
            f"(parallel.nproc_per_node={per_node}); this DeepEP build has intranode (NVLink) "
            "kernels only; use moe.token_dispatcher=alltoall")


def check_dispatcher_installed(recipe: Recipe) -> None:
    """``deepep``: the ``deep_ep`` package imports and CUDA is there (the launcher's check)."""
    if recipe.moe.token_dispatcher != "deepep":
        return
    try:
        import deep_ep  # noqa: F401
    except Exception as err:  # ImportError, or a CUDA library missing at load time
        raise UserError(
            "moe.token_dispatcher=deepep needs DeepEP (the deep_ep package), which does not "
            f"import here ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            "; build it with benchmarks/deepep/build_on_gpu.sh, or set moe.token_dispatcher "
            f"to one of: {', '.join(d for d in DISPATCHERS if d != 'deepep')}") from None
    import torch

    if not torch.cuda.is_available():
        raise UserError("moe.token_dispatcher=deepep needs CUDA GPUs, and none is visible; "
                        "allowed without a GPU: alltoall, allgather")
