"""FP8 training (DeepSeek-V3 §3.3) on Megatron-Core + Transformer Engine.

* `check_fp8_recipe(recipe)`: recipe-only FP8 rules (CPU; `plan` may call it).
* `check_fp8_environment(recipe, device)`: TE / GPU / CUDA can run the recipe; call it before
  any process group starts (training only, not `plan`).
* `fp8_module_report(chunks)`: which modules run FP8 GEMMs and which stay BF16;
  `observe_fp8_execution` / `compare_with_observation` confirm it on the GPU.
* `megatron_dualpipe.fp8.deepgemm` (imported on its own): DeepGEMM's kernels behind the routed
  experts (experimental; runs on an H200, not yet faster than TE's grouped GEMM).

See docs/fp8.md.
"""

from megatron_dualpipe.fp8.env_check import (
    check_fp8_environment,
    check_fp8_recipe,
    fp8_environment_problems,
    fp8_environment_variables,
)
from megatron_dualpipe.fp8.modules import (
    compare_with_observation,
    fp8_module_report,
    observe_fp8_execution,
)

__all__ = [
    "check_fp8_environment",
    "check_fp8_recipe",
    "compare_with_observation",
    "fp8_environment_problems",
    "fp8_environment_variables",
    "fp8_module_report",
    "observe_fp8_execution",
]
