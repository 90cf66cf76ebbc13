"""Rows of the local experts, padded per expert to DeepGEMM's M alignment.

The experts' input arrives as one [sum(m_splits), K] tensor whose rows are grouped by expert
(Megatron's permute, padded to 16 rows per expert for TE's FP8). DeepGEMM's contiguous layout
wants each expert's rows to start at a multiple of the alignment (128 on SM90), padding rows
tagged -1; the wgrad kernel wants 128-row groups of real or zero rows.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    @classmethod
    def build(cls, splits, align: int, device) -> ExpertRows:
        import torch

        splits = [int(s) for s in splits]
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

    @property
    def num_padded(self) -> int:
        return sum(self.padded)

    def pad(self, x):
        """x [sum(splits), C] -> [sum(padded), C], zero padding rows."""
        if self.rows is None:
            return x.contiguous()
        out = x.new_zeros(self.num_padded, x.size(1))
        return out.index_copy_(0, self.rows, x)

    def unpad(self, xp):
        """[sum(padded), C] -> the real rows [sum(splits), C]."""
        return xp if self.rows is None else xp.index_select(0, self.rows)
