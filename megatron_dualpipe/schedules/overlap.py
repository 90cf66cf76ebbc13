"""Overlapped F&B chunks for DualPipe/DualPipeV on Megatron-Core's schedule plans.

With ``overlap=True`` the executor (`dualpipe.py`) hands every F, B and FB action of a training
step to `OverlapFB`. A forward builds the chunk's `TransformerModelChunkSchedulePlan`
(``GPTModel.build_schedule_plan``, through ``forward_step_func(..., return_schedule_plan=True)``)
and runs it; the plan is kept on the output tensor for the backward, as in Megatron's combined
1F1B. An FB action runs the forward plan of (chunk c1, micro-batch m1) and the backward plan of
(chunk c2, micro-batch m2) as one `TransformerModelChunkSchedulePlan.run(f_plan, b_plan)`: layer
by layer, the attention / dispatch / experts / combine nodes of the forward interleave with
the combine / experts / dispatch / attention backward nodes of the other chunk, the all-to-alls
on Megatron's communication stream and the compute on the current stream, so each all-to-all
of one micro-batch runs under compute of the other (DeepSeek-V3's F&B chunk). The two chunks
are different `GPTModel`s (our two-chunk layouts), which the plans allow: the plan of a chunk
holds its own model and layers. With EP=1 (no all-to-all) the plan keeps every node input
(`keep_node_inputs`).

This is `megatron.core.pipeline_parallel.combined_1f1b.combined_forward_backward_step` with
our layout's stage flags: the loss is computed where ``placement.post_process`` says (not
parallel_state's last stage), P2P goes through our per-flow links, and a standalone B keeps
the zero-bubble W split (`WeightGradStore`); a B inside an FB is not split (as in DeepSeek's
DualPipe).

On CPU (gloo, our CUDA patches) streams and events are null objects and every node runs in
program order, so the plan path runs sequentially; `Tensor.record_stream` (called by the plan
nodes on CUDA tensors) is a no-op for CPU tensors while a plan runs (`patches/record_stream.py`).
Numerics are those of the unfused path (checked by tests/test_overlap_exact.py).
"""

from __future__ import annotations

import contextlib

import torch

from megatron_dualpipe.patches.record_stream import cpu_record_stream
from megatron_dualpipe.schedules.p2p import ACT, GRAD
from megatron_dualpipe.schedules.wgrad import WeightGradStore

FB_ANNOTATION = "dualpipe.FB"  # profiler range of an overlapped F&B (trace --window dualpipe.FB)


def keep_node_inputs(plan) -> None:
    """Turn off the plan nodes' early freeing of their inputs.

    The nodes free the input of dispatch/experts/combine after their forward because the
    all-to-all makes a new tensor. With EP=1 the all-to-all returns its input, so the freed
    storage is the next node's input (Megatron's combined 1F1B asserts EP > 1 for this).
    """
    for i in range(plan.num_layers()):
        layer = plan.get_layer(i)
        for name in ("pre_dispatch_computation", "moe_dispatch", "mlp", "moe_combine",
                     "mtp_post_process"):
            node = getattr(layer, name, None)
            if hasattr(node, "free_input"):
                node.free_input = False


def _annotate(name: str):
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


