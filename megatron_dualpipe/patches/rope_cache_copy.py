"""MLA's fused rope gets copies of the yarn embedding's cached cos/sin (CUDA graphs).

Target: `YarnRotaryEmbedding.get_cached_cos_sin` (megatron.core.models.common.embeddings.
yarn_rotary_pos_embedding), which MLA calls with `apply_rope_fusion` and which returns slices
of the module buffers `cos_cached` / `sin_cached`. The fused rope saves them for backward.
Megatron-Core 0.19's CUDA graph capture restores every module buffer in place after capturing
a layer's forward (`buf.copy_(buf_copy)` in transformer/cuda_graphs.py), which bumps their
version counters, so the backward capture stops with "modified by an inplace operation"
(measured on one H200, docs/fp8.md). The replacement returns copies: same values, and the
tensors autograd saves are no longer buffers. Two [seq, 1, 1, rope dim] copies per layer call.
"""

from __future__ import annotations

from megatron_dualpipe.patches.base import Patch


def _make(original):
    def get_cached_cos_sin(self, *args, **kwargs):
        cos, sin = original(self, *args, **kwargs)
        return cos.clone(), sin.clone()

    return get_cached_cos_sin


def make_patch() -> Patch:
    return Patch(
        name="rope_cache_copy",
        module="megatron.core.models.common.embeddings.yarn_rotary_pos_embedding:"
               "YarnRotaryEmbedding",
        replacements={"get_cached_cos_sin": _make},
    )
