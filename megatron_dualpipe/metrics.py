"""Per-step progress lines and the metrics JSONL file; `MetricsHook` writes them for `train`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from megatron_dualpipe import console
from megatron_dualpipe.hooks import TrainHook


class MetricsLogger:
    """Writes one JSON object per step to `<log_dir>/metrics.jsonl` and prints a progress line.

    Only the process with `enabled=True` (global rank 0) writes or prints. Rows are never
    lost: a resumed run keeps the rows of the steps before `resume_step` (later ones are
    replaced by the rerun steps); a run from step 0 first moves an existing file aside to
    `metrics.<N>.jsonl`.
    """

    def __init__(self, log_dir: str, total_steps: int, enabled: bool, resume_step: int = 0,
                 tensorboard: bool = False):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = Path(log_dir) / "metrics.jsonl"
        self._tb = None
        self._logged = 0  # records logged by this process (its first step is the warm-up)
        self._timed = [0.0, 0.0]  # tokens and seconds of the steps after the first
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():
            self._truncate_after(resume_step)
        elif self.path.exists() and self.path.stat().st_size:
            kept = _free_name(self.path)
            os.replace(self.path, kept)
            print(f"[megatron_dualpipe] {self.path} existed: moved to {kept.name}", flush=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir)
            except ImportError:
                print("tensorboard not installed; logging to metrics.jsonl only", file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """Keep the records of steps < `step` (a resumed run rewrites later ones).

        A line cut short by a kill is dropped. The file is replaced atomically.
        """
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) < step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])
        self._logged += 1
        if self._logged > 1:
            self._timed[0] += record["tokens_per_s"] * record["step_time_s"]
            self._timed[1] += record["step_time_s"]
        print(format_progress(record, self.total_steps, *self._throughput(record)), flush=True)

    def _throughput(self, record: dict) -> tuple[float | None, float | None]:
        """Mean tokens/s and the estimated seconds left, from the steps after the first."""
        tokens, seconds = self._timed
        if not seconds:
            return None, None
        per_step = seconds / (self._logged - 1)
        return tokens / seconds, per_step * (self.total_steps - record["step"] - 1)


class MetricsHook(TrainHook):
    """`train`'s metrics: one line per step (file, console, TensorBoard) and the end summary."""

    def __init__(self, log_dir: str, total_steps: int, enabled: bool, resume_step: int = 0,
                 tensorboard: bool = False):
        self.logger = MetricsLogger(log_dir, total_steps, enabled, resume_step=resume_step,
                                    tensorboard=tensorboard)

    def on_record(self, state, record: dict) -> None:
        self.logger.log(record)

    def on_train_end(self, state) -> None:
        console.flush_warnings()
        console.say(console.summary(state.history, self.logger.path))


def _free_name(path: Path) -> Path:
    """`metrics.1.jsonl`, `metrics.2.jsonl`, ...: the first that does not exist."""
    n = 1
    while (candidate := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    return candidate


def format_progress(record: dict, total_steps: int, tokens_per_s: float | None = None,
                    eta_s: float | None = None) -> str:
    """One console line; `tokens_per_s` and `eta_s` are averages that leave out the first
    (compiling, allocating) step, which shows as "warm-up"."""
    parts = [f"step {record['step'] + 1:>4}/{total_steps}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f}")
    parts += [
        f"lr {record['lr']:.2e}",
        f"grad_norm {record['grad_norm']:.3f}",
        f"{tokens_per_s:,.0f} tok/s" if tokens_per_s is not None else "warm-up",
        f"{record['step_time_s']:.2f} s",
    ]
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    if "eplb_balancedness" in record:
        parts.append(f"eplb {record['eplb_balancedness']:.3f}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
