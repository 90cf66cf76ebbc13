"""Host-side all-to-all split sizes for CPU tensors.

Target: `megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu`. The
alltoall dispatcher moves its split sizes device-to-host as numpy arrays, but the original
converts only CUDA tensors, so on CPU the splits stay tensors and `all_to_all_single`
rejects them. The replacement converts CPU tensors too when `as_numpy` is asked for.
"""

from __future__ import annotations

import torch

from megatron_dualpipe.patches.base import Patch


def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    if not torch.is_tensor(tensor):
        return tensor
    cpu_tensor = tensor.to("cpu")
    return cpu_tensor.numpy() if as_numpy else cpu_tensor


def make_patch() -> Patch:
    return Patch(
        name="alltoall_splits",
        module="megatron.core.transformer.moe.token_dispatcher",
        replacements={"maybe_move_tensor_to_cpu": lambda _: maybe_move_tensor_to_cpu},
    )
