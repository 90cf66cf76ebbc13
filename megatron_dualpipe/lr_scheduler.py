"""Learning-rate schedulers for the training loop (Megatron-Core's `OptimizerParamScheduler`).

`build_scheduler(recipe, optimizer)` returns Megatron's step-based scheduler, or, with
`optimizer.lr_schedule_tokens`, `TokenLRScheduler`: the same class with `get_lr` replaced by
`token_schedules.lr_at` (step-based warm-up, then phases by training tokens). The tokens are
derived from the scheduler's step count through the batch schedule, so the scheduler's state
is still just `num_steps` and checkpoints/resume work unchanged.
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_dualpipe.config.schema import Recipe
from megatron_dualpipe.token_schedules import BatchSchedule, lr_at, tokens_before


class TokenLRScheduler(OptimizerParamScheduler):
    """`OptimizerParamScheduler` whose learning rate follows `optimizer.lr_schedule_tokens`.

    A param group's `max_lr` (Megatron's per-group override) scales its LR proportionally.
    Weight decay is Megatron's (constant).
    """

    def __init__(self, optimizer, recipe: Recipe, batches: BatchSchedule | None = None):
        self.recipe = recipe
        self.batches = batches or BatchSchedule(recipe)
        o = recipe.optimizer
        steps = max(recipe.train.steps, o.lr_warmup_steps + 1)
        super().__init__(
            optimizer, init_lr=0.0, max_lr=o.lr, min_lr=0.0, lr_warmup_steps=o.lr_warmup_steps,
            lr_decay_steps=steps, lr_decay_style="constant", start_wd=o.weight_decay,
            end_wd=o.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
        )

    def current_tokens(self) -> int:
        """Tokens consumed before the step that `num_steps` refers to."""
        return tokens_before(self.recipe, self.batches, self.num_steps)

    def get_lr(self, param_group: dict) -> float:
        lr = lr_at(self.recipe, self.num_steps, self.current_tokens())
        return lr * param_group.get("max_lr", self.max_lr) / self.max_lr


def build_scheduler(recipe: Recipe, optimizer, batches: BatchSchedule | None = None):
    """The LR/weight-decay scheduler of `recipe` (stepped once per optimizer step)."""
    o = recipe.optimizer
    if o.lr_schedule_tokens:
        return TokenLRScheduler(optimizer, recipe, batches)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=max(recipe.train.steps, o.lr_warmup_steps + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=recipe.train.steps,
        wd_incr_style="constant",
    )
