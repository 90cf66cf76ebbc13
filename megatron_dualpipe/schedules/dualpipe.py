"""DualPipe and DualPipeV as Megatron-Core `forward_backward_func`s.

Both take the keyword arguments of Megatron's schedules and return the same
`forward_data_store`. Each rank runs the action list that `actions.py` generates (the list the
simulator uses), on its two model chunks (`model/layout.py`):

- F: receive the chunk's input (P2P, or from the other local chunk at the DualPipeV turn),
  run Megatron's `forward_step` (loss on the last stage), send the output on.
- B: receive the output gradient, run Megatron's `backward_step`; with `split_wgrad` the weight
  GEMMs are queued (zero bubble) instead of computed; send the input gradient back.
- W: run the oldest queued weight gradients.
- FB: an F and a B of different chunks. Without `overlap` they run one after the other. With
  `overlap` every F, B and FB of a training step runs through Megatron-Core's schedule plans
  (`overlap.py`): an FB interleaves the forward of one chunk with the backward of the other,
  layer by layer, all-to-alls on the communication stream (sequential on CPU, same numerics).

After the last action: wait for sends, sum DualPipe's mirror copies and the rank's
word-embedding copies (`mirror.py`), call `config.finalize_model_grads_func` like Megatron's
own schedules (whose embedding-group all-reduce then has nothing left to do: see
`distributed.embedding_ranks`). With parallel.pp=1 (DualPipeV only) there is no
peer rank: both stages are local, every hand-off is the local turn, and no P2P group exists.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist

from megatron_dualpipe.schedules import actions as A
from megatron_dualpipe.schedules.mirror import (
    embedding_copies,
    sum_embedding_copies,
    sum_mirror_grads,
)
from megatron_dualpipe.schedules.p2p import ACT, GRAD, Links
from megatron_dualpipe.schedules.spec import get_spec
from megatron_dualpipe.schedules.te_wgrad import deferral_for
from megatron_dualpipe.schedules.wgrad import WeightGradQueue, WeightGradStore


def _microbatches(data_iterator, num_chunks: int, num_microbatches: int) -> list[list]:
    """Per chunk, the list of its micro-batches indexed by global micro-batch id.

    Accepts one iterator (shared by both chunks, as Megatron's non-interleaved loop passes)
    or a list of per-chunk iterators (as the interleaved loop passes); None for chunks that
    need no data.
    """
    if isinstance(data_iterator, (list, tuple)):
        out = []
        for it in data_iterator[:num_chunks]:
            out.append([next(it) for _ in range(num_microbatches)] if it is not None else None)
        return out
    if data_iterator is None:
        return [None] * num_chunks
    shared = [next(data_iterator) for _ in range(num_microbatches)]
    return [shared] * num_chunks


class _Executor:
    """State of one forward-backward call on one pipeline rank."""

    def __init__(self, schedule, forward_step_func, batches, model, num_microbatches, config,
                 links, pp_ranks, forward_only, collect_non_loss_data, overlap=False,
                 first_val_step=None):
        from megatron.core.pipeline_parallel import schedules as mcore

        self.mcore = mcore
        self.schedule = schedule
        self.forward_step_func = forward_step_func
        self.batches = batches
        self.model = model
        self.num_microbatches = num_microbatches
        self.config = config
        self.links = links
        self.pp_ranks = pp_ranks
        self.num_ranks = len(pp_ranks)
        self.rank = pp_ranks.index(dist.get_rank())
        self.forward_only = forward_only
        self.collect_non_loss_data = collect_non_loss_data
        self.placements = [getattr(chunk, "placement") for chunk in model]
        self.saved: dict[tuple[int, int], tuple] = {}
        self.local: dict[tuple[str, int, int], torch.Tensor] = {}
        self.wgrads = WeightGradQueue()
        self.forward_data_store: list = []
        self.first_val_step = first_val_step
        self._forwarded_chunks: set[int] = set()
        self.total_num_tokens = torch.zeros([], dtype=torch.int, device=links.device)
        # [overlap] F/B/FB through schedule plans (schedules/overlap.py)
        self.fused = None
        if overlap and not forward_only:
            from megatron_dualpipe.schedules.overlap import OverlapFB

            self.fused = OverlapFB(self)

    # -- transport ---------------------------------------------------------------------
    def _peer(self, chunk: int, direction: str):
        return A.next_rank(self.schedule, self.num_ranks, self.rank, chunk, direction)

    def _recv(self, chunk: int, microbatch: int, kind: str) -> torch.Tensor:
        # Where does the tensor come from? The stage before (act) or after (grad) this one.
        stage = A.stage_of(self.schedule, self.num_ranks, self.rank, chunk)
        direction = chunk if get_spec(self.schedule).bidirectional else 0
        src_stage = stage - 1 if kind == ACT else stage + 1
        src_rank, src_chunk = A.rank_chunk_of_stage(
            self.schedule, self.num_ranks, src_stage, direction=direction
        )
        if src_rank == self.rank:
            return self.local.pop((kind, chunk, microbatch))
        tensor = self.links.recv(self.pp_ranks[src_rank], kind)
        if kind == ACT:
            tensor.requires_grad_(True)
        return tensor

    def _send(self, chunk: int, microbatch: int, tensor: torch.Tensor, kind: str) -> None:
        peer = self._peer(chunk, "forward" if kind == ACT else "backward")
        if peer is None:
            return
        dst_rank, dst_chunk = peer
        if dst_rank == self.rank:
            value = tensor.detach()
            if kind == ACT:
                value.requires_grad_(True)
            self.local[(kind, dst_chunk, microbatch)] = value
        else:
            self.links.send(tensor, self.pp_ranks[dst_rank], kind)

    # -- compute -----------------------------------------------------------------------
    def is_first_microbatch(self, chunk: int) -> bool:
        """Whether this is `chunk`'s first forward of the call (Megatron's rule, with
        `first_val_step` in evaluation). Transformer Engine re-quantizes and caches the FP8
        weights on a chunk's first micro-batch and reuses the cache for the others, so this
        must be true once per step and chunk or FP8 runs on the previous step's weights."""
        first = chunk not in self._forwarded_chunks
        self._forwarded_chunks.add(chunk)
        return self.mcore.check_first_val_step(self.first_val_step, self.forward_only, first)

    def forward(self, chunk: int, microbatch: int) -> None:
        placement = self.placements[chunk]
        input_tensor = None if placement.pre_process else self._recv(chunk, microbatch, ACT)
        batches = self.batches[chunk]
        data = iter([batches[microbatch]]) if batches is not None else None
        output, num_tokens = self.mcore.forward_step(
            self.forward_step_func,
            data,
            self.model[chunk],
            self.num_microbatches,
            input_tensor,
            self.forward_data_store,
            self.config,
            cp_group_size=1,
            collect_non_loss_data=self.collect_non_loss_data,
            is_first_microbatch=self.is_first_microbatch(chunk),
            current_microbatch=microbatch,
            vp_stage=placement.vp_stage,
            is_last_stage=placement.post_process,
        )
        self.total_num_tokens += num_tokens
        if not placement.post_process:
            self._send(chunk, microbatch, output, ACT)
        if not self.forward_only:
            self.saved[(chunk, microbatch)] = (input_tensor, output)

    def backward(self, chunk: int, microbatch: int, split_wgrad: bool) -> None:
        placement = self.placements[chunk]
        input_tensor, output = self.saved.pop((chunk, microbatch))
        output_grad = None if placement.post_process else self._recv(chunk, microbatch, GRAD)
        with WeightGradStore.collect(enabled=split_wgrad) as item:
            input_grad = self.mcore.backward_step(input_tensor, output, output_grad, self.config)
        if split_wgrad:
            self.wgrads.push(item)
        if not placement.pre_process:
            self._send(chunk, microbatch, input_grad, GRAD)

    def run(self, rank_actions: list[A.Action]) -> None:
        for action in rank_actions:
            if action.kind == "W":
                self.wgrads.pop_and_run()
                continue
            if self.fused is not None:  # [overlap]
                self.fused.run(action)
                continue
            for part in action.parts():
                if part.kind == "F":
                    self.forward(part.chunk, part.microbatch)
                else:
                    self.backward(part.chunk, part.microbatch, part.split_wgrad)

    def run_forward_only(self) -> None:
        """Evaluation: every chunk's forwards in an order that respects the stage graph."""
        for action in _forward_only_order(self.schedule, self.num_ranks, self.rank,
                                          self.num_microbatches):
            self.forward(action.chunk, action.microbatch)


