"""Keep chosen Transformer Engine GEMMs in BF16 inside an FP8 model (`fp8.bf16_modules`).

DeepSeek-V3 runs every Linear in FP8 with its own kernels (DeepGEMM). With Transformer Engine
on Hopper, GEMMs with a small output or reduction dimension (MLA's low-rank projections:
7168->1536/576 down, 512->32768 up) run slower in FP8 than in BF16 because quantizing the
activation costs more than the GEMM saves (see docs/benchmarks.md, fp8_bench). A recipe can
list glob patterns on module paths (`named_modules()` names inside one model chunk, e.g.
``decoder.layers.3.self_attention.linear_q_down_proj``) whose GEMMs stay BF16.

The override uses Megatron-Core's own per-module quantization hook: every TE linear wrapper
(`TELinear`, `TELayerNormColumnParallelLinear`, `TEGroupedLinear`) reads `te_quant_params` at
each forward, and a training recipe without an FP8 recipe opens ``fp8_autocast(enabled=False)``
around that module (forward and its backward). `finish_init` is the method Megatron itself
calls to set it from `TransformerConfig.quant_recipe`; we call it after the build because
Megatron 0.19's `TransformerBlock` does not pass module names down to the layers, so
`quant_recipe` glob matching never sees a name there.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

BF16_OVERRIDE = {"transformer_engine_config_type": "TEQuantizationParams", "training_recipe": {}}


def matching_modules(chunk, patterns: Iterable[str]) -> list[tuple[str, object]]:
    """(name, module) of the quantization-configurable TE modules of `chunk` whose
    `named_modules()` name matches any glob in `patterns`."""
    patterns = list(patterns)
    found = []
    for name, module in chunk.named_modules():
        if not hasattr(module, "finish_init") or not hasattr(module, "te_quant_params"):
            continue
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            found.append((name, module))
    return found


def apply_bf16_modules(chunk, patterns: Iterable[str]) -> list[str]:
    """Make the matching TE GEMM modules of `chunk` (an unwrapped model chunk, as
    `build_model` has it before DDP) run in BF16; returns their names.

    No-op (empty list) without patterns. Modules that are not Transformer Engine wrappers
    (CPU/local specs) have no FP8 path and are never matched.
    """
    patterns = list(patterns)
    if not patterns:
        return []
    from megatron.core.quantization.quant_config import MatchContext, QuantizationConfig

    names = []
    for name, module in matching_modules(chunk, patterns):
        layer = re.search(r"layers\.(\d+)", name)
        layer_number = int(layer.group(1)) if layer else None
        context = MatchContext(module_path=name, layer_number=layer_number)
        module.finish_init(QuantizationConfig(BF16_OVERRIDE, context, "fp8.bf16_modules"))
        names.append(name)
    return names


def is_bf16_override(module) -> bool:
    """Whether `module` carries a per-module quantization override with no FP8 recipe."""
    params = getattr(module, "te_quant_params", None)
    if params is None:
        return False
    recipe = params.training_recipe
    return recipe.fp8_quantization_recipe is None and recipe.fp4_quantization_recipe is None

