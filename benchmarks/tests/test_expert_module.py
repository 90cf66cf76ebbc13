"""benchmarks.fp8.expert_module on CPU: its docs section from a saved H200 result (the run
itself needs a GPU with TE and DeepGEMM)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_expert_module_docs_section_names_machine_and_command(tmp_path):
    from benchmarks.docs_section import write_section
    from benchmarks.fp8.expert_module import END, START, section

    saved = json.loads((ROOT / "benchmarks" / "results" / "expert_module_h200.json").read_text())
    docs = tmp_path / "benchmarks.md"
    write_section(docs, section([saved]), START, END)
    text = docs.read_text()
    assert "Machine: NVIDIA H200" in text and f"Command: `{saved['command']}`" in text
    row = saved["shapes"]["fc1"]["rows"]["te_blockwise"]
    assert f"| te_blockwise | {row['ms']:.3f} |" in text
