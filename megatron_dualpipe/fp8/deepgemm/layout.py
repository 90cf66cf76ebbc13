"""Rows of the local experts, padded per expert to DeepGEMM's M alignment.

The experts' input arrives as one [sum(m_splits), K] tensor whose rows are grouped by expert
(Megatron's permute, padded to 16 rows per expert for TE's FP8). DeepGEMM's contiguous layout
wants each expert's rows to start at a multiple of the alignment (128 on SM90), padding rows
tagged -1; the wgrad kernel wants 128-row groups of real or zero rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_CACHE: dict = {}
_CACHE_SIZE = 16


@dataclass
class ExpertRows:
    """`splits`: real rows per expert; `padded`: rows per expert in the padded layout;
    `rows`: where each real row sits in the padded layout (None when nothing is padded);
    `m_indices`: int32 [sum(padded)], each padded row's expert or -1; `ks`: int32 [G] of
    `padded` (the k-grouped kernel's group sizes on the device)."""

    splits: list[int]
    padded: list[int]
    rows: object
    m_indices: object
    ks: object
    _ordered: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, splits, align: int, device) -> ExpertRows:
        """The layout of `splits` (cached: fc1 and fc2, forward and backward, and every
        micro-batch with the same counts share one, so its index tensors are made once)."""
        splits = [int(s) for s in splits]
        key = (tuple(splits), align, str(device))
        if key not in _CACHE:
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = cls._make(splits, align, device)
        return _CACHE[key]

    @classmethod
    def _make(cls, splits: list[int], align: int, device) -> ExpertRows:
        import torch

        if any(s < 0 for s in splits):
            raise ValueError(f"negative rows per expert in m_splits {splits}")
        padded = [-(-s // align) * align for s in splits]
        values, counts = [], []
        for e, (s, p) in enumerate(zip(splits, padded, strict=True)):
            values += [e, -1]
            counts += [s, p - s]
        m_indices = torch.repeat_interleave(
            torch.tensor(values, dtype=torch.int32, device=device),
            torch.tensor(counts, device=device), output_size=sum(padded))
        rows = None
        if padded != splits:
            shift = [sum(padded[:e]) - sum(splits[:e]) for e in range(len(splits))]
            rows = torch.arange(sum(splits), device=device) + torch.repeat_interleave(
                torch.tensor(shift, device=device), torch.tensor(splits, device=device),
                output_size=sum(splits))
        ks = torch.tensor(padded, dtype=torch.int32, device=device)
        return cls(splits, padded, rows, m_indices, ks)

    def group_sizes(self, order: list[int]):
        """(host list, int32 device tensor) of the padded sizes in `order`."""
        ks = [self.padded[g] for g in order]
        if order == sorted(order):
            return ks, self.ks
        key = tuple(order)
        if key not in self._ordered:
            import torch

            self._ordered[key] = torch.tensor(ks, dtype=torch.int32, device=self.ks.device)
        return ks, self._ordered[key]

    @property
    def num_padded(self) -> int:
        return sum(self.padded)

    def pad(self, x):
        """x [sum(splits), C] -> [sum(padded), C], zero padding rows (x itself when nothing is
        padded)."""
        if self.rows is None:
            return x.contiguous()
        out = x.new_zeros(self.num_padded, x.size(1))
        return out.index_copy_(0, self.rows, x)

    def unpad(self, xp):
        """[sum(padded), C] -> the real rows [sum(splits), C]."""
        return xp if self.rows is None else xp.index_select(0, self.rows)
