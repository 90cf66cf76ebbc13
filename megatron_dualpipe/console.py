"""What a training run prints besides its progress lines: status lines from global rank 0, and
dependency warnings filtered (known noise) or shown once each, in one block."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Warnings that say nothing a user of this package can act on (CPU machine without TE/apex,
# deprecations inside Megatron-Core and torch.distributed).
KNOWN_NOISE = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"absl\.logging is not installed"),
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r"MimoModelConfig is experimental"),
    (UserWarning, r"Could not determine rank from torch\.distributed"),
    # Megatron's optimizer zero_grad (_zero_grad_group_helper) reads .grad of non-leaf tensors
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor"),
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                    r"deprecated"),
)
KNOWN_LOG_NOISE = ("GPTModel IS DEPRECATED", "full_param_layout not provided")

_pending: list[str] = []
_seen: set[tuple[str, str]] = set()


def is_rank0() -> bool:
    """Global rank 0 (or a process outside a launched job); works before torch.distributed."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """A status line from global rank 0."""
    if is_rank0():
        print(f"[megatron_dualpipe] {message}", flush=True)


class _DropKnown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(noise in text for noise in KNOWN_LOG_NOISE)


def _collect(message, category, filename, lineno, file=None, line=None) -> None:
    key = (category.__name__, str(message))
    if key not in _seen:
        _seen.add(key)
        _pending.append(f"  {category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")


def quiet_dependencies() -> None:
    """Drop the known noise (warnings and Megatron-Core log lines) in this process."""
    for category, pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    handler = logging.lastResort
    if handler is not None and not any(isinstance(f, _DropKnown) for f in handler.filters):
        handler.addFilter(_DropKnown())


def collect_warnings() -> None:
    """In a training process: other warnings are collected on global rank 0 for
    `flush_warnings`, and dropped on the other ranks, which run the same code."""
    quiet_dependencies()
    if is_rank0():
        warnings.showwarning = _collect
    else:
        warnings.simplefilter("ignore")


def flush_warnings() -> None:
    """Print the warnings collected since the last call, once each, as one block."""
    if not _pending:
        return
    lines = ["[megatron_dualpipe] warnings from dependencies (each shown once):", *_pending]
    _pending.clear()
    print("\n".join(lines), file=sys.stderr, flush=True)


def summary(history: list[dict], metrics_path) -> str:
    """The end-of-training line: first and last loss and validation loss."""
    if not history:
        return f"nothing to do (already at the last step); metrics: {metrics_path}"
    first, last = history[0], history[-1]
    text = (f"done: steps {first['step'] + 1}-{last['step'] + 1}, "
            f"loss {first['loss']:.4f} -> {last['loss']:.4f}")
    validated = [r for r in history if "val_loss" in r]
    if validated:
        text += f", val_loss {validated[0]['val_loss']:.4f} (step {validated[0]['step'] + 1})"
        if len(validated) > 1:
            text += f" -> {validated[-1]['val_loss']:.4f} (step {validated[-1]['step'] + 1})"
    return f"{text}; metrics: {metrics_path}"
