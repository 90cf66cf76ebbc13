"""DeepGEMM (DeepSeek's FP8 GEMM kernels, v2.6.1, SM90) behind the routed experts.

* `grouped_fp8_gemm` (function.py): y_e = x_e W_e^T for all local experts in one autograd
  function: forward and dgrad on `m_grouped_fp8_gemm_nt_contiguous`, wgrad on
  `k_grouped_fp8_gemm_nt_contiguous` into FP32 `main_grad`;
* `WeightCache` (weights.py): W and W^T in 128x128 blocks, once per optimizer step;
* `deepgemm_expert_spec` (module.py): swaps TEGroupedMLP's linear_fc1 / linear_fc2 in a layer
  spec for subclasses that take this path under blockwise FP8 and TE's otherwise.

Experimental: checked on CPU against an emulator of the kernels (tests/test_deepgemm_experts.py)
and on one H200 against the same reference (tests/test_deepgemm_experts_gpu.py), where it is not
yet faster than TE's path; docs/fp8.md, "DeepGEMM behind the routed experts". `deep_gemm` and
Transformer Engine are imported at first use.
"""

from megatron_dualpipe.fp8.deepgemm.function import GemmOptions, grouped_fp8_gemm
from megatron_dualpipe.fp8.deepgemm.module import deepgemm_expert_spec, deepgemm_grouped_linear
from megatron_dualpipe.fp8.deepgemm.quantize import QuantizedWeights, quantize_weights
from megatron_dualpipe.fp8.deepgemm.weights import WeightCache

__all__ = [
    "GemmOptions",
    "QuantizedWeights",
    "WeightCache",
    "deepgemm_expert_spec",
    "deepgemm_grouped_linear",
    "grouped_fp8_gemm",
    "quantize_weights",
]
