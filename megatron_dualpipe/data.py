"""Micro-batches for training: a deterministic synthetic stream, or Megatron's indexed dataset.

Sample `i` of the run is a pure function of (seed, i), so any data-parallel layout, pipeline
schedule or a resumed run sees exactly the same tokens at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dualpipe.config import Recipe, data_parallel_size, num_microbatches


def _permutation(vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))


class SyntheticTokens:
    """Sequences following a fixed random successor map with 10% noise (a learnable bigram).

    The best achievable loss is about 0.1*ln(V) + 0.33 nats, far below the ln(V) of the
    untrained model, so falling loss shows that training works.
    """

    noise = 0.1

    def __init__(self, vocab_size: int, seq_length: int, seed: int):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.successor = _permutation(vocab_size, seed)
        self._successor_list = self.successor.tolist()

    def sample(self, index: int) -> torch.Tensor:
        """Token ids [seq_length + 1] of sample `index`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self.seq_length + 1
        noise = (torch.rand(n, generator=g) < self.noise).tolist()
        random_tokens = torch.randint(0, self.vocab_size, (n,), generator=g).tolist()
        successor = self._successor_list
        tokens = [random_tokens[0]]
        for t in range(1, n):
            tokens.append(random_tokens[t] if noise[t] else successor[tokens[-1]])
        return torch.tensor(tokens, dtype=torch.long)


class IndexedTokens:
    """Consecutive windows of seq_length+1 tokens over a Megatron indexed dataset."""

    def __init__(self, path_prefix: str, seq_length: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.dataset = IndexedDataset(path_prefix)
        self.seq_length = seq_length
        lengths = torch.as_tensor(self.dataset.sequence_lengths, dtype=torch.long)
        self.doc_starts = torch.cumsum(lengths, 0) - lengths
        self.total = int(lengths.sum())
        if self.total < seq_length + 1:
            raise ValueError(f"data.path={path_prefix}: fewer than {seq_length + 1} tokens")

    def sample(self, index: int) -> torch.Tensor:
        n = self.seq_length + 1
        start = (index * self.seq_length) % (self.total - n + 1)
        out = []
        while n > 0:
            doc = int(torch.searchsorted(self.doc_starts, start, right=True)) - 1
            offset = start - int(self.doc_starts[doc])
            length = min(n, len(self.dataset[doc]) - offset)
            out.append(torch.as_tensor(self.dataset.get(doc, offset, length), dtype=torch.long))
            start += length
            n -= length
        return torch.cat(out)


@dataclass
class MicrobatchSource:
    """Which samples each (step, data-parallel rank, micro-batch) gets."""

    tokens: SyntheticTokens | IndexedTokens
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


def make_source(recipe: Recipe, dp_rank: int, device: torch.device) -> MicrobatchSource:
    m, d = recipe.model, recipe.data
    if d.kind == "indexed":
        if not d.path:
            raise ValueError("data.kind=indexed needs data.path (a Megatron .bin/.idx prefix)")
        tokens = IndexedTokens(d.path, m.seq_length)
    else:
        tokens = SyntheticTokens(m.vocab_size, m.seq_length, d.seed)
    return MicrobatchSource(
        tokens=tokens,
        micro_batch_size=recipe.train.micro_batch_size,
        num_microbatches=num_microbatches(recipe),
        dp_size=data_parallel_size(recipe),
        dp_rank=dp_rank,
        device=device,
    )
