"""GPU: DualPipeV trains like 1F1B in FP8, and the fused kernels train like the unfused ones.

    python -m pytest -q -s -m gpu tests/test_gpu_training.py

One Hopper GPU with Transformer Engine; skipped otherwise. Every run trains
recipes/fp8_proxy_1gpu.yaml (world size 1, same initialization and synthetic data) for
MDP_GPU_TRAIN_STEPS steps (default 60) in this process:

* DualPipeV with `parallel.pp=1` (both stages of the V on this GPU) against 1F1B, in blockwise
  FP8 and, as the control for what reordering the micro-batches alone changes, in BF16. This is
  the GPU check of the FP8 weight-cache fix (`set_is_first_microbatch` once per chunk and step,
  tests/test_fp8_weight_cache.py on CPU): with a stale FP8 weight cache DualPipeV would train
  on the first step's FP8 weights and its loss would fall far behind 1F1B's.
* `model.rope_fusion`, `model.cross_entropy_fusion`, `moe.router_fusion`, `moe.permute_fusion`
  on against off, for MHA (TE's RoPE kernel) and MLA (Megatron's Triton RoPE kernel), in BF16
  and (with `model.gradient_accumulation_fusion` too) in blockwise FP8, where the fused router
  meets the router padding for FP8 (patches/pad_routing_map.py); and
  `model.gradient_accumulation_fusion` alone; `model.mla_down_proj_fusion` (MLA's q and kv
  down projections and the input norm in one TE LayerNormLinear, initialized as the unfused
  ones) in BF16 and FP8.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
from gpu_requirements import needs_hopper

from megatron_dualpipe.in_process import run_training

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "fp8_proxy_1gpu.yaml"
STEPS = int(os.environ.get("MDP_GPU_TRAIN_STEPS", "60"))
TAIL = 0.2
FUSED = ["model.rope_fusion=true", "model.cross_entropy_fusion=true",
         "moe.router_fusion=true", "moe.permute_fusion=true"]
MLA = ["model.attention=mla", "model.mla.q_lora_rank=512", "model.mla.kv_lora_rank=256"]
DOWN_FUSED = ["model.mla_down_proj_fusion=true"]
RUNS = {
    "1f1b bf16": ["fp8.recipe=none"],
    "dualpipev bf16": ["fp8.recipe=none", "parallel.schedule=dualpipev"],
    "1f1b fp8": ["fp8.recipe=blockwise"],
    "dualpipev fp8": ["fp8.recipe=blockwise", "parallel.schedule=dualpipev"],
    "1f1b bf16 fused": ["fp8.recipe=none", *FUSED],
    "1f1b bf16 wgrad fused": ["fp8.recipe=none", "model.gradient_accumulation_fusion=true"],
    "1f1b fp8 all fused": ["fp8.recipe=blockwise", *FUSED,
                           "model.gradient_accumulation_fusion=true"],
    "1f1b bf16 mla": ["fp8.recipe=none", *MLA],
    "1f1b bf16 mla fused": ["fp8.recipe=none", *MLA, *FUSED],
    "1f1b fp8 mla": ["fp8.recipe=blockwise", *MLA],
    "1f1b bf16 mla downfused": ["fp8.recipe=none", *MLA, *DOWN_FUSED],
    "1f1b fp8 mla downfused": ["fp8.recipe=blockwise", *MLA, *DOWN_FUSED],
}


pytestmark = [pytest.mark.gpu, needs_hopper]


def tail_rel_diff(losses: list[float], ref: list[float], tail: float = TAIL) -> float:
    """Mean |loss - ref| / ref over the last `tail` of the steps."""
    first = len(ref) - max(1, round(tail * len(ref)))
    pairs = list(zip(losses[first:], ref[first:], strict=True))
    return sum(abs(a - b) / b for a, b in pairs) / len(pairs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.distributed import destroy_distributed

    log_dir = tmp_path_factory.mktemp("gpu_training")
    out = {}
    try:
        for i, (name, overrides) in enumerate(RUNS.items()):
            recipe = load_recipe(RECIPE, [*overrides, f"train.steps={STEPS}",
                                          f"train.log_dir={log_dir / str(i)}"])
            start = time.perf_counter()
            out[name] = run_training(recipe, STEPS)["losses"]
            print(f"\n[gpu training] {name:<22} {time.perf_counter() - start:5.0f} s  loss "
                  f"{out[name][0]:.4f} -> {out[name][-1]:.4f}", flush=True)
    finally:
        destroy_distributed()
    return out


def _report(runs, name: str, ref: str) -> float:
    diff = tail_rel_diff(runs[name], runs[ref])
    first = abs(runs[name][0] - runs[ref][0]) / runs[ref][0]
    print(f"\n[gpu training] {name} vs {ref}: step 0 rel.diff {first:.2e}, last "
          f"{max(1, round(TAIL * STEPS))} steps mean rel.diff {diff:.3e}", flush=True)
    return diff


def test_all_runs_learn(runs):
    for name, losses in runs.items():
        assert all(math.isfinite(x) for x in losses), name
        assert losses[0] - losses[-1] > 0.5, (name, losses[0], losses[-1])


def test_dualpipev_fp8_trains_like_1f1b_fp8(runs):
    control = _report(runs, "dualpipev bf16", "1f1b bf16")
    diff = _report(runs, "dualpipev fp8", "1f1b fp8")
    # Same model, data and updates; only the micro-batch order (hence rounding) differs.
    assert abs(runs["dualpipev fp8"][0] - runs["1f1b fp8"][0]) / runs["1f1b fp8"][0] < 1e-3
    assert control < 5e-3
    assert diff < 5e-3, (diff, control)


@pytest.mark.parametrize("name,ref", [
    ("1f1b bf16 fused", "1f1b bf16"), ("1f1b bf16 mla fused", "1f1b bf16 mla"),
    ("1f1b bf16 wgrad fused", "1f1b bf16"),
    # FP8 with the fused router: the router padding must not touch the router's saved map
    ("1f1b fp8 all fused", "1f1b fp8"),
    # MLA's q/kv down projections as one GEMM with the input norm inside; same initial weights
    ("1f1b bf16 mla downfused", "1f1b bf16 mla"), ("1f1b fp8 mla downfused", "1f1b fp8 mla"),
])
def test_fused_kernels_train_like_unfused(runs, name, ref):
    diff = _report(runs, name, ref)
    assert abs(runs[name][0] - runs[ref][0]) / runs[ref][0] < 2e-3
    assert diff < 1e-2
