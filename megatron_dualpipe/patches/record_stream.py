"""`Tensor.record_stream` ignores CPU tensors while an overlapped F&B plan runs on CPU.

Target: `torch.Tensor.record_stream`. Megatron-Core's schedule-plan nodes call it on their
outputs with the communication stream; on CPU (gloo, our null streams from `cpu_torch`) the
real method rejects CPU tensors. The replacement passes CUDA tensors to the original and does
nothing for others. `schedules/overlap.py` applies it only around a plan run on CPU
(`cpu_record_stream()`), so torch is untouched everywhere else.
"""

from __future__ import annotations

import contextlib

from megatron_dualpipe.patches.base import Patch


def _make(original):
    def record_stream(self, stream):
        if self.is_cuda:
            return original(self, stream)
        return None

    return record_stream


def make_patch() -> Patch:
    return Patch(
        name="record_stream",
        module="torch:Tensor",
        replacements={"record_stream": _make},
        package="torch",
        min_version="2.4",
        max_version="3.0",
    )


@contextlib.contextmanager
def cpu_record_stream():
    """Apply the patch inside the block (no-op when it is already applied)."""
    from megatron_dualpipe.patches import patches_of

    (patch,) = patches_of("record_stream")
    owner = not patch.applied
    patch.apply()
    try:
        yield
    finally:
        if owner:
            patch.revert()