def _forward_only_order(schedule: str, num_ranks: int, rank: int, num_microbatches: int):
    """Forwards of the training action list, in the same order (backwards dropped)."""
    rank_actions = A.build_actions(schedule, num_ranks, num_microbatches, zero_bubble=False)[rank]
    return [p for a in rank_actions for p in a.parts() if p.kind == "F"]


def _activation_shape(config, seq_length: int, micro_batch_size: int, tp_size: int):
    seq = seq_length // tp_size if config.sequence_parallel else seq_length
    return (seq, micro_batch_size, config.hidden_size)


def _device(model) -> torch.device:
    """The chunks' device (a chunk of a stage with no decoder layers may have no parameters)."""
    for chunk in model:
        for param in chunk.parameters():
            return param.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_embedding_group(model) -> None:
    from megatron.core import parallel_state
    from megatron.core.utils import get_pg_size

    if get_pg_size(parallel_state.get_embedding_group(check_initialized=False)) > 1 and (
            embedding_copies(model)):
        raise RuntimeError(
            "DualPipe/DualPipeV sum the word-embedding copies (tied head, MTP) on their rank; "
            "Megatron's embedding group would sum them again across ranks. Initialize with "
            "initialize_model_parallel(get_embedding_ranks="
            "megatron_dualpipe.distributed.embedding_ranks)"
        )


