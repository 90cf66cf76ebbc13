"""Process groups: torch.distributed and Megatron-Core parallel state from a recipe."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_dualpipe.config import Recipe
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.schedules.spec import SPECS


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read from torchrun/Slurm-style variables."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> "DistEnv":
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )


def resolve_device(recipe: Recipe) -> torch.device:
    want = recipe.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available (use train.device=cpu)")
    return torch.device(want)


def init_distributed(recipe: Recipe, device: torch.device) -> DistEnv:
    """Start torch.distributed (gloo on CPU, NCCL on GPU) and Megatron's parallel state."""
    from megatron.core import parallel_state

    env = DistEnv.from_environ()
    backend = recipe.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=int(os.environ.get("MDP_DIST_TIMEOUT_MIN", 10))),
        )
    p = recipe.parallel
    if parallel_state.model_parallel_is_initialized():
        # A second model in the same process (benchmarks, evaluation): same groups or none.
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size())
        if have != (p.tp, p.pp, p.ep):
            raise RuntimeError(f"model parallel state is initialized for (tp, pp, ep)={have}, "
                               f"the recipe needs {(p.tp, p.pp, p.ep)}")
        return env
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        expert_model_parallel_size=p.ep,
        get_embedding_ranks=embedding_ranks if SPECS[p.schedule].dualpipe_family else None,
    )
    return env


def embedding_ranks(pp_ranks: list[int], *_) -> list[int]:
    """Megatron's embedding group for DualPipe/DualPipeV: the first pipeline rank alone.

    Megatron sums the word-embedding copies (tied output head, MTP embedding) of the first and
    last pipeline *ranks*. In DualPipeV the first and the last stage are both on rank 0; in
    DualPipe ranks 0 and pp-1 each hold stage 0 and the last stage. There the schedule sums
    the copies on the rank (`schedules/mirror.py`), so the group has nothing to reduce across
    ranks: one rank keeps Megatron's all-reduce a no-op.
    """
    return [pp_ranks[0]]


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    from megatron_dualpipe.schedules.mirror import reset_mirror_groups
    from megatron_dualpipe.schedules.p2p import reset_flow_groups

    reset_flow_groups()  # the schedules' cached groups belong to the process group
    reset_mirror_groups()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class PipelineRankView:
    """The pipeline group, reporting another stage rank to the model-building code.

    Megatron-Core derives a chunk's layer offset and first/last-stage flags from
    `pg_collection.pp.rank()`. DualPipe(V) chunks hold stages that interleaved offsets do not
    describe (V shape, mirrored stages), so each chunk is built with this view of the group.
    All other attributes are those of the real group.
    """

    def __init__(self, group, stage_rank: int):
        self._group = group
        self._stage_rank = stage_rank

    def rank(self) -> int:
        return self._stage_rank

    def __getattr__(self, name):
        return getattr(self._group, name)


def process_groups(stage_rank: int | None = None, embedding_group: bool = True):
    """Megatron's `ProcessGroupCollection`, optionally with the pipeline rank viewed as
    `stage_rank` (see `PipelineRankView`) and without the embedding group.

    `embedding_group=False` (DualPipe/DualPipeV): Megatron's embedding group joins the first
    and last *pipeline ranks*, but in these schedules the word-embedding copies (tied head,
    MTP) sit on the rank that holds stage 0; the schedule sums them (`schedules/mirror.py`).
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgc = ProcessGroupCollection.use_mpu_process_groups()
    if stage_rank is None and embedding_group:
        return pgc
    view = copy.copy(pgc)
    if stage_rank is not None:
        view.pp = PipelineRankView(pgc.pp, stage_rank)
    if not embedding_group:
        view.embd = None
    return view
