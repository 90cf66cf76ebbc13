"""FP8 expert weights quantized once per optimizer step, as TE's weight cache does.

TE re-quantizes a module's weights on its first micro-batch of a step (`is_first_microbatch`,
set by Megatron's schedules and by our DualPipe executors for every chunk) and reuses the FP8
copy for the step's other micro-batches. `WeightCache` does the same for DeepGEMM's operands
(W for the forward, W^T for dgrad, both from one 128x128 pass) and additionally refreshes when
a weight tensor is replaced or changed in place through autograd-visible ops (its `_version`),
or after `invalidate()`. Optimizer writes through `.data` or a flat parameter buffer do not
bump `_version`: the per-step `refresh` flag is what catches them.
"""

from __future__ import annotations

from megatron_dualpipe.fp8.deepgemm.quantize import QuantizedWeights, weight_quantizer


def stack_experts(weights):
    """The experts' weights as one [G, N, K] tensor: a single grouped parameter as it is,
    per-expert [N, K] parameters stacked (a copy)."""
    import torch

    if len(weights) == 1 and weights[0].dim() == 3:
        return weights[0].detach()
    return torch.stack([w.detach() for w in weights])


class WeightCache:
    """The last quantization of one module's expert weights and what it was made from."""

    def __init__(self, quantizer: str = "torch"):
        """`quantizer`: the activation quantizer these weights go with (`weight_quantizer`)."""
        self.quantize = weight_quantizer(quantizer)
        self._key = None
        self._value: QuantizedWeights | None = None
        self.refreshes = 0

    @staticmethod
    def _key_of(weights) -> tuple:
        return tuple((id(w), w.data_ptr(), w._version, tuple(w.shape)) for w in weights)

    def get(self, weights, refresh: bool = False) -> QuantizedWeights:
        """FP8 W and W^T of `weights`, re-quantized when `refresh` (the step's first
        micro-batch), after `invalidate()`, or when a weight changed identity or version.
        A refresh makes a new object: backwards still pending keep the copy they used."""
        key = self._key_of(weights)
        if refresh or self._value is None or key != self._key:
            self._value = self.quantize(stack_experts(weights))
            self._key = key
            self.refreshes += 1
        return self._value

    def invalidate(self) -> None:
        """Drop the cached copy (call after an optimizer step that bypassed `refresh`)."""
        self._value = None
        self._key = None
