"""megatron_dualpipe.fp8.accuracy on curves small enough to check by hand."""

from __future__ import annotations

import math

from megatron_dualpipe.fp8.accuracy import loss_comparison, moving_average


def test_moving_average_uses_what_exists_at_the_start():
    assert moving_average([1.0, 3.0, 5.0], 0, 2) == 1.0
    assert moving_average([1.0, 3.0, 5.0], 2, 2) == 4.0


def test_loss_comparison_by_hand():
    bf16 = [4.0, 2.0, 2.0, 2.0]
    fp8 = [4.0, 2.0, 2.02, 1.98]  # +1%, -1% per step in the tail; equal tail means
    stats = loss_comparison(bf16, fp8, tail=0.5, window=2)
    assert stats["tail_from"] == 2
    assert math.isclose(stats["mean_rel_err"], 0.01)
    assert math.isclose(stats["max_rel_err"], 0.01)
    # moving averages: step 2: (2 + 2.02)/2 vs 2 -> 0.5%; step 3: (2.02 + 1.98)/2 vs 2 -> 0
    assert math.isclose(stats["curve_rel_err_max"], 0.005)
    assert math.isclose(stats["curve_rel_err_mean"], 0.0025)
    assert math.isclose(stats["rel_err_of_means"], 0.0, abs_tol=1e-15)
    shifted = loss_comparison(bf16, [4.0, 2.0, 2.01, 2.01], tail=0.5, window=2)
    assert math.isclose(shifted["rel_err_of_means"], 0.005)
