"""Which modules run their GEMMs in FP8, and which stay in BF16/FP32 (DeepSeek-V3 §3.3).

DeepSeek-V3 keeps the embedding, the output head, the MoE gating (router), the norms and the
attention core in high precision and runs every Linear's three GEMMs in FP8. With Megatron-Core
and Transformer Engine that falls out of where the FP8 autocast is entered:

* `TransformerBlock` enters `megatron.core.fp8_utils.get_fp8_context(config, layer_no)` around
  each decoder layer (delayed scaling: once around the whole block). That context is a
  `nullcontext` for the `fp8.bf16_layers_at_start/end` layers (`is_first_last_bf16_layer`).
  MTP layers use the global context (`get_fp8_context(config)`, no bf16 exemption).
* Only Transformer Engine GEMM modules (`Linear`, `LayerNormLinear`, `LayerNormMLP`,
  `GroupedLinear`, and the op-fuser's `BasicLinear`) quantize inside that autocast.
* The embedding (a lookup), the output layer (Megatron's `ColumnParallelLinear`, a torch GEMM
  outside the decoder), the router (`TopKRouter`, a torch GEMM in `moe_router_dtype`) and the
  norms never do, even when called inside the autocast.

`fp8_module_report` derives this statically from module types and Megatron's per-layer rule;
`observe_fp8_execution` records, with forward hooks on the GPU, whether the FP8 autocast was
active at each call and whether each TE module actually ran in FP8; `compare_with_observation`
lists the disagreements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack

from megatron_dualpipe.fp8.overrides import is_bf16_override
from megatron_dualpipe.te import fp8_state_manager

TE_GEMM_CLASSES = {"Linear", "LayerNormLinear", "LayerNormMLP", "GroupedLinear", "BasicLinear"}
LOCAL_GEMM_CLASSES = {"ColumnParallelLinear", "RowParallelLinear", "Linear", "Bilinear"}
FP8, BF16 = "fp8", "bf16"


def _mro(module) -> list[type]:
    return list(type(module).__mro__)


def is_te_module(module) -> bool:
    return any(c.__module__.startswith("transformer_engine.") for c in _mro(module))


def is_te_gemm(module) -> bool:
    """A Transformer Engine module whose GEMMs follow the FP8 autocast."""
    return any(c.__module__.startswith("transformer_engine.") and c.__name__ in TE_GEMM_CLASSES
               for c in _mro(module))


def _has_name(module, *fragments: str) -> bool:
    return any(any(f in c.__name__ for f in fragments) for c in _mro(module))


def _is_layer(module) -> bool:
    return _has_name(module, "TransformerLayer") and hasattr(module, "layer_number")


def _is_mtp(module) -> bool:
    return _has_name(module, "MultiTokenPrediction")


def _own_params(module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def layer_runs_fp8(config, layer_no: int) -> bool:
    """Megatron-Core's decision for global (0-based) decoder layer `layer_no`: the same rule as
    `fp8_utils.get_fp8_context` (fp8 on, and not one of the first/last bf16 layers)."""
    if not getattr(config, "fp8", None):
        return False
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    return not is_first_last_bf16_layer(config, layer_no)


def _unwrap(chunk):
    """The model inside DDP/Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder") and not hasattr(
            chunk, "embedding"):
        chunk = chunk.module
    return chunk


def _kind(name: str, module) -> str | None:
    """What the module is, for modules that own parameters (None: not reported)."""
    if name.endswith("output_layer") or _has_name(module, "LMHead"):
        return "output_layer"
    if is_te_gemm(module):
        return "grouped_linear" if _has_name(module, "GroupedLinear") else "linear"
    if _has_name(module, "Router"):
        return "router"
    if _has_name(module, "Embedding"):
        return "embedding"
    if _has_name(module, "Norm"):
        return "norm"
    if any(c.__name__ in LOCAL_GEMM_CLASSES for c in _mro(module)) or _has_name(
            module, "GroupedMLP", "SequentialMLP"):
        return "linear_local"
    return "other"


def _context(names: dict[str, object], name: str) -> tuple[str, object] | None:
    """The innermost enclosing MTP layer or decoder layer of `name` (MTP wins)."""
    parts = name.split(".")
    found = None
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        module = names.get(prefix)
        if module is None:
            continue
        if _is_mtp(module):
            return ("mtp", module)
        if found is None and _is_layer(module):
            found = ("layer", module)
    return found


def _decide(kind: str, module, ctx, config) -> tuple[str, int | None, str]:
    """(precision, global layer, reason) for one module."""
    fp8_on = bool(getattr(config, "fp8", None))
    layer = None
    if ctx is not None and ctx[0] == "layer":
        layer = ctx[1].layer_number - 1
    if kind in ("linear", "grouped_linear"):
        if not fp8_on:
            return BF16, layer, "fp8 is off"
        if ctx is None:
            return BF16, layer, "TE GEMM outside the decoder layers (no FP8 autocast there)"
        if is_bf16_override(module):
            return BF16, layer, "fp8.bf16_modules: per-module BF16 override"
        if ctx[0] == "mtp":
            return FP8, layer, "MTP layer: global FP8 autocast"
        if layer_runs_fp8(config, layer):
            return FP8, layer, f"decoder layer {layer}: FP8 autocast ({config.fp8_recipe})"
        return BF16, layer, f"decoder layer {layer} is one of fp8.bf16_layers_at_start/end"
    if kind == "output_layer":
        fp8_head = is_te_gemm(module) and fp8_on and getattr(config, "fp8_output_proj", False)
        if fp8_head:
            return FP8, layer, "TE LM head with fp8_output_proj (MXFP8)"
        return BF16, layer, "output head: torch GEMM outside the FP8 autocast"
    reasons = {
        "embedding": "embedding lookup, no GEMM",
        "router": "router gating: torch GEMM in "
                  f"{getattr(config, 'moe_router_dtype', None) or 'the parameter dtype'}",
        "norm": "norm: elementwise, computed in BF16/FP32",
        "linear_local": "not a Transformer Engine module: torch GEMM, never FP8",
        "other": "no Transformer Engine GEMM",
    }
    return BF16, layer, reasons[kind]


