"""Training-time EPLB: the router class and the `TrainHook` that the training loop installs.

``make_extension(recipe)`` returns ``(router_cls, hook)``; `train.py` builds the MoE layers
with ``router_cls`` (physical slots = logical experts + ``eplb.num_redundant_experts``) and
calls the hook:

* ``on_build``: finds the EPLB layers, counts each logical expert once in the gradient norm,
  and wraps ``config.finalize_model_grads_func`` so replica gradients are summed alongside
  Megatron's DP/EP gradient reduction.
* ``on_step_end``: reduces this step's expert loads, updates the planning window, adds the
  balance metrics to the step record and, every ``eplb.interval`` steps, replans and moves
  experts (`rebalance.py`).

See ``docs/eplb_training.md``.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from megatron_dualpipe.eplb.load_tracker import LoadWindow, balance_stats, step_counts
from megatron_dualpipe.eplb.payoff import PayoffTracker, plain_balancedness, routed_expert_share
from megatron_dualpipe.eplb.rebalance import MoveStats, RebalanceError, move_experts, plan
from megatron_dualpipe.eplb.replicas import (
    OptimizerAccess,
    find_layers,
    mark_duplicates,
    sum_replica_grads,
)
from megatron_dualpipe.eplb.router import make_router_class
from megatron_dualpipe.eplb.topology import planner_topology
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.hooks import TrainHook


def make_extension(recipe):
    """``(router_cls, hook)`` for a recipe with ``eplb.enabled``."""
    router_cls = make_router_class(recipe.moe.num_experts, recipe.moe.router_bias_init)
    return router_cls, EPLBHook(recipe)


class EPLBHook(TrainHook):
    """Replica gradients, load tracking, metrics and live rebalancing (one per process)."""

    def __init__(self, recipe):
        self.recipe = recipe
        self.layers = []
        self.access = None
        self.window = None
        self.num_ids = recipe.model.num_layers + recipe.model.mtp_num_layers + 1
        self.last_move: MoveStats | None = None
        self.last_plan = None
        self.last_plan_seconds = 0.0
        self.payoff = PayoffTracker(routed_expert_share(recipe))
        self.paid = True  # the last verdict (the hint is logged when it turns to "does not pay")

    # -- TrainHook ------------------------------------------------------------------------
    def on_build(self, state) -> None:
        from megatron.core import parallel_state

        self.layers = find_layers(state.model)
        self.access = OptimizerAccess(state.optimizer)
        e = self.recipe.eplb
        self.window = LoadWindow(len(self.layers), self.recipe.moe.num_experts, e.window,
                                 e.window_kind)
        overlap = self.recipe.parallel.overlap_grad_reduce
        if overlap and parallel_state.get_expert_data_parallel_world_size() > 1:
            raise UserError("eplb with parallel.overlap_grad_reduce needs expert-data-parallel "
                             "size 1 (replica gradients are summed after the reduction)")
        mark_duplicates(self.layers, self.access)
        self._wrap_finalize(state.config, overlap)
        for layer in self.layers:
            layer.router.take_counts()

    def on_step_end(self, state, record: dict) -> None:
        experts, slots = step_counts(self.layers)
        if self.layers:
            self.window.update(experts)
        ep = self.recipe.parallel.ep
        bal, over = balance_stats(slots, ep) if self.layers else (torch.zeros(0),) * 2
        plain = plain_balancedness(experts, ep) if self.layers else torch.zeros(0)
        per_layer_bal, per_layer_over, per_layer_plain = self._gather_per_layer(bal, over, plain)
        record["eplb_balancedness"] = sum(per_layer_bal) / max(1, len(per_layer_bal))
        record["eplb_balancedness_per_layer"] = per_layer_bal
        record["eplb_max_over_mean"] = max(per_layer_over, default=1.0)
        record["eplb_replanned"] = 0
        if per_layer_bal:
            self.payoff.add_step(sum(per_layer_plain) / len(per_layer_plain),
                                 record["eplb_balancedness"], record["step_time_s"])
        if (record["step"] + 1) % self.recipe.eplb.interval == 0:
            stats = self.rebalance(state)
            if stats is not None:
                record.update(self.move_record(stats))
                self._check_payoff(record)

    def _check_payoff(self, record: dict) -> None:
        """Does EPLB pay over the last interval (eplb/payoff.py)? Logs a hint when it stops."""
        verdict = self.payoff.check((record["eplb_move_ms"] + record["eplb_plan_ms"]) / 1e3)
        if verdict is None:
            return
        record["eplb_payoff_saved_ms"] = verdict.saved_ms
        record["eplb_payoff_cost_ms"] = verdict.cost_ms
        if not verdict.pays and self.paid and dist.get_rank() == 0:
            print(verdict.hint(), file=sys.stderr, flush=True)
        self.paid = verdict.pays

    # -- checkpoint: routed experts in logical layout + placement (eplb/ckpt.py) -----------
    def checkpoint_state_dict(self, state, sharded: dict) -> dict:
        from megatron_dualpipe.eplb import ckpt

        return ckpt.without_experts(sharded, state)

    def on_save(self, state, path) -> None:
        from megatron_dualpipe.eplb import ckpt

        ckpt.save_experts(self, path)

    def load_state_dict(self, state, loaded: dict) -> bool:
        from megatron_dualpipe.eplb import ckpt

        ckpt.load_model_and_optimizer(state, loaded)  # everything but the routed experts
        return True

    def on_load(self, state, path) -> None:
        from megatron_dualpipe.eplb import ckpt

        ckpt.load_experts(self, path)  # fill every slot from its logical expert

    # -- rebalance ------------------------------------------------------------------------
    def rebalance(self, state=None, *, force: bool = False, placement: dict | None = None,
                  fault=None) -> MoveStats | None:
        """Replan from the load window and move experts (collective over all ranks).

        ``force`` ignores ``eplb.min_gain``; ``placement`` (``{layer_id: phy2log}``, every local
        layer) skips the planner. Returns the move statistics, or None when the move failed
        (the old placement stays).
        """
        e = self.recipe.eplb
        new = torch.zeros(0, 0, dtype=torch.long)
        self.last_plan, self.last_plan_seconds = None, 0.0
        if placement is not None and self.layers:
            new = torch.stack([torch.as_tensor(placement[layer.layer_id], dtype=torch.long)
                               for layer in self.layers])
        elif self.layers:
            start = time.perf_counter()
            num_groups, num_nodes = planner_topology(self.recipe)
            self.last_plan = plan(
                self.layers, self.window.estimate(), num_groups=num_groups, num_nodes=num_nodes,
                policy=e.policy, migration_aware=e.migration_aware, min_gain=e.min_gain,
                force=force)
            new = self.last_plan.new
            self.last_plan_seconds = time.perf_counter() - start
        try:
            stats = move_experts(self.layers, self.access, new, fault=fault)
        except RebalanceError as err:
            if err.__cause__ is not None or dist.get_rank() == 0:
                print(f"[eplb] rank {dist.get_rank()}: {err}", file=sys.stderr, flush=True)
            return None
        self.last_move = stats
        return stats

    def placement(self) -> dict[int, torch.Tensor]:
        """``{layer_id: phy2log}`` of this rank's EPLB layers."""
        return {layer.layer_id: layer.phy2log.clone() for layer in self.layers}

    # -- internals ------------------------------------------------------------------------
    def _wrap_finalize(self, config, overlap: bool) -> None:
        inner = config.finalize_model_grads_func
        layers = self.layers

        def finalize_with_replicas(*args, **kwargs):
            # Summing before the DP reduce-scatter/all-reduce is exact for any expert-DP size
            # (both are sums); with overlapped reduction the buffers are already in flight.
            if not overlap:
                sum_replica_grads(layers)
            out = inner(*args, **kwargs) if inner is not None else None
            if overlap:
                sum_replica_grads(layers)
            return out

        config.finalize_model_grads_func = finalize_with_replicas

    def _gather_per_layer(self, *per_layer: torch.Tensor) -> tuple[list[float], ...]:
        """Per-layer values (one ``[local layers]`` tensor each) of every pipeline stage, in
        layer order, on every rank."""
        n = len(per_layer)
        buf = torch.zeros(n + 1, self.num_ids, dtype=torch.float64)
        for layer, *values in zip(self.layers, *(v.tolist() for v in per_layer)):
            buf[:, layer.layer_id] += torch.tensor([*values, 1.0], dtype=torch.float64)
        buf = _all_reduce_cpu(buf)
        present = buf[n] > 0
        values = buf[:n, present] / buf[n, present]
        return tuple(row.tolist() for row in values)

    def move_record(self, stats: MoveStats) -> dict:
        changed = torch.zeros(self.num_ids + 3, dtype=torch.float64)
        for layer_id in stats.layers:
            changed[layer_id] = 1.0
        changed[-3] = stats.bytes_received
        changed[-2] = stats.seconds
        changed[-1] = self.last_plan_seconds
        changed = _all_reduce_cpu(changed, op=dist.ReduceOp.MAX)
        out = {
            "eplb_replanned": int(changed[:-3].sum()),
            "eplb_move_bytes_max_rank": int(changed[-3]),
            "eplb_move_ms": float(changed[-2]) * 1e3,
            "eplb_plan_ms": float(changed[-1]) * 1e3,
        }
        plan = self.last_plan
        empty = torch.zeros(0, dtype=torch.float64)
        before, after = self._gather_per_layer(
            plan.balancedness_before if plan is not None else empty,
            plan.balancedness_after if plan is not None else empty)
        if before:
            out["eplb_planned_balancedness_before"] = sum(before) / len(before)
            out["eplb_planned_balancedness_after"] = sum(after) / len(after)
        return out


def _all_reduce_cpu(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor over the world (through the GPU under NCCL)."""
    if dist.get_backend() == "nccl":
        dev = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(dev, op=op)
        return dev.cpu()
    dist.all_reduce(t, op=op)
    return t