def _pipeline_ranks() -> list[int]:
    from megatron.core import parallel_state

    return dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())


def _forward_backward(
    schedule: str,
    *,
    forward_step_func: Callable,
    data_iterator: Union[Iterator, list[Iterator]],
    model: Union[torch.nn.Module, list[torch.nn.Module]],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    decoder_seq_length: Optional[int] = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: Optional[bool] = None,
    adjust_tensor_shapes_fn: Optional[Callable] = None,
    p2p_communicator=None,
    pg_collection=None,
    force_all_reduce: Optional[bool] = False,
    overlap: bool = False,
    zero_bubble: bool = True,
) -> list:
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    model = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(model) != 2:
        raise ValueError(
            f"{schedule} needs two model chunks per rank (got {len(model)}); build the model "
            "with megatron_dualpipe.model.build_model"
        )
    config = get_model_config(model[0])
    _check_embedding_group(model)
    pp_ranks = _pipeline_ranks()
    A.validate(schedule, len(pp_ranks), num_microbatches)
    device = _device(model)
    links = Links(
        pp_ranks,
        _activation_shape(config, seq_length, micro_batch_size,
                          parallel_state.get_tensor_model_parallel_world_size()),
        config.pipeline_dtype or torch.float32,
        device,
    )
    batches = _microbatches(data_iterator, 2, num_microbatches)
    executor = _Executor(schedule, forward_step_func, batches, model, num_microbatches, config,
                         links, pp_ranks, forward_only, collect_non_loss_data,
                         overlap=overlap, first_val_step=first_val_step)  # [overlap]
    if forward_only:
        with torch.no_grad():
            executor.run_forward_only()
        links.wait_sends()
        return executor.forward_data_store

    rank_actions = A.build_actions(schedule, len(pp_ranks), num_microbatches,
                                   overlap=overlap, zero_bubble=zero_bubble)[executor.rank]
    # TE linears defer their weight GEMMs only inside split backwards (te_wgrad.py).
    WeightGradStore.te = deferral_for(model) if zero_bubble else None
    try:
        executor.run(rank_actions)
    finally:
        WeightGradStore.te = None
    links.wait_sends()
    if executor.saved or len(executor.wgrads):
        raise RuntimeError(f"{schedule}: work left after the last action (schedule bug)")
    if get_spec(schedule).bidirectional:
        sum_mirror_grads(model, pp_ranks)
    sum_embedding_copies(model)
    if config.finalize_model_grads_func is not None:
        config.finalize_model_grads_func(
            model,
            executor.total_num_tokens if config.calculate_per_token_loss else None,
            pg_collection=pg_collection,
            force_all_reduce=force_all_reduce,
        )
    return executor.forward_data_store


def forward_backward_dualpipev(**kwargs) -> list:
    """DualPipeV (cut-in-half DualPipe, V-shaped stages) as a Megatron forward_backward_func."""
    return _forward_backward("dualpipev", **kwargs)


def forward_backward_dualpipe(**kwargs) -> list:
    """Bidirectional DualPipe as a Megatron forward_backward_func."""
    return _forward_backward("dualpipe", **kwargs)