def fp8_module_report(model_chunks: Iterable, config=None) -> dict:
    """Static report of which modules run FP8 GEMMs.

    `model_chunks`: this rank's chunks (DDP-wrapped or not). `config`: the TransformerConfig
    (default: `chunk.config`). Returns::

        {"fp8": bool, "recipe": str|None,
         "modules": {name: {"kind", "type", "precision", "layer", "reason"}},
         "fp8_modules": [names], "bf16_modules": [names],
         "summary": {kind: {"fp8": n, "bf16": n}}}

    Names are `named_modules()` names of the unwrapped chunk, prefixed `chunk<i>.` when there
    are several chunks. Only modules that own parameters are listed (plus TE GEMMs).
    """
    chunks = [_unwrap(c) for c in model_chunks]
    if config is None:
        config = getattr(chunks[0], "config", None)
    modules: dict[str, dict] = {}
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        names = dict(chunk.named_modules())
        for name, module in names.items():
            if not name or not (_own_params(module) or is_te_gemm(module)):
                continue
            kind = _kind(name, module)
            precision, layer, reason = _decide(kind, module, _context(names, name), config)
            modules[prefix + name] = {
                "kind": kind, "type": type(module).__name__, "precision": precision,
                "layer": layer, "reason": reason,
            }
    summary: dict[str, dict[str, int]] = {}
    for info in modules.values():
        counts = summary.setdefault(info["kind"], {FP8: 0, BF16: 0})
        counts[info["precision"]] += 1
    return {
        "fp8": bool(getattr(config, "fp8", None)),
        "recipe": str(getattr(config, "fp8_recipe", None)) if getattr(config, "fp8", None)
        else None,
        "modules": modules,
        "fp8_modules": [n for n, m in modules.items() if m["precision"] == FP8],
        "bf16_modules": [n for n, m in modules.items() if m["precision"] == BF16],
        "summary": summary,
    }


def format_report(report: dict) -> str:
    """A short text summary: counts per kind, and the non-FP8 decoder GEMMs."""
    lines = [f"FP8 recipe: {report['recipe'] or 'off'}"]
    for kind, counts in sorted(report["summary"].items()):
        lines.append(f"  {kind:<15} fp8 {counts[FP8]:>4}   bf16 {counts[BF16]:>4}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Empirical check (GPU, Transformer Engine)
# ---------------------------------------------------------------------------------------------


def observe_fp8_execution(model_chunks: Iterable, run: Callable[[], object],
                          report: dict | None = None) -> dict[str, dict]:
    """Run `run()` (e.g. a forward-only training step) with hooks on every reported module.

    Returns {name: {"calls": n, "autocast": bool|None, "te_fp8": bool|None}}: `autocast` is
    `FP8GlobalStateManager.is_fp8_enabled()` when the module was entered, `te_fp8` the TE
    module's own `fp8` flag after its forward (what it really used; None for non-TE modules).
    """
    chunks = [_unwrap(c) for c in model_chunks]
    report = report or fp8_module_report(chunks)
    manager = fp8_state_manager()
    observed: dict[str, dict] = {}
    handles = []
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        for name, module in chunk.named_modules():
            full = prefix + name
            if full not in report["modules"]:
                continue
            record = observed.setdefault(full, {"calls": 0, "autocast": None, "te_fp8": None})

            def pre_hook(_mod, _args, record=record):
                record["calls"] += 1
                record["autocast"] = bool(manager.is_fp8_enabled())

            def post_hook(mod, _args, _out, record=record):
                if is_te_module(mod):
                    record["te_fp8"] = bool(getattr(mod, "fp8", False))

            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
    with ExitStack() as stack:
        stack.callback(lambda: [h.remove() for h in handles])
        run()
    return observed


def compare_with_observation(report: dict, observed: dict[str, dict]) -> list[str]:
    """Disagreements between the static report and what ran (empty list: they agree)."""
    problems = []
    for name, info in report["modules"].items():
        seen = observed.get(name)
        if seen is None or not seen["calls"]:
            continue  # not called in this pass (e.g. a tied weight's second owner)
        if seen["te_fp8"] is not None and is_gemm_kind(info["kind"]):
            ran = FP8 if seen["te_fp8"] else BF16
            if ran != info["precision"]:
                problems.append(f"{name}: report says {info['precision']}, TE ran {ran}")
    return problems


def is_gemm_kind(kind: str) -> bool:
    return kind in ("linear", "grouped_linear", "output_layer")
