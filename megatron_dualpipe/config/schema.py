"""Typed recipe schema: the sections of a YAML recipe and their defaults.

Field-level rules (types, ranges, allowed values) live here; rules that involve several
fields are in `validate.py`. Unknown keys are errors.
"""

from __future__ import annotations

import types
import typing
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from megatron_dualpipe.schedules.spec import TRAIN_SCHEDULES

Schedule = Literal[TRAIN_SCHEDULES]
FP8Recipe = Literal["none", "blockwise", "delayed", "current", "mxfp8"]


# Upper bounds far above any real model (DeepSeek-V3: 61 layers, 256 experts, 2048 GPUs): a
# typo like 1e12 is one message here, not an out-of-memory kill or an endless check.
MAX_LAYERS = 4096
MAX_EXPERTS = 1 << 20
MAX_RANKS = 1 << 16
MAX_PROCS_PER_NODE = 1024

_KIND = {int: "an integer", float: "a number", bool: "true or false"}


def _scalar_type(annotation) -> type | None:
    """int, float or bool for `X` and `Optional[X]` annotations, else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in _KIND else None


def _yaml_repr(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)[:40]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value, info: ValidationInfo):
        """Numbers and booleans as YAML writes them: `steps: true` or `lr: "1e-3"` are errors
        (pydantic's lax mode would read them as 1 and 0.001)."""
        kind = _scalar_type(cls.model_fields[info.field_name].annotation)
        if kind is None or value is None:
            return value
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"expected {_KIND[kind]}, got {_yaml_repr(value)}")
        return value


class MLAConfig(Section):
    """Multi-head latent attention sizes (DeepSeek-V2/V3)."""

    q_lora_rank: Optional[int] = Field(1536, ge=1)
    kv_lora_rank: int = Field(512, ge=1)
    qk_head_dim: int = Field(128, ge=1)
    qk_pos_emb_head_dim: int = Field(64, ge=1)
    v_head_dim: int = Field(128, ge=1)


class ModelConfig(Section):
    num_layers: int = Field(4, ge=1, le=MAX_LAYERS)
    num_dense_layers: int = Field(1, ge=0, le=MAX_LAYERS,
                                  description="leading dense (non-MoE) layers")
    hidden_size: int = Field(64, ge=1)
    ffn_hidden_size: int = Field(128, ge=1, description="FFN size of the dense layers")
    num_attention_heads: int = Field(4, ge=1)
    num_query_groups: Optional[int] = Field(None, ge=1)
    attention: Literal["mha", "mla"] = "mha"
    mla: MLAConfig = Field(default_factory=MLAConfig)
    vocab_size: int = Field(256, ge=2)
    seq_length: int = Field(32, ge=1)
    mtp_num_layers: int = Field(0, ge=0, le=MAX_LAYERS)
    mtp_loss_scaling_factor: float = Field(0.1, ge=0)
    init_method_std: float = Field(0.02, gt=0)
    rotary_base: int = Field(10000, ge=1)
    norm_epsilon: float = Field(1e-6, gt=0)
    dtype: Literal["fp32", "bf16"] = "fp32"
    untie_embeddings: bool = True
    spec: Literal["auto", "local", "te"] = Field(
        "auto", description="layer implementation: Transformer Engine on GPU, local on CPU"
    )
    recompute_modules: list[
        Literal["core_attn", "layernorm", "mla_up_proj", "mlp", "moe_act", "moe", "shared_experts"]
    ] = Field(
        default_factory=list,
        description="selective activation recomputation (Megatron recompute_modules); "
        "[]: none. DeepSeek-V3 recomputes layernorm, mla_up_proj and the MoE SwiGLU (moe_act)",
    )
    mla_down_proj_fusion: bool = Field(
        False,
        description="MLA: the q and kv down projections as one GEMM (7168 -> 1536 + 576 in "
        "V3), which on GPU also holds the input RMSNorm (Megatron mla_down_proj_fusion; "
        "checkpoints then hold linear_qkv_down_proj); needs model.attention=mla and "
        "model.mla.q_lora_rank",
    )
    rope_fusion: bool = Field(
        False, description="GPU: fused RoPE kernels (Megatron apply_rope_fusion); ignored on CPU"
    )
    cross_entropy_fusion: bool = Field(
        False,
        description="GPU: fused vocab-parallel cross-entropy (Megatron "
        "cross_entropy_loss_fusion, Transformer Engine's kernel); ignored on CPU",
    )
    gradient_accumulation_fusion: bool = Field(
        False,
        description="GPU: Transformer Engine GEMMs accumulate weight gradients straight into "
        "the FP32 main_grad (TE's fuse_wgrad_accumulation; Megatron's own linears, i.e. the "
        "output head, keep the separate add, so apex is not needed); ignored on CPU",
    )
    cuda_graphs: Literal["none", "local"] = Field(
        "none",
        description="GPU: capture the decoder layers' forward and backward in CUDA graphs "
        "(Megatron-Core's cuda_graph_impl=local, after cuda_graph_warmup_steps eager steps), so "
        "the host launches one graph where it launched every kernel; needs Megatron's own "
        "schedules (parallel.schedule 1f1b or interleaved) and MoE layers without host syncs "
        "(moe.capacity_factor with moe.pad_to_capacity); MLA's fused rope inside them gets a "
        "copy of its rope cache (patch rope_cache_copy); experimental (docs/fp8.md)",
    )
    cuda_graph_modules: list[Literal["attn", "mlp", "moe", "moe_router", "moe_preprocess"]] = (
        Field(default_factory=list,
              description="with cuda_graphs: what each layer's graphs hold (Megatron "
              "cuda_graph_modules); []: the whole layer"))
    mtp_loss_scaling_schedule: list[tuple[float, float]] = Field(
        default_factory=list,
        description="[[from_tokens, factor], ...]: mtp_loss_scaling_factor becomes factor once "
        "from_tokens training tokens are consumed (DeepSeek-V3: 0.3, then 0.1 from 10T)",
    )


