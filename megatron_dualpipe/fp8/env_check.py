"""Can this machine run the recipe's FP8? Checked before any process group starts.

Two layers of rules:

* `check_fp8_recipe(recipe)`: rules on the recipe alone (no hardware), in addition to
  `config.validate.check_fp8`; usable by `plan` and unit-tested on CPU.
* `check_fp8_environment(recipe, device)`: Transformer Engine installed and new enough for the
  recipe, a GPU with FP8 (Hopper for blockwise, Blackwell for MXFP8), CUDA new enough. The
  probes (TE version, compute capability, CUDA version) are keyword arguments whose defaults
  read the real environment, so the messages are tested on CPU with injected values.

Both raise one `ValueError` that lists every problem found (one line each) and what is needed.
Nothing here imports Transformer Engine: its version is read from the installed distribution.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from megatron_dualpipe import te
from megatron_dualpipe.errors import UserError

if TYPE_CHECKING:
    import torch

    from megatron_dualpipe.config.schema import Recipe

INSTALL_HINT = "pip install 'megatron_dualpipe[gpu]'"

# Oldest Transformer Engine that Megatron-Core 0.19 accepts for each recipe
# (megatron/core/fp8_utils.get_fp8_recipe; MoE FP8 grouped GEMM needs >= 1.11).
MIN_TE_VERSION = {"delayed": "1.11", "current": "2.2", "blockwise": "2.3", "mxfp8": "2.1"}
# Megatron: FP8 with `layernorm` or `moe_act` recompute needs TE >= 2.6.
MIN_TE_FP8_RECOMPUTE = "2.6"
# Lowest compute capability per recipe (TE's check_*_support): Ada/Hopper for tensor scaling,
# Hopper for 1x128 / 128x128 block scaling, Blackwell for MXFP8.
MIN_CAPABILITY = {"delayed": (8, 9), "current": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
# TE: FP8 block-scaled GEMM needs CUDA >= 12.9; FP8 on Ada needs CUDA >= 12.1.
MIN_CUDA_BLOCKWISE = "12.9"
MIN_CUDA_ADA = "12.1"
# GEMM dims must be multiples of 16 for any FP8 cuBLAS GEMM (128 for blockwise weights is
# checked in config.validate.check_fp8).
FP8_DIM_MULTIPLE = 16

_ARCH = {7: "Volta/Turing", 8: "Ampere", 9: "Hopper", 10: "Blackwell", 11: "Blackwell",
         12: "Blackwell (RTX)"}

_READ = object()  # sentinel: "read the real environment"


# ---------------------------------------------------------------------------------------------
# Probes of the real environment
# ---------------------------------------------------------------------------------------------


def device_capability(device=None) -> tuple[int, int] | None:
    """Compute capability of `device` (default: this process's LOCAL_RANK GPU), None on CPU."""
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index if device is not None else None
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    return tuple(torch.cuda.get_device_capability(index))


def torch_cuda_version() -> str | None:
    """The CUDA version PyTorch was built with (`torch.version.cuda`), None for CPU builds."""
    import torch

    return torch.version.cuda


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _version_tuple(text: str) -> tuple[int, ...]:
    """'2.3.0.dev0+5fdd7bb' -> (2, 3, 0): pre-releases count as their release (as Megatron)."""
    parts = []
    for piece in str(text).split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


def version_at_least(found: str, needed: str) -> bool:
    a, b = _version_tuple(found), _version_tuple(needed)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def _arch_name(capability: tuple[int, int]) -> str:
    if tuple(capability) == (8, 9):
        return "Ada"
    return _ARCH.get(capability[0], f"sm_{capability[0]}{capability[1]}")


def _raise(problems: list[str], header: str) -> None:
    """One UserError: the problem itself, or `header` and one `  - ` line per problem."""
    if not problems:
        return
    if len(problems) == 1:
        raise UserError(problems[0])
    lines = "\n  - ".join(problems)
    raise UserError(f"{header}:\n  - {lines}")


def _needs_fp8_recompute_te(recipe: Recipe) -> bool:
    return bool({"layernorm", "moe_act"} & set(recipe.model.recompute_modules))


# ---------------------------------------------------------------------------------------------
# Recipe-only rules
# ---------------------------------------------------------------------------------------------


def gemm_dims(recipe: Recipe) -> dict[str, int]:
    """Every GEMM dimension that runs in FP8 (decoder layers), by recipe field."""
    m, moe = recipe.model, recipe.moe
    dims = {"model.hidden_size": m.hidden_size, "model.ffn_hidden_size": m.ffn_hidden_size}
    if m.num_layers > m.num_dense_layers:
        dims["moe.ffn_hidden_size"] = moe.ffn_hidden_size
        if moe.shared_expert_ffn_hidden_size:
            dims["moe.shared_expert_ffn_hidden_size"] = moe.shared_expert_ffn_hidden_size
    if m.attention == "mla":
        a = m.mla
        if a.q_lora_rank:
            dims["model.mla.q_lora_rank"] = a.q_lora_rank
        dims["model.mla.kv_lora_rank"] = a.kv_lora_rank
        dims["model.mla.kv_lora_rank + qk_pos_emb_head_dim"] = (
            a.kv_lora_rank + a.qk_pos_emb_head_dim)
        dims["model.num_attention_heads x (qk_head_dim + qk_pos_emb_head_dim)"] = (
            m.num_attention_heads * (a.qk_head_dim + a.qk_pos_emb_head_dim))
        dims["model.num_attention_heads x v_head_dim"] = m.num_attention_heads * a.v_head_dim
    else:
        heads = m.num_attention_heads
        groups = m.num_query_groups or heads
        head_dim = m.hidden_size // heads
        dims["qkv projection (heads + 2 x query groups) x head_dim"] = (
            (heads + 2 * groups) * head_dim)
    return dims


def check_fp8_recipe(recipe: Recipe) -> None:
    """FP8 rules that `config.validate.check_fp8` does not cover (Megatron-Core's and TE's)."""
    f, m, p = recipe.fp8, recipe.model, recipe.parallel
    if f.recipe == "none":
        return
    problems = []
    if f.recipe == "delayed":
        if f.bf16_layers_at_start or f.bf16_layers_at_end:
            problems.append(
                "fp8.bf16_layers_at_start/end need a per-layer recipe (blockwise, current or "
                "mxfp8): delayed scaling keeps one autocast around the whole decoder block")
        if _needs_fp8_recompute_te(recipe):
            problems.append(
                "model.recompute_modules with layernorm or moe_act cannot be combined with "
                "fp8.recipe=delayed (Megatron-Core); use fp8.recipe=blockwise or current")
    per_stage = m.num_layers // p.pp
    for name, value in (("fp8.bf16_layers_at_start", f.bf16_layers_at_start),
                        ("fp8.bf16_layers_at_end", f.bf16_layers_at_end)):
        if value > per_stage:
            problems.append(
                f"{name}={value} exceeds the layers of one pipeline stage "
                f"(model.num_layers / parallel.pp = {per_stage}); Megatron-Core allows "
                f"0..{per_stage}")
    for name, dim in gemm_dims(recipe).items():
        if dim % FP8_DIM_MULTIPLE:
            problems.append(
                f"{name} = {dim} must be a multiple of {FP8_DIM_MULTIPLE} for FP8 GEMMs "
                f"(fp8.recipe={f.recipe})")
    tokens = m.seq_length * recipe.train.micro_batch_size
    if tokens % FP8_DIM_MULTIPLE:
        problems.append(
            f"model.seq_length x train.micro_batch_size = {tokens} tokens per micro-batch must "
            f"be a multiple of {FP8_DIM_MULTIPLE} for FP8 GEMMs")
    _raise(problems, f"fp8.recipe={f.recipe}: the recipe breaks {len(problems)} FP8 rules")


# ---------------------------------------------------------------------------------------------
# Environment rules
# ---------------------------------------------------------------------------------------------


def _resolve_device_type(recipe: Recipe, device) -> str:
    if device is not None:
        import torch

        return torch.device(device).type
    want = recipe.train.device
    if want != "auto":
        return want
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fp8_environment_problems(
    recipe: Recipe,
    device: torch.device | str | None = None,
    *,
    te_version=_READ,
    capability=_READ,
    cuda_version=_READ,
) -> list[str]:
    """Everything that stops `recipe.fp8` on this machine, one sentence each ([] if it runs).

    `te_version` (str, None = not installed), `capability` ((major, minor), None = no GPU) and
    `cuda_version` (str, None = CPU build of PyTorch) default to the real environment.
    """
    r = recipe.fp8.recipe
    if r == "none":
        return []
    problems = []
    device_type = _resolve_device_type(recipe, device)
    if capability is _READ:
        capability = device_capability(device) if device_type == "cuda" else None
    if te_version is _READ:
        te_version = te.te_version()
    if cuda_version is _READ:
        cuda_version = torch_cuda_version()
    need_cap = MIN_CAPABILITY[r]

    if device_type != "cuda" or capability is None:
        if device_type != "cuda":
            why = "train.device is cpu" if recipe.train.device == "cpu" else "the device is cpu"
        else:
            why = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        problems.append(
            f"fp8.recipe={r} needs a CUDA GPU (compute capability >= "
            f"{need_cap[0]}.{need_cap[1]}), but {why}; use fp8.recipe=none on CPU")

    need_te = MIN_TE_VERSION[r]
    if _needs_fp8_recompute_te(recipe) and version_at_least(MIN_TE_FP8_RECOMPUTE, need_te):
        need_te = MIN_TE_FP8_RECOMPUTE
    if te_version is None:
        problems.append(
            f"fp8.recipe={r} needs Transformer Engine >= {need_te} ({INSTALL_HINT}); "
            "it is not installed")
    elif not version_at_least(te_version, need_te):
        why = (" (FP8 with layernorm/moe_act recompute)" if need_te == MIN_TE_FP8_RECOMPUTE
               else "")
        problems.append(
            f"fp8.recipe={r} needs Transformer Engine >= {need_te}{why}; found {te_version} "
            f"({INSTALL_HINT} to upgrade)")

    if capability is not None:
        cap = tuple(capability)
        have = f"{_arch_name(cap)}, compute capability {cap[0]}.{cap[1]}"
        if cap < (8, 9):
            problems.append(
                f"fp8.recipe={r} needs a GPU with FP8 tensor cores (compute capability >= 8.9: "
                f"Ada, Hopper or Blackwell); this GPU is {have}; use fp8.recipe=none")
        elif r == "blockwise" and cap < (9, 0):
            problems.append(
                f"fp8.recipe=blockwise needs a Hopper GPU (compute capability 9.0, e.g. "
                f"H100/H800/H200) for 1x128/128x128 block-scaled GEMMs; this GPU is {have}; "
                "use fp8.recipe=current or delayed")
        elif r == "mxfp8" and not (10, 0) <= cap < (12, 0):
            problems.append(
                f"fp8.recipe=mxfp8 needs a Blackwell data-center GPU (compute capability 10.x, "
                f"e.g. B200/GB200); this GPU is {have}; use fp8.recipe=blockwise on Hopper")
        if cuda_version is None:
            problems.append(
                f"fp8.recipe={r} needs a CUDA build of PyTorch; torch.version.cuda is None")
        elif r == "blockwise" and not version_at_least(cuda_version, MIN_CUDA_BLOCKWISE):
            problems.append(
                f"fp8.recipe=blockwise needs CUDA >= {MIN_CUDA_BLOCKWISE} (PyTorch built with "
                f"CUDA {cuda_version}); install a PyTorch/TE build for CUDA >= "
                f"{MIN_CUDA_BLOCKWISE}")
        elif cap == (8, 9) and not version_at_least(cuda_version, MIN_CUDA_ADA):
            problems.append(
                f"fp8.recipe={r} on Ada needs CUDA >= {MIN_CUDA_ADA}; PyTorch was built with "
                f"CUDA {cuda_version}")
    return problems


def check_fp8_environment(
    recipe: Recipe,
    device: torch.device | str | None = None,
    *,
    te_version=_READ,
    capability=_READ,
    cuda_version=_READ,
) -> None:
    """Raise one `ValueError` naming what is needed if `recipe.fp8` cannot run here.

    Call it before `init_distributed` (it starts no process group and never imports TE); `plan`
    does not call it. See `fp8_environment_problems` for the probe arguments.
    """
    problems = fp8_environment_problems(
        recipe, device, te_version=te_version, capability=capability, cuda_version=cuda_version)
    _raise(problems, f"fp8.recipe={recipe.fp8.recipe} cannot run here")


def fp8_environment_variables(recipe: Recipe) -> dict[str, str]:
    """Process environment that `recipe.fp8` asks Transformer Engine for (set before building
    the model): `fp8.grouped_gemm_fused` selects TE's single-launch grouped GEMM for the experts.

    TE >= 2.17 reads NVTE_GROUPED_LINEAR_USE_FUSED_GROUPED_GEMM when a GroupedLinear is built
    (deprecated in 2.19 for `use_grouped_tensor=`); on Hopper it needs cuBLASLt >= 13.6 for
    blockwise and otherwise falls back to the per-expert path. See docs/fp8.md.
    """
    env = {}
    if recipe.fp8.grouped_gemm_fused:
        env["NVTE_GROUPED_LINEAR_USE_FUSED_GROUPED_GEMM"] = "1"
    return env
