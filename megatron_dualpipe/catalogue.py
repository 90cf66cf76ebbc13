"""`recipes`: the shipped recipes with a one-line description each.

The description is a recipe's own `description:` field, or else the first line of its header
comment (includes are not followed: an including recipe describes itself).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def recipes_dir() -> Path:
    """`recipes/` of this checkout (beside the package), or of the working directory."""
    here = Path(__file__).resolve().parents[1] / "recipes"
    return here if here.is_dir() else Path("recipes")


def describe(path: Path) -> str:
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict) and data.get("description"):
        return str(data["description"]).strip()
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def catalogue(directory: Path | None = None) -> list[tuple[str, str]]:
    """(file name, description) of every recipe, sorted by name."""
    directory = directory or recipes_dir()
    return [(p.name, describe(p)) for p in sorted(directory.glob("*.yaml"))]


def markdown_table(rows: list[tuple[str, str]]) -> str:
    """The README's recipe table."""
    lines = ["| recipe | what it is |", "| --- | --- |"]
    lines += [f"| `recipes/{name}` | {text} |" for name, text in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print the README's table")


def run(args: argparse.Namespace) -> int:
    rows = catalogue()
    if args.markdown:
        print(markdown_table(rows))
        return 0
    width = max((len(f"recipes/{name}") for name, _ in rows), default=0)
    for name, text in rows:
        print(f"{f'recipes/{name}':<{width}}  {text}")
    return 0
