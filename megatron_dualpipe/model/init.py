"""Layout-independent parameter initialization.

Every parameter is drawn from a generator seeded by the run seed and the parameter's
*global* name (global layer and expert indices), so a model split over any pipeline, expert
or tensor layout starts from exactly the same weights as the unsplit model. Distributions
follow Megatron-Core: normal(0, init_method_std) for weights, scaled by 1/sqrt(2L) for output
projections, ones for norms, zeros for biases.
"""

from __future__ import annotations

import re
import zlib

import torch

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")
_LOCAL_EXPERT = re.compile(r"^(.*experts\.local_experts\.)(\d+)(\..*)$")
_TE_EXPERT = re.compile(r"^(.*experts\.linear_fc[12]\.weight)(\d+)$")
_OUTPUT_PROJ = ("linear_proj.weight", "linear_fc2.weight")
_EMBEDDING = "embedding.word_embeddings.weight"
# MLA's fused q/kv down projection (model.mla_down_proj_fusion) starts as the unfused q and kv
# down projections stacked, so both layouts train from the same weights.
_FUSED_DOWN = "linear_qkv_down_proj.weight"


def global_param_name(chunk, local_name: str, ep_rank: int, num_local_experts: int) -> str:
    """Rename `decoder.layers.<local>` and local expert indices to global indices.

    A tied output head on a chunk without the embedding (a later pipeline stage) is a copy of
    the word embedding and gets its name, as in the unsplit model.
    """
    name = local_name.removeprefix("module.")
    if name == "output_layer.weight" and _is_tied_head_copy(chunk):
        return _EMBEDDING
    match = _LAYER.match(name)
    if match:
        layer = chunk.decoder.layers[int(match.group(2))]
        name = f"{match.group(1)}{layer.layer_number - 1}{match.group(3)}"
    for pattern in (_LOCAL_EXPERT, _TE_EXPERT):
        match = pattern.match(name)
        if match:
            expert = ep_rank * num_local_experts + int(match.group(2))
            expert = _logical_expert(chunk, local_name, expert)  # EPLB replicas
            name = f"{match.group(1)}{expert}{match.group(3) if pattern is _LOCAL_EXPERT else ''}"
    return name


def _is_tied_head_copy(chunk) -> bool:
    return (getattr(chunk, "share_embeddings_and_output_weights", False)
            and not getattr(chunk, "pre_process", True)
            and not getattr(chunk, "mtp_process", False))


# --- EPLB (megatron_dualpipe/eplb): a replica slot starts as a copy of its logical expert ---
def _logical_expert(chunk, local_name: str, slot: int) -> int:
    """The logical expert that physical slot `slot` holds, read from the layer's router
    (`eplb_phy2log`, set by `EPLBRouter`); `slot` itself for any other router."""
    mlp_path = local_name.removeprefix("module.").split(".experts.")[0]
    try:
        router = chunk.get_submodule(mlp_path).router
    except AttributeError:
        return slot
    phy2log = getattr(router, "eplb_phy2log", None)
    return slot if phy2log is None else int(phy2log[slot])
# --- end EPLB ---


def _full_shape(param: torch.Tensor, tp: int) -> tuple[list[int], int | None]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        dim = param.partition_dim
        shape[dim] *= tp
        return shape, dim
    return shape, None


def init_value(name: str, shape: list[int], std: float, num_layers: int, seed: int,
               q_lora_rank: int | None = None):
    """The initial value of global parameter `name`; `q_lora_rank` splits MLA's fused q/kv
    down projection into the unfused parameters it starts from."""
    if name.endswith(_FUSED_DOWN) and q_lora_rank:
        head = name.removesuffix(_FUSED_DOWN)
        q = init_value(f"{head}linear_q_down_proj.weight", [q_lora_rank, *shape[1:]], std,
                       num_layers, seed)
        kv = init_value(f"{head}linear_kv_down_proj.weight", [shape[0] - q_lora_rank,
                        *shape[1:]], std, num_layers, seed)
        return torch.cat([q, kv])
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf in ("weight",) or name.endswith("layer_norm_weight"):
        return torch.ones(shape)
    if leaf.startswith("bias") or name.endswith("expert_bias"):
        return torch.zeros(shape)
    if any(name.endswith(p) for p in _OUTPUT_PROJ) or ".linear_fc2.weight" in name:
        std = std / (2.0 * num_layers) ** 0.5
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def init_chunk(chunk, *, seed: int, std: float, num_layers: int, tp: int, tp_rank: int,
               ep_rank: int, num_local_experts: int) -> None:
    """Overwrite every parameter of `chunk` with its layout-independent initial value."""
    q_lora_rank = getattr(getattr(chunk, "config", None), "q_lora_rank", None)
    for local_name, param in chunk.named_parameters():
        name = global_param_name(chunk, local_name, ep_rank, num_local_experts)
        shape, dim = _full_shape(param, tp)
        value = init_value(name, shape, std, num_layers, seed, q_lora_rank)
        if dim is not None:
            value = value.chunk(tp, dim=dim)[tp_rank]
        param.copy_(value.to(param.dtype))