class MoEConfig(Section):
    num_experts: int = Field(8, ge=1, le=MAX_EXPERTS)
    topk: int = Field(2, ge=1)
    ffn_hidden_size: int = Field(32, ge=1)
    shared_expert_ffn_hidden_size: int = Field(32, ge=0, description="0 disables it")
    num_groups: Optional[int] = Field(None, ge=1, description="expert groups (node-limited)")
    group_topk: Optional[int] = Field(None, ge=1)
    score_function: Literal["softmax", "sigmoid"] = "sigmoid"
    topk_scaling_factor: Optional[float] = Field(None, gt=0)
    expert_bias: bool = Field(True, description="aux-loss-free load-balancing bias")
    bias_update_rate: float = Field(1e-3, ge=0)
    seq_aux_loss_coeff: float = Field(0.0, ge=0)
    token_dispatcher: Literal["alltoall", "allgather", "deepep"] = Field(
        "alltoall",
        description="alltoall (NCCL), allgather, or deepep (Megatron's flex dispatcher with "
        "DeepEP's kernels; BF16, GPUs, EP group of 2/4/8 on one node; config/dispatcher.py)",
    )
    grouped_gemm: bool = False
    capacity_factor: Optional[float] = Field(
        None, gt=0,
        description="expert capacity as a multiple of the balanced load (Megatron "
        "moe_expert_capacity_factor); None: no token dropping, as DeepSeek-V3 trains",
    )
    pad_to_capacity: bool = Field(
        False,
        description="pad every expert's input to its capacity (Megatron "
        "moe_pad_expert_input_to_capacity): all-to-all sizes known without a device-to-host "
        "sync; needs capacity_factor",
    )
    router_dtype: Literal["fp32", "fp64"] = "fp32"
    router_fusion: bool = Field(
        False,
        description="GPU: Transformer Engine's fused top-k/score kernel in the router (Megatron "
        "moe_router_fusion); ignored on CPU",
    )
    permute_fusion: bool = Field(
        False,
        description="GPU: Transformer Engine's fused token permute/unpermute (Megatron "
        "moe_permute_fusion); ignored on CPU",
    )
    router_bias_init: float = Field(
        0.0, description="skew for tests/benchmarks: router logits of expert e get +e*value "
        "(needs eplb.enabled)"
    )
    bias_update_rate_schedule: list[tuple[float, float]] = Field(
        default_factory=list,
        description="[[from_tokens, rate], ...]: bias_update_rate becomes rate once from_tokens "
        "training tokens are consumed (DeepSeek-V3: 0.001, then 0 from 14.3T)",
    )


class ParallelConfig(Section):
    tp: int = Field(1, ge=1, le=MAX_RANKS)
    pp: int = Field(1, ge=1, le=MAX_RANKS)
    ep: int = Field(1, ge=1, le=MAX_RANKS)
    vpp: Optional[int] = Field(None, ge=2, le=MAX_LAYERS,
                               description="model chunks per rank, interleaved")
    schedule: Schedule = "1f1b"
    num_nodes: int = Field(1, ge=1, le=MAX_RANKS)
    nproc_per_node: Optional[int] = Field(None, ge=1, le=MAX_PROCS_PER_NODE,
                                          description="default: tp*pp*ep")
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    zero_bubble: bool = Field(
        True, description="split weight grads (DualPipe W phases); used where pp > 1")
    overlap_fb: bool = Field(
        True, description="overlapped forward+backward chunk; used on GPU where ep > 1")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    layers_per_stage: list[int] | None = Field(
        None,
        description="explicit decoder layers per pipeline stage (uneven split; see "
        "config/stage_split.py); None: even split",
    )


