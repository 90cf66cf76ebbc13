"""`fp8.expert_gemm`: which library runs the routed experts' blockwise FP8 GEMMs.

``te`` (default): Transformer Engine's grouped GEMM. ``deepgemm``: DeepSeek's DeepGEMM kernels
(`megatron_dualpipe/fp8/deepgemm`), swapped into Megatron-Core's TEGroupedMLP by its layer
spec; experimental (checked on CPU against an emulator of the kernels and on one H200 against
the same reference; not faster than ``te`` there yet: docs/fp8.md).
What it needs, checked before any worker starts:

* ``fp8.recipe=blockwise`` (DeepSeek-V3's 1x128 / 128x128 scaling is what the kernels take),
  BF16 weights (no ``fp8.param_gather``), Transformer Engine layer specs with grouped experts
  (``model.spec=te``, ``moe.grouped_gemm=true``), no expert tensor parallelism (``parallel.tp``
  1); sizes that are multiples of 128 come with blockwise (`validate.check_fp8`, run first);
* the ``deep_gemm`` package importable on the GPU machine, and Triton for
  ``fp8.deepgemm_quantizer=triton`` (`check_expert_gemm_installed`, a `train` rule;
  docs/fp8.md, "Blockwise GEMM routes", builds DeepGEMM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_dualpipe.errors import UserError

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe

FIELD = "fp8.expert_gemm=deepgemm"


def check_expert_gemm(recipe: Recipe) -> None:
    """What ``fp8.expert_gemm=deepgemm`` cannot be combined with (recipe alone)."""
    if recipe.fp8.expert_gemm != "deepgemm":
        return
    f, m, moe = recipe.fp8, recipe.model, recipe.moe
    needs = [
        (f.recipe == "blockwise", f"fp8.recipe=blockwise (got {f.recipe})"),
        (not f.param_gather, "fp8.param_gather=false (the kernels quantize BF16 weights)"),
        (m.spec == "te", f"model.spec=te (got {m.spec})"),
        (moe.num_experts > 0 and moe.grouped_gemm,
         "routed experts with moe.grouped_gemm=true"),
        (recipe.parallel.tp == 1, f"parallel.tp=1 (got {recipe.parallel.tp})"),
    ]
    for ok, what in needs:
        if not ok:
            raise UserError(f"{FIELD} needs {what}; allowed otherwise: fp8.expert_gemm=te")


def check_expert_gemm_installed(recipe: Recipe) -> None:
    """``deepgemm``: the ``deep_gemm`` package imports (the launcher's check)."""
    if recipe.fp8.expert_gemm != "deepgemm":
        return
    try:
        import deep_gemm  # noqa: F401
    except Exception as err:  # ImportError, or a CUDA library missing at load time
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(
            f"{FIELD} needs DeepGEMM (the deep_gemm package), which does not import here "
            f"({type(err).__name__}: {first}); build it as docs/fp8.md says (\"Blockwise GEMM "
            "routes\"), or set fp8.expert_gemm=te") from None
    if recipe.fp8.deepgemm_quantizer == "triton":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise UserError("fp8.deepgemm_quantizer=triton needs the triton package, which is "
                            "not installed here; allowed otherwise: te, te-rows, torch")
