"""The step-time model: per-action costs through our schedule simulator, then the step's tail.

1. Each action of each pipeline rank gets a duration from `costs.StageCost` of the stage(s)
   it runs: ``F`` = forward compute + its all-to-alls, ``B`` = backward-input (+ weight unless
   split) + its all-to-alls, ``W`` = backward-weight, and an overlapped ``F&B`` pair (DualPipe)
   = ``max(X, C + X * COMM_SMS / sms)`` for the pair's compute C and all-to-all X: while the
   communication kernels run they hold `COMM_SMS` of the GPU's SMs (DeepSeek-V3 §3.2.2), so
   communication is hidden only as long as the slowed compute outlasts it.
2. `schedules.simulator.simulate` runs the recipe's action lists with those durations and the
   pipeline p2p time as the cross-rank latency; its makespan and bubble are the pipeline's.
3. After the pipeline: the data-parallel gradient reduce-scatter (fp32 grads, Megatron's
   `grad_reduce_in_fp32`) of each chunk starts when that chunk's last weight gradient is done
   when `parallel.overlap_grad_reduce`, else after the pipeline; whatever runs past the
   pipeline's end is exposed. Then the optimizer (its bytes over HBM bandwidth) and the
   parameter all-gather (Megatron's default: not overlapped).

Not modelled: expert load imbalance (balanced routing assumed), kernel launch and host
overheads beyond what the calibration measured, network contention between EP, PP and DP
traffic, tensor-parallel communication, failures and restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_dualpipe.config.validate import data_parallel_size, num_microbatches, world_size
from megatron_dualpipe.planning.layout import pipeline_ranks
from megatron_dualpipe.planning.memory import (
    GRAD_BYTES,
    chunk_params,
    optimizer_bytes,
    param_bytes,
)
from megatron_dualpipe.planning.predict import flops as FL
from megatron_dualpipe.planning.predict.calibration import Calibration
from megatron_dualpipe.planning.predict.costs import COMM_SMS, GB, MS, CostModel
from megatron_dualpipe.planning.predict.hardware import Hardware, load_hardware
from megatron_dualpipe.schedules.actions import Action, build_actions, stage_of
from megatron_dualpipe.schedules.simulator import Costs, SimResult, simulate

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe

FP8_GATHER_BYTES = 1  # an FP8 weight is gathered in one layout (the other is derived locally)
COMPUTE_PARTS = ("attention", "experts", "dense_mlp", "head")


@dataclass(frozen=True)
class ActionCost:
    """Duration of one action and what it is made of (ms)."""

    parts: dict[str, float]  # compute per part
    a2a: float  # all-to-all time it carries
    duration: float

    @property
    def compute(self) -> float:
        return sum(self.parts.values())


class StepModel:
    """One training step of `recipe` on `hardware` (see the module docstring)."""

    def __init__(self, recipe: Recipe, hardware: Hardware, calibration: Calibration) -> None:
        self.recipe, self.hw, self.cal = recipe, hardware, calibration
        self.costs = CostModel(recipe, hardware, calibration, load_hardware(calibration.hardware))
        p = recipe.parallel
        self.m = num_microbatches(recipe)
        self.chunks = p.vpp or 2
        self.actions = build_actions(p.schedule, p.pp, self.m, overlap=p.overlap_fb,
                                     zero_bubble=p.zero_bubble, num_chunks=self.chunks)
        self._durations: dict[tuple, float] = {}

    # ------------------------------------------------------------------------ actions

    def _stage(self, rank: int, chunk: int):
        p = self.recipe.parallel
        return self.costs.stages[stage_of(p.schedule, p.pp, rank, chunk)]

    def action_cost(self, rank: int, action: Action) -> ActionCost:
        """Duration and contents of `action` on pipeline rank `rank`."""
        parts: dict[str, float] = {}
        a2a = 0.0

        def add(stage, kind: str, split: bool) -> None:
            nonlocal a2a
            for name, t in stage.parts.items():
                ms = {"F": t.f, "B": t.b + (0.0 if split else t.w), "W": t.w}[kind]
                parts[name] = parts.get(name, 0.0) + ms
            a2a += {"F": stage.a2a_f, "B": stage.a2a_b, "W": 0.0}[kind]

        for part in action.parts():
            add(self._stage(rank, part.chunk), part.kind, part.split_wgrad)
        compute = sum(parts.values())
        if action.kind == "FB":
            duration = max(a2a, compute + a2a * COMM_SMS / self.hw.sms)
        else:
            duration = compute + a2a
        return ActionCost(parts, a2a, duration)

    def duration(self, rank: int, action: Action) -> float:
        """`action_cost(rank, action).duration`, cached (it depends on the stages only)."""
        key = (rank, action.kind, action.chunk, action.split_wgrad, action.bwd_chunk,
               action.bwd_split_wgrad)
        if key not in self._durations:
            self._durations[key] = self.action_cost(rank, action).duration
        return self._durations[key]

    def simulate(self, p2p: bool = True) -> SimResult:
        p = self.recipe.parallel
        latency = self.costs.p2p_ms() if p2p else 0.0
        return simulate(p.schedule, self.actions, self.m, Costs(p2p=latency), self.chunks,
                        cost_of=self.duration)

    # ------------------------------------------------------------------------ after the pipeline

    def rank_params(self, pp_rank: int) -> list[tuple[float, float, float]]:
        """Per local chunk: (dense, expert, FP8 GEMM) parameters stored by one GPU."""
        prank = pipeline_ranks(self.recipe)[pp_rank]
        out = [(0.0, 0.0, 0.0)] * len(prank.chunks)
        for c in prank.chunks:
            cp = chunk_params(self.recipe, c)
            out[c.chunk] = (cp.dense, cp.expert, cp.gemm)
        return out

    def tail(self, pp_rank: int, sim: SimResult) -> dict[str, float]:
        """Reduce-scatter (total, exposed), optimizer and all-gather ms of one pipeline rank."""
        r, p = self.recipe, self.recipe.parallel
        dp, edp = self.costs.data_parallel()
        bw_dense = self.costs.dp_bandwidth(dp, p.tp) * GB
        bw_expert = self.costs.dp_bandwidth(edp, p.tp * p.ep) * GB
        fp8_weights = r.fp8.param_gather and r.fp8.recipe != "none"
        ready = self._grads_ready(pp_rank, sim)
        t = 0.0 if p.overlap_grad_reduce else sim.makespan
        rs_total = ag = opt = 0.0
        for chunk, (dense, expert, gemm) in enumerate(self.rank_params(pp_rank)):
            rs = GRAD_BYTES * ((dp - 1) / dp * dense / bw_dense
                               + (edp - 1) / edp * expert / bw_expert) * MS
            t = max(t, ready.get(chunk, 0.0)) + rs
            rs_total += rs
            share = (dense / dp + expert / edp) if p.distributed_optimizer else dense + expert
            # Adam reads and writes its state, reads the gradient, writes the weight.
            opt += (optimizer_bytes(r) * 2 + GRAD_BYTES + param_bytes(r)) * share / (
                self.hw.hbm_gb_per_s * GB) * MS
            if p.distributed_optimizer:  # the updated weights, FP8 GEMM weights with param_gather
                n = max(dense + expert, 1.0)
                w_bytes = ((n - gemm) * param_bytes(r)
                           + gemm * (FP8_GATHER_BYTES if fp8_weights else param_bytes(r))) / n
                ag += w_bytes * ((dp - 1) / dp * dense / bw_dense
                                 + (edp - 1) / edp * expert / bw_expert) * MS
        return {"reduce_scatter": rs_total, "reduce_scatter_exposed": max(0.0, t - sim.makespan),
                "optimizer": opt, "all_gather": ag}

    def _grads_ready(self, pp_rank: int, sim: SimResult) -> dict[int, float]:
        """Per local chunk: end time of its last weight-gradient work on this rank."""
        ready: dict[int, float] = {}
        for e in sim.timelines[pp_rank]:
            for part in e.action.parts():
                if part.kind == "W" or (part.kind == "B" and not part.split_wgrad):
                    ready[part.chunk] = max(ready.get(part.chunk, 0.0), e.end)
        return ready

    # ------------------------------------------------------------------------ the step

    def step_ms(self, sim: SimResult) -> tuple[float, list[dict[str, float]]]:
        """Step time (ms): the pipeline, then the slowest rank's exposed reduce-scatter,
        optimizer and all-gather; and every rank's `tail` (with its `end`)."""
        tails = [self.tail(k, sim) for k in range(self.recipe.parallel.pp)]
        for t in tails:
            t["end"] = (sim.makespan + t["reduce_scatter_exposed"] + t["optimizer"]
                        + t["all_gather"])
        return max(t["end"] for t in tails), tails

    def run(self) -> dict:
        """Everything `plan --predict` reports (times in seconds unless named `_ms`)."""
        r = self.recipe
        sim = self.sim = self.simulate()
        no_p2p = self.simulate(p2p=False)
        step_ms, tails = self.step_ms(sim)
        last = max(range(len(tails)), key=lambda k: tails[k]["end"])
        world = world_size(r)
        tokens = r.train.global_batch_size * r.model.seq_length
        busiest = max(range(r.parallel.pp), key=lambda k: sim.compute_per_rank[k])
        per_gpu = tokens / world / (step_ms / MS)
        model_flops = FL.model_flops_per_token(r)
        peak = self.hw.bf16_tflops * 1e12
        return {
            "hardware": self.hw.name,
            "calibration": {"path": self.cal.path, "source": self.cal.source,
                            "hardware": self.cal.hardware},
            "step_time_s": step_ms / MS,
            "tokens_per_step": tokens,
            "tokens_per_s_per_gpu": per_gpu,
            "mfu": per_gpu * model_flops / peak,
            "mfu_convention": "model FLOPs (6 x activated GEMM params + causal attention, main "
                              "model + MTP) per GPU over the dense BF16 peak",
            "model_tflops_per_gpu": per_gpu * model_flops / 1e12,
            "bubble_fraction": sim.bubble / sim.makespan,
            "pipeline_makespan_s": sim.makespan / MS,
            "pipeline_bubble_s": sim.bubble / MS,
            "gpu_hours_per_trillion_tokens": world * step_ms / MS / tokens * 1e12 / 3600,
            "world_size": world,
            "num_microbatches": self.m,
            "dp": data_parallel_size(r),
            "breakdown_rank": busiest,
            "breakdown_s": self.breakdown(busiest, sim, no_p2p, tails[last]),
        }

    def breakdown(self, rank: int, sim: SimResult, no_p2p: SimResult,
                  tail: dict[str, float]) -> dict[str, dict[str, float]]:
        """Per part: time spent on `rank` and the part of it that lengthens the step (s)."""
        out = {k: {"total": 0.0, "exposed": 0.0} for k in COMPUTE_PARTS}
        a2a = a2a_exposed = 0.0
        for e in sim.timelines[rank]:
            c = self.action_cost(rank, e.action)
            for k, v in c.parts.items():
                out[k]["total"] += v / MS
                out[k]["exposed"] += v / MS
            a2a += c.a2a
            a2a_exposed += c.duration - c.compute
        out["dispatch_combine"] = {"total": a2a / MS, "exposed": a2a_exposed / MS}
        p2p = self.costs.p2p_ms() * 2 * self.m * len(pipeline_ranks(self.recipe)[0].chunks)
        out["pipeline_p2p"] = {"total": p2p / MS,
                               "exposed": (sim.makespan - no_p2p.makespan) / MS}
        out["dp_reduce"] = {"total": (tail["reduce_scatter"] + tail["all_gather"]) / MS,
                            "exposed": (tail["reduce_scatter_exposed"] + tail["all_gather"]) / MS}
        out["optimizer"] = {"total": tail["optimizer"] / MS, "exposed": tail["optimizer"] / MS}
        out["bubble"] = {"total": sim.bubble_per_rank[rank] / MS,
                         "exposed": sim.bubble_per_rank[rank] / MS}
        return out


def predict(recipe: Recipe, hardware: Hardware, calibration: Calibration,
            model: StepModel | None = None) -> dict:
    """`StepModel(...).run()` (or `model.run()`), plus `exposed_comm_fraction`: the share of
    the step that would go away with infinitely fast links (same model, all links infinite)."""
    out = (model or StepModel(recipe, hardware, calibration)).run()
    free = StepModel(recipe, hardware.with_bandwidth_scale(float("inf")), calibration).run()
    out["exposed_comm_fraction"] = 1 - free["step_time_s"] / out["step_time_s"]
    out["step_time_without_comm_s"] = free["step_time_s"]
    return out