class FP8Config(Section):
    recipe: FP8Recipe = "none"
    format: Literal["e4m3", "hybrid"] = "e4m3"
    param_gather: bool = False
    bf16_layers_at_start: int = Field(0, ge=0, le=MAX_LAYERS)
    bf16_layers_at_end: int = Field(0, ge=0, le=MAX_LAYERS)
    dispatch: bool = False
    grouped_gemm_fused: bool = False
    activation_input_store: bool = Field(
        False,
        description="keep the SwiGLU input for the backward in FP8 (Megatron "
        "activation_func_fp8_input_store; DeepSeek-V3 §3.3.3)",
    )
    expert_gemm: Literal["te", "deepgemm"] = Field(
        "te",
        description="the routed experts' blockwise FP8 GEMMs: te (Transformer Engine) or "
        "deepgemm (DeepSeek's DeepGEMM, built from source; experimental: on one H200 it is "
        "not yet faster than te, docs/fp8.md; config/expert_gemm.py)",
    )
    deepgemm_quantizer: Literal["te", "te-rows", "torch", "triton"] = Field(
        "te",
        description="with expert_gemm=deepgemm: the activation quantize kernels (te: TE's "
        "fused kernel; te-rows: TE for the GEMM operand, torch for the wgrad operand; torch; "
        "triton: one Triton kernel for both operands, bit for bit the torch path, 1.5x the "
        "te route's speed on the H200)",
    )
    bf16_modules: list[str] = Field(
        default_factory=list,
        description="glob patterns on module names inside a model chunk (e.g. "
        "'*self_attention.linear_q_down_proj') whose Transformer Engine GEMMs stay BF16 "
        "(megatron_dualpipe/fp8/overrides.py)",
    )


class EPLBConfig(Section):
    enabled: bool = False
    num_redundant_experts: int = Field(0, ge=0, le=MAX_EXPERTS)
    policy: Literal["auto", "hierarchical", "global"] = "auto"
    window: int = Field(100, ge=1)
    window_kind: Literal["sliding", "ema"] = "sliding"
    interval: int = Field(100, ge=1)
    migration_aware: bool = True
    min_gain: float = Field(0.01, ge=0)


class OptimizerConfig(Section):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0, description="0 disables clipping")
    moment_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Adam m and v dtype (bf16: Megatron's precision-aware optimizer)"
    )
    lr_schedule_tokens: list[tuple[float, float, Literal["constant", "linear", "cosine"]]] = Field(
        default_factory=list,
        description="token-based phases after warm-up, [[until_tokens, lr_at_end, shape], ...]; "
        "when set it replaces lr_decay_style/min_lr",
    )


class DataConfig(Section):
    kind: Literal["synthetic", "indexed"] = "synthetic"
    path: Optional[str | list[str | float]] = Field(
        None,
        description="indexed data: a .bin/.idx prefix (from `data prepare`), or a blend as in "
        "Megatron's --data-path: [prefix, ...] or [weight, prefix, weight, prefix, ...]",
    )
    split: str = Field(
        "969,30,1", pattern=r"^\s*\d+(\.\d+)?(\s*,\s*\d+(\.\d+)?){0,2}\s*$",
        description='indexed data: train,validation,test weights of the documents ("969,30,1")',
    )
    seed: int = 1234


class TrainConfig(Section):
    steps: int = Field(40, ge=1)
    micro_batch_size: int = Field(2, ge=1)
    global_batch_size: int = Field(8, ge=1)
    seed: int = 1234
    log_dir: str = "runs/default"
    ckpt_dir: Optional[str] = None
    save_interval: int = Field(0, ge=0, description="steps between checkpoints; 0: at the end")
    resume: bool = True
    log_interval: int = Field(1, ge=1)
    eval_interval: int = Field(
        0, ge=0, description="steps between validation passes (and one at the end); 0: only "
        "at the end"
    )
    eval_iters: int = Field(
        0, ge=0, description="global batches per validation pass (the same ones each time); "
        "0: no validation"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensorboard: bool = False
    deterministic: bool = True
    batch_ramp: tuple[int, int, int] | None = Field(
        None,
        description="[start, end, ramp_samples]: global batch grows linearly from start to end "
        "(= global_batch_size) over ramp_samples samples (Megatron rampup_batch_size)",
    )
    profile_steps: Optional[str] = Field(  # [overlap] profiler window, see profiling.py
        None,
        pattern=r"^\s*\d+\s*:\s*\d+\s*$",
        description='"a:b": PyTorch profiler Chrome traces of steps a..b-1 in '
        "<log_dir>/traces/rank<r>.json (quote it in YAML: \"2:4\")",
    )


class Recipe(Section):
    """A whole recipe. `include:` is resolved before validation (see `load.py`)."""

    name: str = "recipe"
    description: str = Field("", description="one line for `python -m megatron_dualpipe recipes`")
    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    fp8: FP8Config = Field(default_factory=FP8Config)
    eplb: EPLBConfig = Field(default_factory=EPLBConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
