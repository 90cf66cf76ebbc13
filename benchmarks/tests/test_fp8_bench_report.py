"""CPU: benchmarks/fp8_bench.py's proxy variants, result merging and tables (no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import fp8_bench
from benchmarks.fp8 import proxy

ROOT = Path(__file__).resolve().parents[2]


def test_variant_overrides_compose_precision_and_modifiers():
    assert proxy.variant_overrides("bf16") == ["fp8.recipe=none"]
    got = proxy.variant_overrides("blockwise+mla+gbs16")
    assert got == ["fp8.recipe=blockwise", "model.attention=mla", "train.global_batch_size=16"]
    with pytest.raises(ValueError, match="precision 'fp4'"):
        proxy.variant_overrides("fp4")
    with pytest.raises(ValueError, match="unknown modifier"):
        proxy.variant_overrides("blockwise+turbo")
    with pytest.raises(ValueError, match="FP8 variants only"):
        proxy.variant_overrides("bf16+bf16mla")


def test_every_variant_loads_as_a_recipe():
    from megatron_dualpipe.config import load_recipe

    for modifier in proxy.PROXY_MODIFIERS:
        overrides = [*proxy.DEFAULT_PROXY_SET, *proxy.variant_overrides(f"blockwise+{modifier}")]
        load_recipe(ROOT / proxy.PROXY_RECIPE, overrides)


def test_baseline_keeps_model_modifiers_and_drops_fp8_only_ones():
    assert proxy.baseline_variant("blockwise+mla+bf16mla+gbs16") == "bf16+mla+gbs16"
    assert proxy.baseline_variant("current+fused") == "bf16"


def _proxy(step_s, busy):
    return {"step_s": step_s, "tokens_per_s": 1000 / step_s, "tflops": 1.0, "max_memory_gb": 1.0,
            "losses": [2.0, 1.0], "fp8_summary": {}, "profile": {
                "wall_ms": step_s * 1e3, "busy_ms": busy, "kernels_ms": {"GEMM": busy}}}


def test_merge_and_render_compare_within_matching_baselines():
    run_a = {"commands": {"gemm": "cmd-a", "proxy": "cmd-a"}, "gemm": {"dense": []},
             "proxy": {"bf16": _proxy(0.4, 300.0), "blockwise": _proxy(0.3, 200.0)}}
    run_b = {"commands": {"proxy": "cmd-b"}, "proxy_set": ["model.num_layers=3"],
             "proxy": {"bf16+gbs16": _proxy(1.0, 900.0), "blockwise+gbs16": _proxy(0.5, 450.0)}}
    merged = fp8_bench.merge_results([run_a, run_b])
    assert set(merged["proxy"]) == {"bf16", "blockwise", "bf16+gbs16", "blockwise+gbs16"}
    assert merged["commands"] == {"gemm": "cmd-a", "proxy": "cmd-a", "proxy'": "cmd-b"}
    args = fp8_bench.parse_args(["--no-write"])
    text = fp8_bench.render(merged, args, "render-cmd")
    assert "- proxy': `cmd-b`" in text and "`render-cmd`" in text
    assert "model.num_layers=3" in text
    assert "whole proxy step, blockwise: 1.33x `bf16`" in text  # 0.4 s / 0.3 s
    assert "whole proxy step, blockwise+gbs16: 2.00x `bf16+gbs16`" in text
    assert "GPU kernel time 1.50x" in text and "GPU kernel time 2.00x" in text


def test_profile_ignores_annotations():
    class Event:
        def __init__(self, key, us, annotation=False):
            self.key, self.self_device_time_total, self.is_user_annotation = key, us, annotation

    events = [Event("nvjet_sm90_gemm", 2000), Event("Optimizer.step#FusedAdam.step", 5000),
              Event("multi_tensor_apply_kernel<adam>", 1000), Event("custom range", 7000, True)]
    kept = [e for e in events if not proxy.is_annotation(e)]
    assert proxy.kernel_breakdown(kept) == {"GEMM": 2.0, "optimizer": 1.0}


def test_docs_section_is_replaced_in_place_or_appended(tmp_path):
    from benchmarks.docs_section import write_section

    path = tmp_path / "benchmarks.md"
    start, end = "<!-- x:start -->", "<!-- x:end -->"
    write_section(path, "first\n", start, end)
    assert path.read_text() == f"# Benchmarks\n\n{start}\nfirst\n{end}\n"
    path.write_text(path.read_text() + "\nhand-written notes\n")
    write_section(path, "second\n", start, end)
    assert path.read_text() == f"# Benchmarks\n\n{start}\nsecond\n{end}\n\nhand-written notes\n"
