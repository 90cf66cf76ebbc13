"""The systems `benchmarks.speed` compares, each built once and stepped on shared batches.

- `MegatronCore`: plain Megatron-Core. Its own `get_gpt_decoder_block_spec` + `GPTModel`,
  `DistributedDataParallel`, `get_megatron_optimizer` and `get_forward_backward_func` (1F1B).
  Only the TransformerConfig/OptimizerConfig *values* come from the recipe mapping, so the model
  is the same one; no plugin module runs during its steps.
- `Ours`: `megatron_dualpipe.train.setup` + `train_step`, as `train` runs them, with the
  recipe's schedule (1f1b, or dualpipev at PP=1).

Precision: every system is built with the recipe's FP8 settings; a BF16 step runs the same
model objects with `config.fp8 = None` (Megatron-Core and Transformer Engine read it at every
forward), so BF16 and FP8 share weights and memory and alternate in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch


@dataclass
class CachedBatches:
    """Micro-batches made once (on the device) and served by step, cycling over `num_steps`.

    Quacks like `megatron_dualpipe.data.MicrobatchSource` for `train_step`."""

    batches: list  # [step][micro-batch] -> dict of tensors
    num_microbatches: int

    @classmethod
    def from_recipe(cls, recipe, device, num_steps: int = 2) -> "CachedBatches":
        from megatron_dualpipe.data import make_source

        source = make_source(recipe, 0, device)
        batches = [[source.batch(s, m) for m in range(source.num_microbatches)]
                   for s in range(num_steps)]
        return cls(batches, source.num_microbatches)

    def iterator(self, step: int, microbatches=None):
        chosen = self.batches[step % len(self.batches)]
        for m in microbatches if microbatches is not None else range(self.num_microbatches):
            yield chosen[m]

    def iterators(self, step: int, num_chunks: int):
        """The `data_iterator` of a forward_backward_func: one, or one per model chunk."""
        if num_chunks == 1:
            return self.iterator(step)
        return [self.iterator(step) for _ in range(num_chunks)]


def transformer_configs(chunks) -> list:
    """Every distinct TransformerConfig object reachable from the model chunks."""
    from megatron.core.transformer import TransformerConfig

    found = {}
    for chunk in chunks:
        for module in chunk.modules():
            config = getattr(module, "config", None)
            if isinstance(config, TransformerConfig):
                found[id(config)] = config
    return list(found.values())


# The FP8 router padding each config was built with (`config/to_megatron.py` decides it from
# the recipe), kept while BF16 steps turn it off.
_BUILT_ROUTER_PADDING: dict[int, bool] = {}


def set_fp8(chunks, fp8_format: str | None) -> None:
    """Run the chunks in FP8 (`fp8_format`, e.g. "e4m3") or BF16 (None) from the next step."""
    for config in transformer_configs(chunks):
        config.fp8 = fp8_format
        if config.num_moe_experts:
            built = _BUILT_ROUTER_PADDING.setdefault(
                id(config), bool(config.moe_router_padding_for_quantization))
            config.moe_router_padding_for_quantization = fp8_format is not None and built


def set_bf16_modules(chunks, patterns) -> list[str]:
    """Keep the TE GEMMs matching `patterns` in BF16 under FP8 from the next step, every other
    TE GEMM back to the FP8 context (`fp8.bf16_modules` as `build_model` applies it, undone and
    redone on the built model); returns the names kept in BF16."""
    from megatron_dualpipe.fp8.overrides import apply_bf16_modules, matching_modules

    names = []
    for chunk in chunks:
        for _, module in matching_modules(chunk, ["*"]):
            module.finish_init(None)
        names += apply_bf16_modules(chunk, patterns)
    return names


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class MegatronCore:
    """Plain Megatron-Core, built and stepped the way its own examples do."""

    name = "mcore_1f1b"

    def __init__(self, recipe, device):
        from megatron.core.distributed import (
            DistributedDataParallel,
            finalize_model_grads,
        )
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_dualpipe.config.to_megatron import (
            ddp_config,
            optimizer_config,
            transformer_config,
        )

        self.recipe, self.device = recipe, device
        m = recipe.model
        config = transformer_config(recipe, device)
        use_te = device.type == "cuda"
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                          normalization="RMSNorm")
        model = GPTModel(config, spec, vocab_size=m.vocab_size,
                         max_sequence_length=m.seq_length, pre_process=True, post_process=True,
                         share_embeddings_and_output_weights=not m.untie_embeddings,
                         position_embedding_type="rope", rotary_base=m.rotary_base)
        model = DistributedDataParallel(config, ddp_config(recipe), model.to(device))
        self.model = [model]
        self.optimizer = get_megatron_optimizer(optimizer_config(recipe), self.model)
        config.finalize_model_grads_func = finalize_model_grads
        self.config = config
        self.forward_backward = get_forward_backward_func()

    def set_precision(self, fp8_format: str | None, bf16_patterns=()) -> None:
        """BF16 or FP8 for the next steps; plain Megatron-Core has no per-module override."""
        if bf16_patterns:
            raise ValueError("plain Megatron-Core runs every TE GEMM in the FP8 context")
        set_fp8(self.model, fp8_format)

    @staticmethod
    def _loss(loss_mask, output):
        losses = output.float().view(-1)
        mask = loss_mask.view(-1).float()
        loss = (losses * mask).sum()
        return loss, mask.sum().to(torch.int), {"lm loss": torch.stack([loss.detach(), mask.sum()])}

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       loss_mask=batch["loss_mask"])
        return output, partial(self._loss, batch["loss_mask"])

    def step(self, batches: CachedBatches, step: int) -> dict:
        _sync(self.device)
        start = time.perf_counter()
        self.model[0].zero_grad_buffer()
        self.optimizer.zero_grad()
        store = self.forward_backward(
            forward_step_func=self._forward_step, data_iterator=batches.iterator(step),
            model=self.model, num_microbatches=batches.num_microbatches,
            seq_length=self.recipe.model.seq_length,
            micro_batch_size=self.recipe.train.micro_batch_size, forward_only=False)
        self.optimizer.step()
        pair = sum(o["lm loss"].double() for o in store)
        loss = float(pair[0] / pair[1])  # one device-to-host copy, as ours does
        _sync(self.device)
        return {"loss": loss, "step_time_s": time.perf_counter() - start}


class Ours:
    """megatron_dualpipe's training step (`train.setup` + `train.train_step`)."""

    def __init__(self, recipe, device):
        from megatron_dualpipe import train

        self.recipe, self.device = recipe, device
        self.name = f"ours_{recipe.parallel.schedule}"
        self._train = train
        self.state = train.setup(recipe)
        self.model = self.state.model

    def set_precision(self, fp8_format: str | None, bf16_patterns=None) -> None:
        """BF16 or FP8 for the next steps; under FP8 the TE GEMMs matching `bf16_patterns`
        (default: the recipe's `fp8.bf16_modules`) stay BF16."""
        set_fp8(self.model, fp8_format)
        if bf16_patterns is None:
            bf16_patterns = self.recipe.fp8.bf16_modules
        set_bf16_modules(self.model, bf16_patterns)

    def step(self, batches: CachedBatches, step: int) -> dict:
        _sync(self.device)
        start = time.perf_counter()
        record = self._train.train_step(self.state, batches, step)
        _sync(self.device)
        return {"loss": record["loss"], "step_time_s": time.perf_counter() - start}
