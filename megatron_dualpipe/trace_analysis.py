"""``python -m megatron_dualpipe trace`` (kept for the CLI table and existing imports): the
analysis lives in the `megatron_dualpipe.trace` package."""

from megatron_dualpipe.trace.cli import add_arguments, run
from megatron_dualpipe.trace.report import analyze, format_report

__all__ = ["add_arguments", "analyze", "format_report", "run"]
