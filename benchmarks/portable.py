"""What a benchmark records (its command line, error messages) without this machine's paths.

Saved results and docs/benchmarks.md are read on other machines: paths inside the checkout
become repository-relative, installed packages `<site-packages>/...`, and other absolute paths
of the machine (outputs under /tmp, a home or work directory) `OUT/<file name>`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SITE_PACKAGES = re.compile(r"(?:/[^\s/'\"]+)+/(?:site|dist)-packages/")
_MACHINE_PATH = re.compile(r"(?<![\w.])/(?:root|work|tmp|home|opt|mnt|scratch)(?:/[^\s'\"`]*)?")


def portable(text: str) -> str:
    """`text` with the machine's absolute paths replaced (see the module docstring)."""
    text = text.replace(f"{ROOT}/", "").replace(str(ROOT), ".")
    text = _SITE_PACKAGES.sub("<site-packages>/", text)
    return _MACHINE_PATH.sub(lambda m: "OUT/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def command_line(script: str, argv: Iterable[str]) -> str:
    """`python SCRIPT ARGS...` as the user typed it, with portable paths; a SCRIPT of the form
    `-m package.module` gives `python -m package.module ARGS...`."""
    head = script.split(" ", 1) if script.startswith("-m ") else [script]
    return shlex.join(["python", *head, *(portable(arg) for arg in argv)])
