"""Parameters that DualPipe/DualPipeV keep more than once; their gradients are summed.

DualPipe keeps every stage twice: on rank r (chunk 0) and rank pp-1-r (chunk 1). Each copy
sees half of the micro-batches, so before Megatron's gradient finalization the two copies'
gradients (and the routers' token counts that drive the expert-bias update) are summed across
the mirror pair; both copies then take the same optimizer step and stay identical.

Word-embedding copies: a tied output head or an MTP block on the last stage keeps a copy of
the stage-0 word embedding. Megatron sums those over its embedding group (first and last
pipeline *rank*); in DualPipe(V) the last stage sits on a rank that also holds stage 0 (rank 0
for DualPipeV; ranks 0 and pp-1 for DualPipe), so the copies are summed on the rank
(`sum_embedding_copies`) and the chunks are built without Megatron's embedding group.
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


def reset_mirror_groups() -> None:
    """Forget the cached mirror groups (they die with the process group)."""
    _GROUPS.clear()


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


def embedding_copies(model: list) -> list[torch.nn.Parameter]:
    """This rank's copies of the word embedding, stage-0 embedding first.

    Megatron's `shared_embedding_or_output_weight` of every chunk that shares it (tied
    embeddings or MTP): the embedding of a stage-0 chunk, the head or MTP embedding of a
    last-stage chunk.
    """
    from megatron.core.utils import get_attr_wrapped_model

    first, later = [], []
    for chunk in model:
        module = get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True)
        if not (module.share_embeddings_and_output_weights or module.config.mtp_num_layers):
            continue
        weight = module.shared_embedding_or_output_weight()
        if weight is not None and all(weight is not w for w in first + later):
            (first if module.pre_process else later).append(weight)
    return first + later


def sum_embedding_copies(model: list) -> None:
    """Sum the gradients of this rank's word-embedding copies into each of them (in place)."""
    copies = embedding_copies(model)
    if len(copies) < 2:
        return
    grads = [getattr(w, "main_grad", None) if getattr(w, "main_grad", None) is not None
             else w.grad for w in copies]
    if any(g is None for g in grads):
        return  # frozen embedding
    total = grads[0].clone()
    for grad in grads[1:]:
        total += grad
    for grad in grads:
        grad.copy_(total)
