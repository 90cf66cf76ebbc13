"""PyTorch profiler traces of chosen training steps (`train --profile-steps a:b`).

`StepProfiler` profiles steps ``a <= step < b`` (0-based, as in metrics.jsonl) with
`torch.profiler` (CPU activity, plus CUDA kernels on GPU) and writes one Chrome trace per rank,
``<log_dir>/traces/rank<r>.json``, the format of DeepSeek's profile-data. Each step is wrapped
in a ``ProfilerStep#<step>`` annotation (what `torch.profiler`'s own step markers are called),
so `python -m megatron_dualpipe trace` can report per step.

    profiler = StepProfiler("2:4", log_dir, rank, device)
    for step in ...:
        with profiler.step(step):
            train_step(...)
    profiler.close()   # exports if the profiled window was cut short

`ProfilerHook` is the same as a `TrainHook` of the training loop (`features.run_hooks`).

In recipes the field is ``train.profile_steps: "2:4"`` (quoted: YAML reads 2:4 as a number).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.hooks import TrainHook

_SPEC_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_steps(spec: str) -> tuple[int, int]:
    """``"a:b"`` -> ``(a, b)`` with ``0 <= a < b``; UserError otherwise."""
    match = _SPEC_RE.match(str(spec))
    if not match:
        raise UserError(f"--profile-steps {spec!r}: expected FIRST:END, e.g. 2:4 "
                         "(profiles steps FIRST..END-1)")
    first, end = int(match.group(1)), int(match.group(2))
    if end <= first:
        raise UserError(f"--profile-steps {spec!r}: END must be greater than FIRST")
    return first, end


def trace_path(log_dir: str | Path, rank: int) -> Path:
    return Path(log_dir) / "traces" / f"rank{rank}.json"


class StepProfiler:
    """Profiles steps [a, b) of a training loop; a no-op when `spec` is None."""

    def __init__(self, spec: str | None, log_dir: str | Path, rank: int,
                 device: torch.device | str = "cpu", verbose: bool = True):
        self.window = parse_steps(spec) if spec else None
        self.path = trace_path(log_dir, rank)
        self.device = torch.device(device)
        self.verbose = verbose
        self.rank = rank
        self._prof = None
        self._annotation = None  # the open ProfilerStep#<step> record_function
        self.done = False
        self.steps: list[int] = []

    def _activities(self) -> list:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        return acts

    def _wanted(self, step: int) -> bool:
        return self.window is not None and not self.done and \
            self.window[0] <= step < self.window[1]

    @contextlib.contextmanager
    def step(self, step: int):
        """Run one training step; profiled (and annotated) if inside the window."""
        self.begin(step)
        yield
        self.end(step)

    def begin(self, step: int) -> None:
        """Step `step` starts: start the profiler and the step's annotation if it is wanted."""
        if not self._wanted(step):
            return
        if self._prof is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self._prof = torch.profiler.profile(activities=self._activities())
            self._prof.start()
        self._annotation = torch.profiler.record_function(f"ProfilerStep#{step}")
        self._annotation.__enter__()

    def end(self, step: int) -> None:
        """Step `step` ended: close its annotation; export after the window's last step."""
        if self._annotation is None:
            return
        annotation, self._annotation = self._annotation, None
        annotation.__exit__(None, None, None)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.steps.append(step)
        if step + 1 >= self.window[1]:
            self.close()

    def close(self) -> Path | None:
        """Stop and export (if profiling); returns the trace path written, if any."""
        if self._prof is None:
            return None
        prof, self._prof = self._prof, None
        prof.stop()
        self.done = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        if self.verbose and self.rank == 0:
            print(f"[megatron_dualpipe] profiled steps {self.steps[0]}..{self.steps[-1]}: "
                  f"traces in {self.path.parent} (python -m megatron_dualpipe trace "
                  f"{self.path})", flush=True)
        return self.path


class ProfilerHook(TrainHook):
    """`train.profile_steps` in the training loop: profiles steps [a, b) of `train`."""

    def __init__(self, spec: str, log_dir: str | Path, rank: int, device: torch.device):
        self.profiler = StepProfiler(spec, log_dir, rank, device)

    def on_step_begin(self, state, step: int) -> None:
        self.profiler.begin(step)

    def on_step_end(self, state, record: dict) -> None:
        self.profiler.end(record["step"])

    def on_train_end(self, state) -> None:
        self.profiler.close()
