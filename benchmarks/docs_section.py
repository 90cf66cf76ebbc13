"""The marked sections of docs/benchmarks.md that each benchmark owns, and the saved JSON
results they are rendered from."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the text between the `start` and `end` markers in `path` with `section` (or
    append the marked section)."""
    block = f"{start}\n{section}{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_json(path: str | Path | None, data) -> None:
    """`data` as indented JSON at `path` (its folder made); nothing without a path."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))


def read_json(paths: Iterable[str | Path]) -> list:
    """Saved results (`--from-json`), in the order given."""
    return [json.loads(Path(p).read_text()) for p in paths]


def write_benchmark_section(section: Callable[[list[dict]], str], results: list[dict],
                            start: str, end: str) -> None:
    """A benchmark's section of docs/benchmarks.md, rendered by `section` from `results`."""
    write_section(BENCHMARKS_MD, section(results), start, end)


def add_result_args(parser: argparse.ArgumentParser, section: str) -> None:
    """`--json`, `--write-docs` and `--from-json` of a benchmark that owns `section`."""
    parser.add_argument("--json", default=None)
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the tables into docs/benchmarks.md (section {section})")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                        help="no run: write the docs section from these saved --json results")
