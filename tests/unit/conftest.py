"""Fast unit tests: no processes. `fake_world` stands in for a multi-rank job.

`fake_world(rank, world_size, pp=.., ep=.., tp=..)` initializes torch.distributed with the
"fake" backend (torch's `FakeStore`: every collective returns at once and leaves its tensor as
this rank's contribution alone) and Megatron-Core's parallel_state for that rank, so code that
asks parallel_state for ranks, sizes and groups runs as it would on that rank of a real job.
"""

from __future__ import annotations

import contextlib

import pytest


@contextlib.contextmanager
def _fake_world(rank: int, world_size: int, *, tp: int = 1, pp: int = 1, ep: int = 1):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep, create_gloo_process_groups=False)
        yield parallel_state
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture
def fake_world():
    """Context manager: ``with fake_world(rank, world_size, pp=2, ep=2) as parallel_state:``."""
    return _fake_world
