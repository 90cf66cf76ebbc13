"""DualPipe keeps every stage twice: on rank r (chunk 0) and rank pp-1-r (chunk 1).

Each copy sees half of the micro-batches, so before Megatron's gradient finalization the two
copies' gradients (and the routers' token counts that drive the expert-bias update) are summed
across the mirror pair; both copies then take the same optimizer step and stay identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

_GROUPS: dict[tuple, object] = {}


def mirror_group(pp_ranks: list[int]):
    """The 2-rank group {r, pp-1-r} of this rank within its pipeline (collective on first use)."""
    key = tuple(pp_ranks)
    if key not in _GROUPS:
        all_pipelines: list = [None] * dist.get_world_size()
        dist.all_gather_object(all_pipelines, key)
        me = dist.get_rank()
        for pipeline in sorted(set(all_pipelines)):
            n = len(pipeline)
            for r in range(n // 2):
                group = dist.new_group([pipeline[r], pipeline[n - 1 - r]])
                if me in (pipeline[r], pipeline[n - 1 - r]):
                    _GROUPS[key] = group
    return _GROUPS[key]


def _mirror_tensors(chunk) -> list[torch.Tensor]:
    tensors = []
    for param in chunk.parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            tensors.append(grad)
    for module in chunk.modules():
        if hasattr(module, "local_tokens_per_expert") and hasattr(module, "expert_bias"):
            tensors.append(module.local_tokens_per_expert)
    return tensors


def sum_mirror_grads(model: list, pp_ranks: list[int]) -> None:
    """Sum chunk 0 of rank r with chunk 1 of rank pp-1-r (and vice versa), in place.

    Rank r's chunk 0 and its mirror's chunk 1 hold the same stage, built identically, so
    their parameters come in the same order. The exchange is one all-reduce per direction.
    """
    group = mirror_group(pp_ranks)
    rank_in_pp = pp_ranks.index(dist.get_rank())
    n = len(pp_ranks)
    if n % 2 == 1 and rank_in_pp == n // 2:
        raise RuntimeError("dualpipe needs an even pipeline size")
    # The lower rank of the pair sends [chunk0 | chunk1]; the upper [chunk1 | chunk0], so
    # the same stage lines up in the flat buffers.
    order = (0, 1) if rank_in_pp < n // 2 else (1, 0)
    tensors = [t for c in order for t in _mirror_tensors(model[c])]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        for t, summed in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(summed)
