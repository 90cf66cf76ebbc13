"""Saved benchmark results and the docs carry no paths of the machine they were made on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MACHINE_PATH = re.compile(r"(?<![\w.])/(root|work|opt|tmp|home)/")


def test_results_and_docs_have_no_machine_paths():
    files = sorted((ROOT / "benchmarks" / "results").rglob("*")) + sorted(
        (ROOT / "docs").glob("*.md"))
    found = []
    for path in files:
        if path.is_file() and path.suffix in (".json", ".md", ".txt", ".csv"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if MACHINE_PATH.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "machine paths:\n" + "\n".join(found)
