"""Communication/compute overlap in PyTorch profiler traces (``python -m megatron_dualpipe
trace``).

``classify`` (the one table of communication kernels and ops), ``load`` (streaming reader),
``ranks`` (events per device), ``overlap`` (the figures of one rank), ``report`` (per rank and
total, text), ``draw`` (the ``--png`` timeline), ``cli`` (the subcommand).
"""

from megatron_dualpipe.trace.report import analyze, format_report

__all__ = ["analyze", "format_report"]
