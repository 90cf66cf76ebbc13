"""benchmarks.speed on CPU: its FLOP count against torch's counter, the target pairs, and a
tiny end-to-end run of all systems in one process (the GPU numbers are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.speed.flops import core_attention_flops_fwd
from benchmarks.speed.report import pairs, render
from megatron_dualpipe.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_core_attention_flops_match_torch_flop_counter():
    """Per token and causal (half the keys): torch counts full non-causal SDPA."""
    from torch.utils.flop_counter import FlopCounterMode

    recipe = load_recipe(ROOT / "recipes" / "deepseek_v3_rank_1gpu.yaml",
                         ["model.seq_length=64", "model.num_attention_heads=4"])
    m = recipe.model
    s, heads = m.seq_length, m.num_attention_heads
    qk = m.mla.qk_head_dim + m.mla.qk_pos_emb_head_dim
    q, k = torch.randn(1, heads, s, qk), torch.randn(1, heads, s, qk)
    v = torch.randn(1, heads, s, m.mla.v_head_dim)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert core_attention_flops_fwd(recipe) * s * 2 == counter.get_total_flops()


def test_pairs_name_the_issue_targets():
    keys = ["mcore_1f1b/bf16", "ours_1f1b/bf16", "ours_dualpipev/bf16", "ours_1f1b/fp8",
            "mcore_1f1b/fp8"]
    assert pairs(keys) == [
        ("ours_1f1b/bf16", "mcore_1f1b/bf16", 0.98),
        ("ours_dualpipev/bf16", "ours_1f1b/bf16", 0.98),
        ("ours_1f1b/fp8", "mcore_1f1b/fp8", 0.98),
        ("ours_1f1b/fp8", "ours_1f1b/bf16", 1.30),
        ("mcore_1f1b/fp8", "mcore_1f1b/bf16", 1.30),
    ]


@pytest.mark.slow
def test_tiny_run_of_every_system_in_one_process(tmp_path):
    out = tmp_path / "speed.json"
    systems = "mcore_1f1b,ours_1f1b,ours_dualpipev,ours_dualpipev+plain"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--tiny", "--systems", systems,
         "--warmup-steps", "1", "--rounds", "2", "--steps-per-round", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert sorted(rows) == sorted(f"{s}/bf16" for s in systems.split(","))
    for row in rows.values():
        assert len(row["warmup_s"]) == 1 and row["step_s"] > 0
        assert all(loss == loss and 0 < loss < 10 for loss in row["losses"])  # finite
    table = render(result)
    assert "ours_1f1b/bf16 over mcore_1f1b/bf16" in table
