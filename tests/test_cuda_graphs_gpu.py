"""GPU: `model.cuda_graphs=local` (Megatron-Core's per-layer CUDA graphs) trains like the same
recipe without graphs, in BF16 and blockwise FP8, and the layers really run from graphs.

    python -m pytest -q -s -m gpu tests/test_cuda_graphs_gpu.py

One Hopper GPU with Transformer Engine. Each pair trains recipes/fp8_proxy_1gpu.yaml with its
experts padded to a fixed capacity (`moe.capacity_factor`, `moe.pad_to_capacity`: both runs
drop the same tokens) for MDP_GRAPH_TEST_STEPS steps (default 30) from the same initialization
and data; Megatron captures the graphs after `cuda_graph_warmup_steps` (3) eager steps.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from gpu_requirements import needs_hopper

from megatron_dualpipe.in_process import run_training

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "fp8_proxy_1gpu.yaml"
STEPS = int(os.environ.get("MDP_GRAPH_TEST_STEPS", "30"))
PADCAP = ["moe.capacity_factor=1.0", "moe.pad_to_capacity=true"]


pytestmark = [pytest.mark.gpu, needs_hopper]


def _graphed_layers(state, source) -> int:
    """Decoder layers whose CUDA graph manager holds captured graphs."""
    count = 0
    for chunk in state.model:
        for module in chunk.modules():
            manager = getattr(module, "cudagraph_manager", None)
            runners = getattr(manager, "cudagraph_runners", None) or []
            if any(getattr(r, "fwd_graph", None) is not None for r in runners):
                count += 1
    return count


@pytest.mark.parametrize("precision", ["none", "blockwise"])
def test_graphs_train_like_eager(tmp_path, precision):
    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.distributed import destroy_distributed

    out = {}
    try:
        for name, extra in (("eager", []), ("graphs", ["model.cuda_graphs=local"])):
            recipe = load_recipe(RECIPE, [f"fp8.recipe={precision}", *PADCAP, *extra,
                                          f"train.steps={STEPS}",
                                          f"train.log_dir={tmp_path / name}"])
            out[name] = run_training(recipe, STEPS, after=_graphed_layers)
    finally:
        destroy_distributed()
    eager, graphs = out["eager"]["losses"], out["graphs"]["losses"]
    tail = slice(STEPS - max(1, STEPS // 5), STEPS)
    diff = sum(abs(a - b) / b for a, b in zip(graphs[tail], eager[tail], strict=True)) / len(
        eager[tail])
    steady = lambda r: sorted(r["step_times_s"][5:])[len(r["step_times_s"][5:]) // 2]  # noqa: E731
    print(f"\n[cuda graphs {precision}] graphed layers {out['graphs']['after']}, step 0 "
          f"{graphs[0]:.4f} vs {eager[0]:.4f}, tail rel.diff {diff:.2e}, median step "
          f"{steady(out['graphs']) * 1e3:.1f} ms vs {steady(out['eager']) * 1e3:.1f} ms eager",
          flush=True)
    assert out["graphs"]["after"] > 0 and out["eager"]["after"] == 0
    assert all(math.isfinite(x) for x in graphs)
    assert abs(graphs[0] - eager[0]) / eager[0] < 1e-3  # step 0 runs eagerly in both
    assert diff < 5e-3
