"""Validation loss: a forward-only pass of the recipe's own pipeline schedule.

Every schedule (Megatron's 1F1B and interleaved, our DualPipe and DualPipeV) takes
`forward_only=True` and returns the last stages' per-micro-batch loss sums and token counts;
their sum over all ranks divided by the token count is the same number whichever schedule or
layout computed it. As in Megatron's `evaluate`, the chunks are in eval mode and no autograd
graph is built (so the MoE router's bias statistics and EPLB's load counts stay untouched).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_dualpipe.schedules.registry import forward_backward_func
from megatron_dualpipe.schedules.spec import run_options


def evaluation_due(train_config, steps_done: int) -> bool:
    """Whether a validation pass follows the `steps_done`-th training step."""
    if not train_config.eval_iters:
        return False
    interval = train_config.eval_interval
    return steps_done == train_config.steps or bool(interval and steps_done % interval == 0)


def evaluate(state, source, forward_step_func) -> float:
    """Per-token loss over `train.eval_iters` global batches of `source` (the same batches on
    every call). Collective: every rank of the job calls it."""
    from megatron.core import parallel_state

    recipe = state.recipe
    zero_bubble, overlap = run_options(recipe.parallel, state.device.type == "cuda")
    fb = forward_backward_func(recipe.parallel.schedule, zero_bubble=zero_bubble,
                               overlap=overlap)
    pair = torch.zeros(2, dtype=torch.float64, device=state.device)
    count_here = parallel_state.get_tensor_model_parallel_rank() == 0
    for chunk in state.model:
        chunk.eval()
    try:
        with torch.no_grad():
            for batch in range(recipe.train.eval_iters):
                store = fb(
                    forward_step_func=forward_step_func,
                    data_iterator=source.iterators(batch, len(state.model)),
                    model=state.model,
                    num_microbatches=source.num_microbatches,
                    seq_length=recipe.model.seq_length,
                    micro_batch_size=recipe.train.micro_batch_size,
                    forward_only=True,
                )
                if count_here:
                    for out in store:
                        pair += out["lm loss"].to(torch.float64)
    finally:
        for chunk in state.model:
            chunk.train()
    dist.all_reduce(pair)
    return float(pair[0] / pair[1])
