"""Schedules over training tokens: the global-batch ramp, token-based LR phases and the
token-triggered changes of `mtp_loss_scaling_factor` and `moe_router_bias_update_rate`.

Everything here is a pure function of the recipe and the step number: the samples consumed
before step `s` follow from the batch schedule, so a resumed run (which restores only the step)
sees the same batch sizes, learning rates and config values as an uninterrupted one.

Batch ramp (`train.batch_ramp: [start, end, ramp_samples]`) follows Megatron-LM's
`--rampup-batch-size start increment ramp_samples`: with n = (end - start) / increment
increments, the global batch is `start + k * increment` once `ceil(k * ramp_samples / n)`
samples are consumed, and `end` from `ramp_samples` on. The increment is not a recipe field: it
is the smallest step that keeps every batch valid for the schedule (`batch_increment`). Batches
below the schedule's minimum (DualPipe: 2 x pp micro-batches) are raised to that minimum; `plan`
and `config.validate_training` warn about it.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_dualpipe.config.validate import data_parallel_size
from megatron_dualpipe.config.validate_training import batch_increment, min_global_batch

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe


@dataclass(frozen=True)
class BatchSegment:
    """Steps `first_step..` run with global batch `batch`; `samples_before` precede them."""

    first_step: int
    samples_before: int
    batch: int


class BatchSchedule:
    """Global batch size per step (constant, or Megatron's linear ramp), in samples."""

    def __init__(self, recipe: Recipe):
        t = recipe.train
        self.micro_batch_size = t.micro_batch_size
        self.dp = data_parallel_size(recipe)
        self.final = t.global_batch_size
        self.segments = self._segments(recipe)

    def _segments(self, recipe: Recipe) -> list[BatchSegment]:
        ramp = recipe.train.batch_ramp
        if ramp is None or ramp[0] == ramp[1]:
            return [BatchSegment(0, 0, self.final)]
        start, end, samples = ramp
        increment = batch_increment(recipe)
        n = (end - start) // increment
        floor = min_global_batch(recipe)
        segments: list[BatchSegment] = []
        step = consumed = 0
        for k in range(n):
            batch = max(start + k * increment, floor)
            threshold = -(-(k + 1) * samples // n)  # ceil((k+1) * samples / n)
            if consumed >= threshold:
                continue  # an increment shorter than one step of the previous batch
            if not segments or segments[-1].batch != batch:
                segments.append(BatchSegment(step, consumed, batch))
            steps = -(-(threshold - consumed) // batch)
            step += steps
            consumed += steps * batch
        if segments[-1].batch != end:
            segments.append(BatchSegment(step, consumed, end))
        return segments

    def _segment(self, step: int) -> BatchSegment:
        i = bisect_right([s.first_step for s in self.segments], step) - 1
        return self.segments[i]

    def global_batch(self, step: int) -> int:
        """Samples in step `step` (0-based)."""
        return self._segment(step).batch

    def samples_before(self, step: int) -> int:
        """Samples consumed by steps 0..step-1."""
        seg = self._segment(step)
        return seg.samples_before + (step - seg.first_step) * seg.batch

    def num_microbatches(self, step: int) -> int:
        """Micro-batches per data-parallel rank in step `step`."""
        return self.global_batch(step) // (self.micro_batch_size * self.dp)

    @property
    def ramp_steps(self) -> int:
        """Steps before the batch reaches its final value (0 without a ramp)."""
        return self.segments[-1].first_step

    def megatron_schedule(self) -> str:
        """The same schedule as Megatron-Core 0.19's `step_batch_size_schedule` string
        ("samples:batch ...", for `StepBatchsizeNumMicroBatchesCalculator`)."""
        return " ".join(f"{s.samples_before}:{s.batch}" for s in self.segments)


def value_at(base: float, schedule, tokens: float) -> float:
    """`base`, replaced by each `[from_tokens, value]` of `schedule` whose boundary is passed."""
    value = base
    for from_tokens, new in schedule:
        if tokens >= from_tokens:
            value = new
    return value


def phase_lr(start_lr: float, phases, tokens: float) -> float:
    """LR of the token phases `[[until_tokens, lr_at_end, shape], ...]` after `tokens`.

    Phase i runs from the previous boundary (0 for the first) to `until_tokens` and goes from
    the previous phase's end LR (`start_lr` for the first) to `lr_at_end`: `constant` holds
    `lr_at_end` for the whole phase, `linear` interpolates, `cosine` follows half a cosine.
    After the last boundary the last `lr_at_end` stays.
    """
    begin, lr = 0.0, start_lr
    for until, end_lr, shape in phases:
        if tokens < until:
            frac = (tokens - begin) / (until - begin)
            if shape == "constant":
                return end_lr
            if shape == "linear":
                return lr + (end_lr - lr) * frac
            return end_lr + (lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
        begin, lr = until, end_lr
    return lr


def lr_at(recipe: Recipe, step: int, tokens: float) -> float:
    """Learning rate of optimizer step `step` that starts after `tokens` training tokens.

    Linear warm-up from 0 over `optimizer.lr_warmup_steps` steps (Megatron's formula: step s
    uses lr * s / warmup), then `optimizer.lr_schedule_tokens` by tokens.
    """
    o = recipe.optimizer
    if o.lr_warmup_steps and step <= o.lr_warmup_steps:
        return o.lr * step / o.lr_warmup_steps
    return phase_lr(o.lr, o.lr_schedule_tokens, tokens)


def tokens_before(recipe: Recipe, batches: BatchSchedule, step: int) -> int:
    """Training tokens consumed by steps 0..step-1."""
    return batches.samples_before(step) * recipe.model.seq_length


def config_values(recipe: Recipe, tokens: float) -> dict[str, float]:
    """TransformerConfig fields that the recipe changes by tokens, and their value now."""
    m, moe = recipe.model, recipe.moe
    values = {}
    if m.mtp_loss_scaling_schedule:
        values["mtp_loss_scaling_factor"] = value_at(
            m.mtp_loss_scaling_factor, m.mtp_loss_scaling_schedule, tokens)
    if moe.bias_update_rate_schedule:
        values["moe_router_bias_update_rate"] = value_at(
            moe.bias_update_rate, moe.bias_update_rate_schedule, tokens)
    return values


class _ShiftedTokens:
    """A token source whose sample `i` is the wrapped source's sample `i + offset`."""

    def __init__(self, tokens, offset: int):
        self.tokens, self.offset = tokens, offset

    def sample(self, index: int):
        return self.tokens.sample(index + self.offset)


def step_source(source, batches: BatchSchedule, step: int):
    """`source` (a `data.MicrobatchSource`) for step `step` of a varying global batch.

    Its micro-batch count is the step's, and its samples continue where the previous step's
    ended: sample `samples_before(step) + j` for the j-th sample of the step, in the same
    data-parallel-rank-major order as a constant batch. Without a ramp `source` is returned.
    """
    import dataclasses

    if not batches.ramp_steps:
        return source
    n = batches.num_microbatches(step)
    per_step = source.micro_batch_size * n * source.dp_size
    tokens = source.tokens
    while isinstance(tokens, _ShiftedTokens):
        tokens = tokens.tokens
    offset = batches.samples_before(step) - step * per_step
    return dataclasses.replace(source, num_microbatches=n, tokens=_ShiftedTokens(tokens, offset))
