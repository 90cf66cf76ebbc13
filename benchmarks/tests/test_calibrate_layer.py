"""benchmarks/calibrate_layer.py: per-layer timings that `plan --predict --calibration` reads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dualpipe import plan
from megatron_dualpipe.planning.predict.calibration import load_calibration

ROOT = Path(__file__).resolve().parents[2]
V3 = ROOT / "recipes" / "deepseek_v3_671b_ep64_tp1_pp16_h800.yaml"


def _child_env() -> dict:
    """This process's environment for the benchmark's own process, without the world of one
    that earlier in-process tests set up here (their MASTER_PORT is still being listened on:
    the GPU run failed with EADDRINUSE)."""
    world = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in world}, "PYTHONPATH": str(ROOT)}


def _calibrate_layer():
    sys.path.insert(0, str(ROOT))
    from benchmarks import calibrate_layer

    return calibrate_layer


def test_calibration_benchmark_feeds_each_local_expert_its_training_rows():
    bench = _calibrate_layer()
    recipe = plan.load_plan_recipe(V3)
    # V3: 4096 tokens x top-8 over 256 experts on 64 EP ranks -> 4 local experts x 8192 rows.
    assert bench.expert_tokens(recipe) == 8192
    local = plan.load_plan_recipe(V3, bench.rank_overrides(recipe, "fp8"))
    assert (local.moe.num_experts, local.moe.topk, local.parallel.ep) == (4, 4, 1)


@pytest.mark.slow
def test_calibration_benchmark_runs_tiny_on_cpu(tmp_path):
    """~30-60 s on 2 busy cores: builds Megatron layers and times them on gloo (own process:
    it applies the CPU and deferred-wgrad patches)."""
    out = tmp_path / "cal.json"
    env = _child_env()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate_layer.py"), "--tiny",
                        "--out", str(out), "--warmup", "0", "--iters", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cal = load_calibration(out)
    assert cal.source.startswith("measured, tiny")
    e = cal.entry("bf16", "moe")
    assert e["f_ms"] > 0 and e["b_ms"] > 0 and e["w_flops"] > 0


@pytest.mark.gpu
def test_calibration_benchmark_on_gpu(tmp_path):
    """V3's rank with 32 heads and 2 local experts (smaller, same code path as the real run)."""
    out = tmp_path / "cal.json"
    env = _child_env()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate_layer.py"),
                        "--out", str(out), "--warmup", "1", "--iters", "2",
                        "--set", "model.num_attention_heads=32", "--set", "parallel.ep=128"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    cal = load_calibration(out)
    for prec in ("bf16", "fp8"):
        for part in ("attention", "moe", "dense_mlp", "head"):
            e = cal.entry(prec, part)
            assert e["f_ms"] > 0 and e["b_ms"] > 0, (prec, part, e)
