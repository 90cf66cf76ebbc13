"""The EPLB training benchmark's CPU path (benchmarks/eplb_train_bench.py --tiny)."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # 2 processes, 2 variants x 3 steps of a tiny proxy: ~20 s
def test_eplb_train_bench_tiny(capsys):
    from benchmarks import eplb_train_bench

    assert eplb_train_bench.main(
        ["--tiny", "--scenarios", "drift", "--variants", "bias,bias+eplb", "--warmup", "1",
         "--steps", "2", "--interval", "1", "--bias-steps", "5"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| drift |")]
    assert [r.split("|")[2].strip() for r in rows] == ["bias", "bias+eplb"]
    slots = [int(r.split("|")[3]) for r in rows]
    assert slots == [8, 10]  # 8 experts; + 8 / 4 = 2 redundant slots (a multiple of EP=2)
    assert int(rows[1].split("|")[8]) >= 1  # EPLB rebalanced at least once
    assert rows[0].split("|")[11].strip() == "-"  # bias alone: no rebalance, no estimate
    assert "pay" in rows[1].split("|")[11]  # the hook's pay-off estimate reached the table
    assert "- drift: bias+EPLB" in out