class OverlapFB:
    """Forward/backward of model chunks through schedule plans, for one `_Executor`."""

    num_fused = 0  # FB actions run as one plan in this process (tests, logs)

    def __init__(self, executor):
        from megatron.core.pipeline_parallel.utils import set_streams

        self.ex = executor
        self.config = executor.config
        set_streams(high_priority=getattr(self.config, "high_priority_a2a_comm_stream", False))
        self.on_cpu = executor.links.device.type != "cuda"

    # -- action dispatch ---------------------------------------------------------------
    def run(self, action) -> None:
        """Run an F, B or FB action (W stays with the executor)."""
        if action.kind == "F":
            self.step((action.chunk, action.microbatch), None)
        elif action.kind == "B":
            self.step(None, (action.chunk, action.microbatch, action.split_wgrad))
        elif action.kind == "FB":
            name = f"{FB_ANNOTATION} F{action.chunk}.{action.microbatch}" \
                   f"&B{action.bwd_chunk}.{action.bwd_microbatch}"
            OverlapFB.num_fused += 1
            with _annotate(name):
                self.step((action.chunk, action.microbatch),
                          (action.bwd_chunk, action.bwd_microbatch, False))
        else:
            raise ValueError(f"OverlapFB cannot run a {action.kind} action")

    def step(self, fwd: tuple[int, int] | None, bwd: tuple[int, int, bool] | None) -> None:
        """Forward of ``fwd=(chunk, mb)`` and/or backward of ``bwd=(chunk, mb, split_wgrad)``.

        Receives both inputs first, runs the fused plan, then sends both outputs (the order of
        DeepSeek's `_forward_backward_chunk`); sends never block (isend).
        """
        ex = self.ex
        f_input = None
        if fwd is not None and not ex.placements[fwd[0]].pre_process:
            f_input = ex._recv(fwd[0], fwd[1], ACT)
        b_state = None
        if bwd is not None:
            b_input, b_output = ex.saved.pop((bwd[0], bwd[1]))
            b_grad = None if ex.placements[bwd[0]].post_process else ex._recv(bwd[0], bwd[1], GRAD)
            b_state = (b_input, b_output, b_grad)
        split = bwd is not None and bwd[2]
        with WeightGradStore.collect(enabled=split) as item, \
                (cpu_record_stream() if self.on_cpu else contextlib.nullcontext()):
            output, num_tokens, input_grad = self._fused(fwd, f_input, bwd, b_state)
        if split:
            ex.wgrads.push(item)
        if fwd is not None:
            chunk, mb = fwd
            ex.total_num_tokens += num_tokens
            if not ex.placements[chunk].post_process:
                ex._send(chunk, mb, output, ACT)
            ex.saved[(chunk, mb)] = (f_input, output)
        if bwd is not None and not ex.placements[bwd[0]].pre_process:
            ex._send(bwd[0], bwd[1], input_grad, GRAD)

    # -- Megatron's combined_forward_backward_step, with our stage flags ----------------
    def _forward_plan(self, chunk: int, microbatch: int, input_tensor):
        from megatron.core.pipeline_parallel.schedules import set_current_microbatch
        from megatron.core.pipeline_parallel.utils import AbstractSchedulePlan
        from megatron.core.utils import get_attr_wrapped_model

        ex = self.ex
        model = ex.model[chunk]
        if ex.is_first_microbatch(chunk) and hasattr(model, "set_is_first_microbatch"):
            model.set_is_first_microbatch()  # refresh TE's FP8 weight cache (see the executor)
        set_current_microbatch(model, microbatch)
        get_attr_wrapped_model(model, "set_input_tensor")([input_tensor])
        batches = ex.batches[chunk]
        data = iter([batches[microbatch]]) if batches is not None else None
        unwrapped = get_attr_wrapped_model(model, "build_schedule_plan", return_model_obj=True)
        with self._autocast():
            plan, loss_func = ex.forward_step_func(data, unwrapped, return_schedule_plan=True)
        if not isinstance(plan, AbstractSchedulePlan):
            raise TypeError("forward_step_func(..., return_schedule_plan=True) must return a "
                            "schedule plan (GPTModel.build_schedule_plan) first")
        if self.config.expert_model_parallel_size == 1:
            keep_node_inputs(plan)
        return plan, loss_func

    def _backward_plan(self, b_input, b_output, b_grad):
        """The stored plan of a backward, and the gradient at its output (loss backward on the
        last stage)."""
        if b_input is not None:
            b_input.retain_grad()
        plan, loss_node = b_output.schedule_plan, b_output.loss_func
        b_output.schedule_plan = b_output.loss_func = None
        if b_grad is None:
            loss = b_output
            if self.config.grad_scale_func is not None:
                loss = self.config.grad_scale_func(loss)
            torch.autograd.backward(loss)
            b_grad = loss_node.get_grad()
            loss_node._release_state()
        return plan, b_grad

    def _autocast(self):
        if self.config.enable_autocast:
            return torch.autocast("cuda", dtype=self.config.autocast_dtype)
        return contextlib.nullcontext()

    def _fused(self, fwd, f_input, bwd, b_state):
        from megatron.core.enums import Fp8Recipe
        from megatron.core.fp8_utils import get_fp8_context
        from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
        from megatron.core.pipeline_parallel.utils import ScheduleNode, get_comp_stream

        ex, config = self.ex, self.config
        f_plan = loss_func = b_plan = b_grad = None
        if fwd is not None:
            f_plan, loss_func = self._forward_plan(fwd[0], fwd[1], f_input)
        if bwd is not None:
            b_plan, b_grad = self._backward_plan(*b_state)
        outer_fp8 = contextlib.nullcontext()
        if config.fp8 and config.fp8_recipe == Fp8Recipe.delayed:
            outer_fp8 = get_fp8_context(config)
        with self._autocast(), outer_fp8:
            out = type(f_plan or b_plan).run(f_plan, b_plan, b_grad=b_grad)

        output = num_tokens = None
        if fwd is not None:
            chunk = fwd[0]
            placement = ex.placements[chunk]
            loss_node = ScheduleNode(loss_func, get_comp_stream, f_plan.event, name="loss_func")
            output, num_tokens = forward_step_calc_loss(
                ex.model[chunk], out, loss_node.forward, config, placement.vp_stage,
                ex.collect_non_loss_data, ex.num_microbatches, ex.forward_data_store,
                cp_group_size=1, is_last_stage=placement.post_process,
            )
            output.schedule_plan = f_plan
            output.loss_func = loss_node
        input_grad = None
        if bwd is not None and b_state[0] is not None:
            input_grad = b_state[0].grad
        return output, num_tokens, input_grad
