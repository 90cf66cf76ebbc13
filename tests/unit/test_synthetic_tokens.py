"""`SyntheticTokens.sample` (vectorized) draws the tokens of the plain per-token definition."""

from __future__ import annotations

import torch

from megatron_dualpipe.data import SyntheticTokens


def per_token_sample(tokens: SyntheticTokens, index: int) -> torch.Tensor:
    """The definition, one token at a time: a noisy position draws, others follow the map."""
    g = torch.Generator().manual_seed(tokens.seed * 1_000_003 + tokens.offset + index)
    n = tokens.seq_length + 1
    noise = (torch.rand(n, generator=g) < tokens.noise).tolist()
    random_tokens = torch.randint(0, tokens.vocab_size, (n,), generator=g).tolist()
    successor = tokens.successor.tolist()
    out = [random_tokens[0]]
    for t in range(1, n):
        out.append(random_tokens[t] if noise[t] else successor[out[-1]])
    return torch.tensor(out, dtype=torch.long)


def test_sample_equals_the_per_token_definition():
    for vocab, seq, seed in ((32768, 2048, 1234), (256, 32, 7), (5, 3, 0)):
        tokens = SyntheticTokens(vocab, seq, seed)
        for index in (0, 1, 17, 999):
            sample = tokens.sample(index)
            assert sample.dtype == torch.long and sample.shape == (seq + 1,)
            assert torch.equal(sample, per_token_sample(tokens, index))
    shifted = SyntheticTokens(256, 32, 7, offset=100)
    assert torch.equal(shifted.sample(3), per_token_sample(shifted, 3))
