"""benchmarks/calibration_from_speed.py: the scaled calibration's layer equals the measurement."""

from __future__ import annotations

import math

from benchmarks.calibration_from_speed import LAYER_PARTS, PASSES, measured_layer_ms, scaled


def test_scaled_layer_time_equals_the_measured_one():
    speed = {"overrides": ["model.num_layers=2"], "tokens_per_step": 4 * 4096,
             "rows": {"ours_1f1b/bf16": {"step_s": 0.8}, "ours_1f1b/fp8": {"step_s": 0.64}}}
    assert math.isclose(measured_layer_ms(speed, "bf16"), 100.0)  # 800 ms / (2 x 4)
    entry = {"f_ms": 1.0, "b_ms": 2.0, "w_ms": 1.0, "f_flops": 7.0}
    analytic = {p: {"attention": dict(entry), "moe": dict(entry), "head": dict(entry)}
                for p in ("bf16", "fp8")}
    out, factors = scaled(analytic, speed)
    assert math.isclose(factors["bf16"], 100.0 / 8) and math.isclose(factors["fp8"], 80.0 / 8)
    for precision, want in (("bf16", 100.0), ("fp8", 80.0)):
        layer = sum(out[precision][p][k] for p in LAYER_PARTS for k in PASSES)
        assert math.isclose(layer, want)
        assert out[precision]["head"]["f_flops"] == 7.0  # FLOPs are not scaled
        assert math.isclose(out[precision]["head"]["b_ms"], 2.0 * factors[precision])
