"""DeepGEMM behind Megatron-Core 0.19's routed-expert linears (`TEGroupedMLP`'s linear_fc1 and
linear_fc2), TP=1.

`deepgemm_grouped_linear(base)` subclasses the given grouped-linear class (Megatron's
`TEColumnParallelGroupedLinear` / `TERowParallelGroupedLinear`): same constructor, parameters,
checkpoint format and DDP hooks; only `forward` changes. Under an FP8 autocast whose recipe is
blockwise (`Float8BlockScaling`) it runs `grouped_fp8_gemm` on DeepGEMM's kernels with the
weights quantized once per step; otherwise (BF16 steps, modules kept BF16 by
`fp8.bf16_modules`, i.e. with a per-module `te_quant_params`) it calls TE's own forward
unchanged, so BF16 is bit for bit TE's.

`deepgemm_expert_spec(spec)` swaps those two classes in every `GroupedMLPSubmodules` reachable
from a layer / block / MoE spec (in place) and leaves everything else alone; `model/build.py`
calls it for every chunk when the recipe sets `fp8.expert_gemm: deepgemm`
(`config/expert_gemm.py` checks the recipe first).

Not supported (refused at construction): expert biases, expert TP > 1, TE's delayed wgrad
(`delay_wgrad_compute`), FP8 primary weights, in/out features not multiples of 128. The
zero-bubble W split of DualPipe(V) does not defer these modules' weight GEMMs (they run in B).
`fp8.modules.observe_fp8_execution` reads TE's `fp8` flag, which this path does not set: it
reports these modules as not FP8.
"""

from __future__ import annotations

import functools

from megatron_dualpipe.fp8.deepgemm.function import GemmOptions, grouped_fp8_gemm
from megatron_dualpipe.fp8.deepgemm.quantize import QUANTIZERS
from megatron_dualpipe.fp8.deepgemm.weights import WeightCache
from megatron_dualpipe.model.spec_walk import walk_spec


def active_fp8_recipe():
    """TE's FP8 recipe while an FP8 autocast is on, else None."""
    from megatron_dualpipe.te import fp8_state_manager

    state = fp8_state_manager()
    return state.get_fp8_recipe() if state.is_fp8_enabled() else None


def default_quantizer() -> str:
    """`te` (fused quantize kernel) when Transformer Engine and CUDA are there, else `torch`."""
    import torch

    from megatron_dualpipe.te import te_available

    return "te" if torch.cuda.is_available() and te_available() else "torch"


class DeepGEMMGroupedLinearMixin:
    """forward(x, m_splits) -> (y, None) through DeepGEMM under blockwise FP8, TE otherwise."""

    deepgemm_quantizer: str | None = None  # None: default_quantizer(), resolved at construction

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deepgemm_quantizer = self.deepgemm_quantizer or default_quantizer()
        self.deepgemm_weights = WeightCache(self.deepgemm_quantizer)
        problems = _unsupported(self)
        if problems:
            raise ValueError(f"{type(self).__name__}: DeepGEMM experts do not support "
                             + "; ".join(problems))

    def expert_weights(self) -> list:
        """weight0..weight{G-1}, or the single grouped [G, N, K] `weight`."""
        single = getattr(self, "weight", None)
        if getattr(self, "single_grouped_weight", False) and single is not None:
            return [single]
        return [getattr(self, f"weight{i}") for i in range(self.num_gemms)]

    def uses_deepgemm(self) -> bool:
        """Whether this call goes to DeepGEMM: FP8 autocast on, no per-module override."""
        if getattr(self, "te_quant_params", None) is not None:
            return False
        recipe = active_fp8_recipe()
        if recipe is None:
            return False
        if not recipe.float8_block_scaling():
            raise RuntimeError(f"DeepGEMM experts run DeepSeek-V3's blockwise FP8 recipe only; "
                               f"the FP8 autocast has {type(recipe).__name__}")
        return True

    def forward(self, x, m_splits):
        if not self.uses_deepgemm():
            return super().forward(x, m_splits)
        if hasattr(m_splits, "tolist"):
            m_splits = m_splits.tolist()  # a device-to-host sync, as in TE
        weights = self.expert_weights()
        refresh = bool(getattr(self, "is_first_microbatch", True)) or bool(
            getattr(self, "disable_parameter_transpose_cache", False))
        quantized = self.deepgemm_weights.get(weights, refresh=refresh)
        options = GemmOptions(accumulate=bool(self.fuse_wgrad_accumulation),
                              quantizer=self.deepgemm_quantizer)
        y = grouped_fp8_gemm(x, m_splits, weights, quantized, options)
        # TE's own FP8 state (self.fp8, fp8_meta) is left alone: setting `fp8` would make TE
        # write FP8 metadata it never initialized into checkpoints.
        self.is_first_microbatch = False
        return y, None


def _unsupported(module) -> list[str]:
    import torch

    problems = []
    if getattr(module, "use_bias", False):
        problems.append("expert biases (add_bias_linear)")
    tp_group = getattr(module, "_tp_group", None)
    if tp_group is not None and tp_group.size() > 1:
        problems.append(f"expert tensor parallelism ({tp_group.size()})")
    if getattr(module, "delay_wgrad_compute", False) is True:  # Megatron's flag (bool)
        problems.append("delay_wgrad_compute")
    for name, size in (("in_features", module.in_features),
                       ("out_features", module.out_features)):
        if size % 128:
            problems.append(f"{name} {size} (must be a multiple of 128)")
    for w in module.expert_weights():
        if type(w.data) is not torch.Tensor or w.dtype != torch.bfloat16:
            problems.append(f"weights of type {type(w.data).__name__} {w.dtype} (BF16 only)")
            break
    return problems


@functools.cache
def deepgemm_grouped_linear(base: type, quantizer: str | None = None) -> type:
    """`base` (a TE grouped-linear class) with DeepGEMM's forward under blockwise FP8;
    `quantizer` (`torch` / `te` / `te-rows` / `triton`, quantize.py) fixes the activation
    quantize kernels (default: `te` on a GPU with TE). Idempotent: a DeepGEMM class is
    returned as it is."""
    if quantizer is not None and quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
    if issubclass(base, DeepGEMMGroupedLinearMixin):
        return base
    name = f"DeepGEMM{base.__name__}"
    return type(name, (DeepGEMMGroupedLinearMixin, base), {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{base.__name__} whose blockwise FP8 GEMMs run on DeepGEMM.",
        "deepgemm_quantizer": quantizer,
    })


def deepgemm_expert_spec(spec, quantizer: str | None = None) -> int:
    """Swap linear_fc1 / linear_fc2 of every `GroupedMLPSubmodules` reachable from `spec`
    (ModuleSpec, functools.partial, dataclass submodules, lists) for their DeepGEMM subclasses,
    in place; returns how many submodule sets it swapped (already swapped ones are left)."""
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules

    swapped = 0
    for node in walk_spec(spec):
        if not isinstance(node, GroupedMLPSubmodules):
            continue
        if all(isinstance(c, type) and issubclass(c, DeepGEMMGroupedLinearMixin)
               for c in (node.linear_fc1, node.linear_fc2)):
            continue
        node.linear_fc1 = deepgemm_grouped_linear(node.linear_fc1, quantizer)
        node.linear_fc2 = deepgemm_grouped_linear(node.linear_fc2, quantizer)
        swapped += 1
    return swapped
