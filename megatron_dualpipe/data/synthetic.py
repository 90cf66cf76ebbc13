"""A deterministic synthetic token stream: sample `i` is a pure function of (seed, i)."""

from __future__ import annotations

import numpy as np
import torch

# Validation samples are drawn from the same distribution, far past any training index.
VALID_OFFSET = 1 << 40


class SyntheticTokens:
    """Sequences following a fixed random successor map with 10% noise (a learnable bigram).

    The best achievable loss is about 0.1*ln(V) + 0.33 nats, far below the ln(V) of the
    untrained model, so falling loss shows that training works. `offset` shifts the sample
    indices (validation uses `VALID_OFFSET`), keeping the successor map.
    """

    noise = 0.1

    def __init__(self, vocab_size: int, seq_length: int, seed: int, offset: int = 0):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.offset = offset
        self.successor = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
        self._successor = self.successor.numpy()

    def sample(self, index: int) -> torch.Tensor:
        """Token ids [seq_length + 1] of sample `index`.

        Token 0 and every noisy position draw a random token; every other position follows
        the successor map from the previous token. Vectorized: each position finds its last
        random start and applies the successor map `distance` times.
        """
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        n = self.seq_length + 1
        reset = (torch.rand(n, generator=g) < self.noise).numpy()
        random_tokens = torch.randint(0, self.vocab_size, (n,), generator=g).numpy()
        reset[0] = True
        position = np.arange(n)
        start = np.maximum.accumulate(np.where(reset, position, 0))
        distance = position - start
        tokens = random_tokens[start]
        for k in range(int(distance.max())):
            moving = distance > k
            tokens[moving] = self._successor[tokens[moving]]
        return torch.from_numpy(tokens)
