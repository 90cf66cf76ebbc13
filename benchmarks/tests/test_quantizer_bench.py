"""benchmarks.fp8.quantizer on CPU: the mismatch counts it reports (against a hand-made
difference) and its docs section from the saved H200 result (the run needs a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _operands(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 256, generator=g)
    return ((x.to(torch.float8_e4m3fn), torch.rand(256, 2, generator=g)),
            (x.t().contiguous().flatten().to(torch.float8_e4m3fn), torch.rand(256, 2,
                                                                                generator=g)))


def test_mismatches_count_each_operand_separately():
    from benchmarks.fp8.quantizer import mismatches

    ref = _operands(0)
    (q, sf), (qk, sfk) = _operands(0)
    assert mismatches(((q, sf), (qk, sfk)), ref) == {
        "rows_data": 0, "rows_scales": 0, "kmajor_data": 0, "kmajor_scales": 0,
        "elements": 256 * 256, "first_kmajor": []}
    qk = qk.view(torch.uint8).clone()
    qk[[5, 70]] ^= 1  # two bytes off by one bit
    sf = sf.clone()
    sf[3, 1] += 1
    got = mismatches(((q, sf), (qk.view(torch.float8_e4m3fn), sfk)), ref)
    assert (got["rows_data"], got["rows_scales"], got["kmajor_data"], got["kmajor_scales"]) == (
        0, 1, 2, 0)
    assert [i for i, _, _ in got["first_kmajor"]] == [5, 70]


def test_docs_section_names_machine_and_command(tmp_path):
    from benchmarks.docs_section import write_section
    from benchmarks.fp8.quantizer import END, START, section

    saved = json.loads((ROOT / "benchmarks" / "results" / "quantizer_h200.json").read_text())
    docs = tmp_path / "benchmarks.md"
    write_section(docs, section([saved]), START, END)
    text = docs.read_text()
    assert "Machine: NVIDIA H200" in text and f"Command: `{saved['command']}`" in text
    row = next(r for r in saved["shapes"][0]["rows"] if r["variant"] == "triton@8")
    assert f"| triton@8 | {row['ms']:.3f} |" in text and "| 0 / 0, 0 / 0 |" in text
