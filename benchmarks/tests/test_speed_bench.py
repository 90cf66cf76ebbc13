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
from benchmarks.speed.variants import BF16_GROUPS, precision_setting, runs_precision
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


def test_pairs_match_modifiers_and_per_module_precisions():
    keys = ["mcore_1f1b+padcap/bf16", "mcore_1f1b+padcap/fp8", "ours_1f1b+padcap+gaf/bf16",
            "ours_1f1b+padcap+gaf/fp8:mla", "ours_dualpipev+padcap+gaf+plain/fp8:mla"]
    assert pairs(keys) == [
        ("ours_1f1b+padcap+gaf/bf16", "mcore_1f1b+padcap/bf16", 0.98),
        ("ours_1f1b+padcap+gaf/fp8:mla", "mcore_1f1b+padcap/fp8", 0.98),
        ("ours_dualpipev+padcap+gaf+plain/fp8:mla", "ours_1f1b+padcap+gaf/fp8:mla", 0.98),
        ("mcore_1f1b+padcap/fp8", "mcore_1f1b+padcap/bf16", 1.30),
        ("ours_1f1b+padcap+gaf/fp8:mla", "ours_1f1b+padcap+gaf/bf16", 1.30),
    ]


def test_fused_mla_down_projection_pairs_with_megatrons_and_the_unfused():
    keys = ["mcore_1f1b+padcap+mladown/bf16", "ours_1f1b+padcap+gaf/bf16",
            "ours_1f1b+padcap+gaf+mladown/bf16"]
    assert pairs(keys) == [
        ("ours_1f1b+padcap+gaf+mladown/bf16", "mcore_1f1b+padcap+mladown/bf16", 0.98),
        ("ours_1f1b+padcap+gaf+mladown/bf16", "ours_1f1b+padcap+gaf/bf16", None),
    ]


def test_graphed_systems_pair_with_the_same_system_eager():
    keys = ["ours_1f1b+padcap+gaf/fp8", "ours_1f1b+padcap+gaf+graphs/fp8"]
    assert pairs(keys) == [("ours_1f1b+padcap+gaf+graphs/fp8", "ours_1f1b+padcap+gaf/fp8", None)]
    row = {"step_s": 0.5, "min_s": 0.49, "max_s": 0.51, "spread_pct": 4.0, "tokens_per_s": 1.0,
           "tflops": 1.0, "mfu": 0.5, "warmup_vs_steady": [1.0]}
    rows = {keys[0]: row, keys[1]: {**row, "step_s": 0.4, "min_s": 0.39, "max_s": 0.41}}
    table = render({"rows": rows, "errors": {}})
    assert f"| {keys[1]} over {keys[0]} | 1.250x | 1.195-1.308 | - |" in table
    assert "| ratio" not in render({"rows": {keys[0]: row}, "errors": {}})


def test_precisions_name_their_bf16_modules():
    assert precision_setting("bf16", "e4m3") == (None, None)
    assert precision_setting("fp8", "e4m3") == ("e4m3", None)  # the recipe's bf16_modules
    assert precision_setting("fp8:none", "e4m3") == ("e4m3", [])
    assert precision_setting("fp8:mla+shared", "e4m3") == (
        "e4m3", BF16_GROUPS["mla"] + BF16_GROUPS["shared"])
    with pytest.raises(SystemExit, match="fp8:GROUP"):
        precision_setting("fp8:attention", "e4m3")
    assert runs_precision("mcore_1f1b+padcap", "fp8")
    assert not runs_precision("mcore_1f1b", "fp8:mla")


@pytest.mark.slow
def test_tiny_run_of_every_system_in_one_process(tmp_path):
    """Every system runs; +padcap (every token to every local expert) changes no loss."""
    out = tmp_path / "speed.json"
    # One warm-up step each, in this order: ours_1f1b runs step 1 and ours_1f1b+padcap step 3,
    # the same cached batch (two batches, cycled), both from the recipe's initial weights.
    systems = "mcore_1f1b,ours_1f1b,ours_dualpipev,ours_1f1b+padcap,ours_dualpipev+plain"
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
    assert rows["ours_1f1b+padcap/bf16"]["losses"][0] == rows["ours_1f1b/bf16"]["losses"][0]
    assert result["errors"] == {}
    table = render(result)
    assert "ours_1f1b/bf16 over mcore_1f1b/bf16" in table



def test_graphed_systems_run_alone_with_one_precision():
    from benchmarks.speed.__main__ import check_graphed

    check_graphed(["ours_1f1b+padcap", "ours_1f1b+padcap+graphs"], ["fp8"])
    check_graphed(["ours_1f1b", "ours_dualpipev+nozb"], ["bf16", "fp8"])
    with pytest.raises(SystemExit, match="one precision"):
        check_graphed(["ours_1f1b+padcap+graphs"], ["bf16", "fp8"])
    with pytest.raises(SystemExit, match="alone of its kind"):
        check_graphed(["ours_1f1b+padcap+graphs", "ours_1f1b+padcap+gaf+graphs"], ["fp8"])
