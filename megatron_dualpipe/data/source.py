"""Micro-batches for training and validation, from synthetic tokens or Megatron's GPTDataset.

Sample `i` of the run is a pure function of (seed, i), so any data-parallel layout, pipeline
schedule or a resumed run sees exactly the same tokens at the same step. Validation uses the
same `eval_iters` global batches every time it runs, so its losses are comparable over a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dualpipe.config import Recipe, data_parallel_size, num_microbatches
from megatron_dualpipe.data.synthetic import VALID_OFFSET, SyntheticTokens


@dataclass
class MicrobatchSource:
    """Which samples each (step, data-parallel rank, micro-batch) gets."""

    tokens: object  # .sample(index) -> seq_length+1 token ids
    micro_batch_size: int
    num_microbatches: int
    dp_size: int
    dp_rank: int
    device: torch.device

    def batch(self, step: int, microbatch: int) -> dict[str, torch.Tensor]:
        per_step = self.micro_batch_size * self.num_microbatches * self.dp_size
        first = (
            step * per_step
            + self.dp_rank * self.micro_batch_size * self.num_microbatches
            + microbatch * self.micro_batch_size
        )
        seqs = torch.stack([self.tokens.sample(first + i) for i in range(self.micro_batch_size)])
        seq_length = seqs.shape[1] - 1
        return {
            "tokens": seqs[:, :-1].to(self.device),
            "labels": seqs[:, 1:].to(self.device),
            "loss_mask": torch.ones(self.micro_batch_size, seq_length, device=self.device),
            "position_ids": torch.arange(seq_length, device=self.device).expand(
                self.micro_batch_size, seq_length
            ),
            "microbatch": (self.dp_rank, microbatch),
        }

    def iterator(self, step: int, microbatches=None):
        """Yields the micro-batches of `step` in order (or those listed)."""
        for m in microbatches if microbatches is not None else range(self.num_microbatches):
            yield self.batch(step, m)

    def iterators(self, step: int, num_chunks: int):
        """The `data_iterator` argument of a forward_backward_func for `num_chunks` model
        chunks: one iterator, or one per chunk."""
        if num_chunks == 1:
            return self.iterator(step)
        return [self.iterator(step) for _ in range(num_chunks)]


def make_sources(recipe: Recipe, dp_rank: int, device: torch.device,
                 validation: bool = True) -> tuple[MicrobatchSource, MicrobatchSource | None]:
    """Training and (with `train.eval_iters` and `validation`) validation micro-batches."""
    m, d, t = recipe.model, recipe.data, recipe.train
    num_valid = t.eval_iters * t.global_batch_size if validation else 0
    if d.kind == "indexed":
        from megatron_dualpipe.data.gpt_dataset import GPTSamples, build_gpt_datasets

        train, valid = build_gpt_datasets(recipe, t.steps * t.global_batch_size, num_valid)
        tokens = GPTSamples(train), GPTSamples(valid) if valid is not None else None
    else:
        tokens = (SyntheticTokens(m.vocab_size, m.seq_length, d.seed),
                  SyntheticTokens(m.vocab_size, m.seq_length, d.seed, offset=VALID_OFFSET)
                  if num_valid else None)

    def source(samples):
        return MicrobatchSource(
            tokens=samples,
            micro_batch_size=t.micro_batch_size,
            num_microbatches=num_microbatches(recipe),
            dp_size=data_parallel_size(recipe),
            dp_rank=dp_rank,
            device=device,
        )

    return source(tokens[0]), source(tokens[1]) if tokens[1] is not None else None


def make_source(recipe: Recipe, dp_rank: int, device: torch.device) -> MicrobatchSource:
    """The training micro-batches."""
    return make_sources(recipe, dp_rank, device, validation=False)[0]
