"""CPU: benchmarks/fp8/gemm_routes.py's shape table, dry run, JSON and table helpers, and the
blockwise quantizers' layouts (the GPU routes themselves run on the device only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.fp8 import gemm_routes as G

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_writes_every_shape_without_importing_torch(tmp_path):
    out = tmp_path / "routes.json"
    code = ("import sys; from benchmarks.fp8 import gemm_routes as g; "
            f"rc = g.main(['--dry-run', '--out', {str(out)!r}]); "
            "assert 'torch' not in sys.modules, 'dry run imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [r["shape"] for r in data["dense"]] == [c[0] for c in G.DENSE_CASES]
    assert [r["shape"] for r in data["grouped"]] == [c[0] for c in G.GROUPED_CASES]
    o_proj = next(r for r in data["dense"] if r["shape"].startswith("MLA o_proj"))
    assert (o_proj["M"], o_proj["K"], o_proj["N"]) == (4096, 16384, 7168)
    assert o_proj["gflop_per_gemm"] == pytest.approx(2 * 4096 * 16384 * 7168 / 1e9)
    fc1 = next(r for r in data["grouped"] if r["shape"].startswith("4x8192 experts fc1"))
    assert (fc1["M"], fc1["experts"]) == (4 * 8192, 4)
    assert set(fc1["routes"]) == set(G.GROUPED_ROUTES)
    assert "MLA kv_down" in proc.stdout


def test_shape_table_checks():
    G.validate_cases()
    with pytest.raises(ValueError, match="multiple of 128"):
        G.validate_cases(dense=[("bad", 4096, 7000, 1024)], grouped=[])
    with pytest.raises(ValueError, match="duplicate"):
        G.validate_cases(dense=[("a", 1, 128, 16), ("a", 1, 128, 16)], grouped=[])
    assert [c[0] for c in G.selected(G.GROUPED_CASES, "fc2")] == [
        "8x4096 experts fc2 2048->7168", "4x8192 experts fc2 2048->7168"]


def test_totals_ratios_and_table_rows():
    flops = 2.0 * 4096 * 7168 * 1536
    bf16 = {"fwd": {"ms": 1.0}, "dgrad": {"ms": 1.0}, "wgrad": {"ms": 2.0}}
    dg = {"fwd": {"ms": 0.5}, "fwd+quant": {"ms": 0.6}, "dgrad": {"ms": 0.5},
          "dgrad+quant": {"error": "RuntimeError: boom"}, "wgrad": {"ms": 1.0}}
    G.add_totals(bf16, flops)
    G.add_totals(dg, flops)
    assert bf16["total"]["ms"] == pytest.approx(4.0)
    assert bf16["total"]["tflops"] == pytest.approx(3 * flops / 4.0e-3 / 1e12)
    # dgrad+quant failed: the total falls back to the GEMM-only dgrad
    assert dg["total"]["ms"] == pytest.approx(0.6 + 0.5 + 1.0)
    assert dg["total"]["sum_of"] == "fwd+quant + dgrad + wgrad"
    for parts in (bf16, dg):
        for r in parts.values():
            if "ms" in r and "tflops" not in r:
                r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
    failed = {"error": "RuntimeError: 12 ms"}  # a route that failed as a whole
    row = {"shape": "s", "routes": {"bf16": bf16, "deepgemm": dg, "torch": failed}}
    G.add_ratios(row)
    assert dg["fwd"]["vs_bf16"] == pytest.approx(2.0)
    assert dg["fwd+quant"]["vs_bf16"] == pytest.approx(1.0 / 0.6)
    assert dg["total"]["vs_bf16"] == pytest.approx(4.0 / 2.1)
    assert "vs_bf16" not in dg["dgrad+quant"] and failed == {"error": "RuntimeError: 12 ms"}
    rows = G.markdown_rows({"dense": [row, {"shape": "t", "error": "skipped: --budget-s 1"}]})
    assert rows[0] == ("| s | bf16 | 90 (1.00x) | - | 90 (1.00x) | 45 (1.00x) "
                       "| 68 (1.00x) |")
    assert rows[1].startswith("| s | deepgemm | 180 (2.00x) | 150 (1.67x) | 180 (2.00x) | ")
    assert rows[2] == "| s | torch | error | error | error | error | error |"
    assert rows[3].startswith("| t | - | skipped")
    assert "ERROR RuntimeError: boom" in G.summary(dg) and "fwd 0.500 ms" in G.summary(dg)


def test_total_needs_every_part():
    parts = {"fwd": {"ms": 1.0}, "wgrad": {"error": "x"}, "dgrad": {"ms": 1.0}}
    G.add_totals(parts, 1.0)
    assert "total" not in parts


torch = pytest.importorskip("torch")


def test_blockwise_quantizers_layouts():
    from benchmarks.fp8 import blockwise_quant as Q

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 576, generator=g)  # 576 = 4.5 blocks: padded scales
    q, sf = Q.quant_1x128(x)
    assert q.shape == (256, 576) and sf.shape == (256, 5) and q.dtype == torch.float8_e4m3fn
    back = Q.dequant_1x128(q, sf)
    # E4M3 rounding: at most 2^-4 relative to each element's power of two, plus subnormals
    assert float((back - x.double()).abs().max()) <= float(x.abs().max()) * 2**-4
    # every 1x128 tile's largest element maps to +-448
    assert float(q[:, :128].float().abs().amax(1).min()) == 448.0

    w = torch.randn(300, 384, generator=g)
    wq, ws = Q.quant_128x128(w)
    wtq, wts = Q.quant_128x128(w.t().contiguous())
    assert ws.shape == (3, 3)
    assert torch.equal(wtq.float(), wq.float().t()) and torch.equal(wts, ws.t())
    rel = float((Q.dequant_128x128(wq, ws) - w.double()).norm() / w.double().norm())
    assert 0.005 < rel < 0.05


def test_k_major_group_layout_round_trips():
    from benchmarks.fp8 import blockwise_quant as Q

    g = torch.Generator().manual_seed(1)
    ks, mn = [256, 0, 128], 64
    x = torch.randn(sum(ks), mn, generator=g)
    data, sf = Q.quant_k_major_groups(x, ks)
    assert sf.shape == (mn, sum(ks) // 128) and sf.stride() == (1, mn)
    start = 0
    for k in ks:
        if k == 0:
            continue
        block = data[start * mn:(start + k) * mn].view(mn, k).double()  # group g, k-major
        scales = sf[:, start // 128:(start + k) // 128].double().repeat_interleave(128, dim=1)
        rel = float((block * scales - x[start:start + k].t().double()).norm()
                    / x[start:start + k].norm())
        assert rel < 0.05
        start += k
