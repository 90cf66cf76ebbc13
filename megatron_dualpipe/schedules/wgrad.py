"""Zero-bubble weight-gradient split: defer the weight GEMMs of a backward to a later W.

While `WeightGradStore.collect()` is active, linear layers that support deferral (Megatron's
own linears through `patches/deferred_wgrad_linear.py`; Transformer Engine linears through
their delayed `wgrad_store` and `backward_dw()`, see `te_wgrad.py`) compute only the input
gradient and queue a closure for the weight gradient. `collect()` returns the queued closures
of that backward as one item; a later W action runs them (`run(item)`), accumulating into
`main_grad` exactly where Megatron's DDP hook would have.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable

import torch


class WeightGradStore:
    """Process-wide switch and queue, like DeepSeek's WeightGradStore."""

    _collecting: list[Callable[[], None]] | None = None
    num_deferred = 0  # weight GEMMs deferred so far in this process (for tests and logs)
    te = None  # TEWeightGradDeferral of the model being scheduled (schedules/te_wgrad.py)

    @classmethod
    def deferring(cls) -> bool:
        return cls._collecting is not None

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        cls._collecting.append(func)
        cls.num_deferred += 1

    @classmethod
    @contextlib.contextmanager
    def collect(cls, enabled: bool = True):
        """Within the block, deferrable weight gradients are queued into the yielded list."""
        if not enabled:
            yield []
            return
        if cls._collecting is not None:
            raise RuntimeError("WeightGradStore.collect() does not nest")
        item: list[Callable[[], None]] = []
        cls._collecting = item
        te = cls.te.deferring(item) if cls.te else contextlib.nullcontext()
        try:
            with te:
                yield item
        finally:
            cls._collecting = None

    @staticmethod
    @torch.no_grad()
    def run(item: list[Callable[[], None]]) -> None:
        for func in item:
            func()


class WeightGradQueue:
    """FIFO of deferred backward items of one schedule step (W pops the oldest)."""

    def __init__(self) -> None:
        self._items: deque = deque()

    def push(self, item) -> None:
        self._items.append(item)

    def pop_and_run(self) -> None:
        WeightGradStore.run(self._items.popleft())

    def __len__(self) -> int:
        return len(self._items)


def accumulate_weight_grad(weight: torch.Tensor, grad_weight: torch.Tensor) -> None:
    """Add a weight gradient where Megatron's DDP grad hook would put it."""
    if hasattr(weight, "main_grad") and weight.main_grad is not None:
        weight.main_grad.add_(grad_weight)
    elif weight.grad is None:
        weight.grad = grad_weight
    else:
        weight.grad.add_(grad_weight)


class DeferrableLinear(torch.autograd.Function):
    """y = x W^T (+ b); the W gradient is deferred while `WeightGradStore` is collecting.

    Numerics are those of Megatron's `LinearWithGradAccumulationAndAsyncCommunication` for
    the cases it is used for (no sequence parallelism, no gradient-accumulation fusion).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, allreduce_dgrad, tp_group):
        ctx.save_for_backward(input, weight)
        ctx.use_bias = bias is not None
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.tp_group = tp_group
        output = torch.matmul(input, weight.t())
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)
        handle = None
        if ctx.allreduce_dgrad:
            handle = torch.distributed.all_reduce(grad_input, group=ctx.tp_group, async_op=True)
        grad_bias = None
        if ctx.use_bias:
            grad_bias = grad_output.contiguous().view(-1, grad_output.shape[-1]).sum(dim=0)

        def weight_grad(grad_output=grad_output.detach(), input=input.detach()):
            grad_output_2d = grad_output.contiguous()
            input_2d = input.contiguous()
            if grad_output_2d.dim() == 3:
                grad_output_2d = grad_output_2d.view(-1, grad_output_2d.shape[2])
                input_2d = input_2d.view(-1, input_2d.shape[2])
            return grad_output_2d.t().matmul(input_2d)

        if WeightGradStore.deferring():
            WeightGradStore.put(lambda: accumulate_weight_grad(weight, weight_grad()))
            grad_weight = None
        else:
            grad_weight = weight_grad()
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None
