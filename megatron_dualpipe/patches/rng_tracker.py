"""The model-parallel RNG tracker on the CPU generator.

Target: `megatron.core.tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state`,
which read and write CUDA generators. On CPU the tracked states are CPU generator states, so
`get_cuda_rng_tracker().fork()` (dropout in tensor-parallel regions, expert init) works.
"""

from __future__ import annotations

import torch

from megatron_dualpipe.patches.base import Patch


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def make_patch() -> Patch:
    return Patch(
        name="rng_tracker",
        module="megatron.core.tensor_parallel.random",
        replacements={
            "_get_cuda_rng_state": lambda _: _get_rng_state,
            "_set_cuda_rng_state": lambda _: _set_rng_state,
        },
    )
