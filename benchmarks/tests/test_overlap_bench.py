"""benchmarks/overlap_bench.py on CPU (--tiny): the interleaved variants run in one process
group, the fused F&B windows appear in (d)'s trace only, and the report has every row."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # one torchrun job of 2 processes, 2 variants x 2 steps + 2 profiled: ~20 s
def test_overlap_bench_tiny(tmp_path, capsys):
    from benchmarks import overlap_bench

    rc = overlap_bench.main(["--tiny", "--variants", "a,c,d", "--rounds", "1", "--steps", "1",
                             "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    results = json.loads((tmp_path / "r.json").read_text())["nvlink"]["results"]
    assert sorted(results) == ["alltoall/a", "alltoall/c", "alltoall/d"]
    for key, r in results.items():
        assert r["trace"]["ranks"] == 2 and r["trace"]["a2a_ms"] > 0, key
        assert len(r["step_times_s"]) == 1 and r["tokens_per_s_per_gpu"] > 0
    # (a) and (c) start from the same weights and data: the same first loss (1F1B vs DualPipeV)
    assert results["alltoall/a"]["losses"][0] == pytest.approx(
        results["alltoall/c"]["losses"][0], rel=1e-6)
    assert results["alltoall/d"]["trace"]["fb_a2a_ms"] > 0  # fused chunks ran and were traced
    assert results["alltoall/c"]["trace"]["fb_a2a_ms"] == 0
    out = capsys.readouterr().out
    assert "| nvlink | alltoall | (d) dualpipev-overlap |" in out
    assert "- nvlink/alltoall: (d) hides" in out


def test_dry_run_lists_every_variant_and_dispatcher(capsys):
    from benchmarks import overlap_bench

    assert overlap_bench.main(["--tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for key in "abcd":
        assert f"alltoall/({key})" in out
