"""Per-stage costs of one micro-batch: compute from the calibration, communication from bytes.

Compute: each decoder layer is `attention` + `moe` (or `dense_mlp`), the last stage adds the
output head and the MTP block (its 2h->h projection, one layer and its own head), stage 0's
embedding is a lookup (no cost). Times come from `calibration.py` (FLOPs-scaled, peak-scaled),
divided by `tp`. The layer runs in FP8 when the recipe's FP8 covers it; the head stays BF16.

Expert-parallel all-to-all per MoE layer and micro-batch (DeepSeek-V3 §3.2.2's kernels): a
token goes over InfiniBand once to each *other* node holding one of its experts, and over
NVLink to the GPUs of its experts inside a node; the IB and NVLink parts run at the same time,
so a dispatch or combine takes the longer of the two. Forward: dispatch (FP8 with
`fp8.dispatch`, else BF16) and combine (BF16); backward: both in BF16.

Pipeline p2p: one activation (`tokens x hidden` in BF16) per micro-batch and stage boundary,
over IB when the two pipeline ranks are on different nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_dualpipe.config.stage_split import layers_of_stage, num_stages
from megatron_dualpipe.config.validate import data_parallel_size, world_size
from megatron_dualpipe.planning import params as P
from megatron_dualpipe.planning.memory import _fp8_layer
from megatron_dualpipe.planning.predict import flops as FL
from megatron_dualpipe.planning.predict.calibration import ZERO, Calibration, PassTimes
from megatron_dualpipe.planning.predict.hardware import Hardware

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe

MS = 1e3
GB = 1e9
BF16_BYTES = 2
FP8_BYTES = 1
FP8_SCALE_BYTES_PER_ELEMENT = 4 / 128  # one fp32 scale per 1x128 tile (DeepSeek-V3 §3.3.2)
# DeepSeek-V3 §3.2.2: 20 of the H800's 132 SMs run the all-to-all kernels; while they run,
# compute has the rest. Used as a fraction of the GPU's SMs.
COMM_SMS = 20


@dataclass(frozen=True)
class StageCost:
    """One micro-batch through one stage: compute per part (ms) and all-to-all time (ms)."""

    stage: int
    parts: dict[str, PassTimes]  # attention, experts, dense_mlp, head (incl. MTP)
    a2a_f: float  # dispatch + combine of the forward, all MoE layers of the stage
    a2a_b: float  # their backward

    @property
    def compute(self) -> PassTimes:
        total = ZERO
        for t in self.parts.values():
            total = total + t
        return total


def precision_of_layer(recipe: Recipe, layer: int) -> str:
    return "fp8" if _fp8_layer(recipe, layer) else "bf16"


class CostModel:
    """A recipe's micro-batch costs on `hardware`, from a `calibration` taken on `calib_hw`."""

    def __init__(self, recipe: Recipe, hardware: Hardware, calibration: Calibration,
                 calib_hw: Hardware) -> None:
        self.recipe, self.hw, self.cal, self.calib_hw = recipe, hardware, calibration, calib_hw
        self.tokens = recipe.model.seq_length * recipe.train.micro_batch_size
        self.stages = [self._stage(s) for s in range(num_stages(recipe))]

    # ------------------------------------------------------------------------ compute

    def part(self, part: str, precision: str, flops: FL.PartFlops) -> PassTimes:
        """One micro-batch of `part` doing `flops` per token, on this hardware, over tp."""
        ratio = self.hw.peak_tflops(precision) / self.calib_hw.peak_tflops(precision)
        t = self.tokens / self.recipe.parallel.tp
        return self.cal.part_times(precision, part, flops.forward * t, flops.backward_input * t,
                                   flops.backward_weight * t, ratio)

    def layer(self, layer: int) -> dict[str, PassTimes]:
        r = self.recipe
        prec = precision_of_layer(r, layer)
        out = {"attention": self.part("attention", prec, FL.attention(r))}
        if P.is_moe_layer(r, layer):
            out["experts"] = self.part("moe", prec, FL.moe(r))
        else:
            out["dense_mlp"] = self.part("dense_mlp", prec, FL.dense_mlp(r))
        return out

    def head_and_mtp(self) -> PassTimes:
        """Output head, plus per MTP depth its 2h->h projection and its own head (BF16)."""
        r = self.recipe
        head = self.part("head", "bf16", FL.head(r))
        mtp = head + self.part("head", "bf16", FL.mtp_projection(r))
        return head + mtp.scaled(r.model.mtp_num_layers)

    # ------------------------------------------------------------------------ communication

    def ep_layout(self) -> tuple[int, int]:
        """(nodes one EP group spans, GPUs of the group per node)."""
        p = self.recipe.parallel
        span = p.tp * p.ep
        gpn = self.hw.gpus_per_node
        nodes = max(1, -(-span // gpn))
        return nodes, min(p.ep, max(1, gpn // p.tp))

    def destination_nodes(self, nodes: int) -> float:
        """Expected nodes (own included) holding at least one of a token's `topk` experts:
        uniform routing over the group's nodes, capped at `moe.group_topk` when the routing
        groups are the nodes (node-limited routing, DeepSeek-V3 §2.1.2: at most 4 nodes)."""
        moe = self.recipe.moe
        spread = nodes * (1 - (1 - 1 / nodes) ** moe.topk)
        if moe.group_topk and moe.num_groups == nodes:
            return min(float(moe.group_topk), spread)
        return spread

    def all_to_all_ms(self, bytes_per_element: float) -> float:
        """One dispatch (or combine) of one micro-batch for one MoE layer, on one GPU."""
        p, moe = self.recipe.parallel, self.recipe.moe
        if p.ep == 1:
            return 0.0
        nodes, per_node = self.ep_layout()
        token = self.recipe.model.hidden_size * bytes_per_element
        t = self.tokens / p.tp  # each TP rank sends its share (sequence-parallel style)
        d = self.destination_nodes(nodes)
        ib = t * token * d * (nodes - 1) / nodes / (self.hw.ib_gb_per_s * GB)
        nvlink = t * token * moe.topk * (per_node - 1) / per_node / (self.hw.nvlink_gb_per_s * GB)
        return max(ib, nvlink) * MS

    def moe_a2a(self) -> tuple[float, float]:
        """(forward, backward) all-to-all ms of one MoE layer per micro-batch."""
        f = self.recipe.fp8
        fp8_dispatch = f.dispatch and f.recipe != "none"
        dispatch = (FP8_BYTES + FP8_SCALE_BYTES_PER_ELEMENT) if fp8_dispatch else BF16_BYTES
        return (self.all_to_all_ms(dispatch) + self.all_to_all_ms(BF16_BYTES),
                2 * self.all_to_all_ms(BF16_BYTES))

    def p2p_ms(self) -> float:
        """Send one activation to the next pipeline rank (IB unless on the same node)."""
        r = self.recipe
        if r.parallel.pp == 1:
            return 0.0
        per_pp_rank = world_size(r) // r.parallel.pp
        bw = self.hw.nvlink_gb_per_s if per_pp_rank < self.hw.gpus_per_node else self.hw.ib_gb_per_s
        return self.tokens * r.model.hidden_size * BF16_BYTES / r.parallel.tp / (bw * GB) * MS

    def dp_bandwidth(self, group_size: int, stride: int) -> float:
        """GB/s of a collective over `group_size` ranks `stride` apart (IB outside a node)."""
        inside = group_size * stride <= self.hw.gpus_per_node
        return self.hw.nvlink_gb_per_s if inside else self.hw.ib_gb_per_s

    # ------------------------------------------------------------------------ stages

    def _stage(self, stage: int) -> StageCost:
        r = self.recipe
        parts: dict[str, PassTimes] = {}
        a2a_f = a2a_b = 0.0
        f_layer, b_layer = self.moe_a2a()
        layers = list(layers_of_stage(r, stage))
        if stage == num_stages(r) - 1:
            layers += [r.model.num_layers - 1] * r.model.mtp_num_layers  # MTP: like the last
            parts["head"] = self.head_and_mtp()
        for layer in layers:
            for k, v in self.layer(layer).items():
                parts[k] = parts.get(k, ZERO) + v
            if P.is_moe_layer(r, layer):
                a2a_f += f_layer
                a2a_b += b_layer
        return StageCost(stage, parts, a2a_f, a2a_b)

    def data_parallel(self) -> tuple[int, int]:
        """(dense dp size, expert dp size)."""
        dp = data_parallel_size(self.recipe)
        return dp, dp // self.recipe.parallel.ep
