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


def test_recorded_commands_and_messages_are_portable():
    from benchmarks.portable import ROOT as BENCH_ROOT
    from benchmarks.portable import command_line, portable

    assert BENCH_ROOT == ROOT
    assert command_line("benchmarks/fp8_bench.py", [
        "--json", "/tmp/out/fp8_bench.json", f"--workdir={ROOT}/runs/bench", "--set",
        "moe.topk=8"]) == ("python benchmarks/fp8_bench.py --json OUT/fp8_bench.json "
                           "--workdir=runs/bench --set moe.topk=8")
    assert portable("OSError: Could not load this library: "
                    "/usr/local/lib/python3.12/dist-packages/deep_gemm/_C.so") == (
        "OSError: Could not load this library: <site-packages>/deep_gemm/_C.so")
    assert portable(f"recipe {ROOT}/recipes/x.yaml, home /home/me/x.yaml") == (
        "recipe recipes/x.yaml, home OUT/x.yaml")
    for text in ("python benchmarks/eplb_bench.py --layers 4", "ratio 1/2 and a/b/c"):
        assert portable(text) == text
    assert not MACHINE_PATH.search(portable("/root/a /work/b /opt/c/d /tmp"))
