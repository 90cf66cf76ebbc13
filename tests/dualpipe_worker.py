"""Worker for the schedule exactness tests (imported by spawned gloo processes)."""

from __future__ import annotations

from functools import partial

import torch


def tagged_forward_step(log: list, data_iterator, model):
    """`train.forward_step`, also recording each micro-batch's loss under its (dp, mb) id."""
    from megatron_dualpipe.train import loss_func

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])

    def tagged_loss(output_tensor):
        result = loss_func(batch["loss_mask"], output_tensor)
        pair = result[2]["lm loss"]
        log.append((batch["microbatch"], float(pair[0] / pair[1])))
        return result

    return output, tagged_loss


def global_grads(state) -> dict[str, torch.Tensor]:
    """Every parameter's (DP-reduced) gradient by global name, from this rank's chunks."""
    from megatron.core import parallel_state

    from megatron_dualpipe.config import num_physical_experts
    from megatron_dualpipe.model.init import global_param_name

    ep = state.recipe.parallel.ep
    grads = {}
    for chunk in state.model:
        module = chunk.module
        for name, param in module.named_parameters():
            gname = global_param_name(
                module, name, parallel_state.get_expert_model_parallel_rank(),
                num_physical_experts(state.recipe) // ep,
            )
            grad = param.main_grad if getattr(param, "main_grad", None) is not None else param.grad
            grads[gname] = grad.detach().clone().double()
    return grads


def run_steps(overrides: list[str], num_steps: int, config_fields: dict | None = None) -> dict:
    """One forward-only step, then `num_steps` training steps on the tiny recipe; per-call
    micro-batch losses, the first step's final gradients, and how many weight GEMMs were
    deferred. `config_fields` overrides TransformerConfig fields the recipe does not map."""
    import torch.distributed as dist

    if config_fields:
        from megatron_dualpipe.config import to_megatron

        mapped = to_megatron.transformer_config_kwargs
        to_megatron.transformer_config_kwargs = lambda *a: {**mapped(*a), **config_fields}

    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.data import make_source
    from megatron_dualpipe.distributed import destroy_distributed
    from megatron_dualpipe.hooks import TrainHook
    from megatron_dualpipe.schedules.wgrad import WeightGradStore
    from megatron_dualpipe.train import _dp_rank, setup, train_step

    recipe = load_recipe("recipes/tiny_moe_cpu.yaml", [
        "parallel.distributed_optimizer=false", "optimizer.lr_warmup_steps=0", *overrides,
    ])
    state = setup(recipe)
    source = make_source(recipe, _dp_rank(), state.device)
    captured = {}

    class FirstGrads(TrainHook):  # the gradients of the first training step
        def on_grads_ready(self, st):
            if "grads" not in captured:
                captured["grads"] = global_grads(st)

    state.hooks.append(FirstGrads())
    steps = []
    for call in range(num_steps + 1):
        log: list = []
        # Call 0 is forward-only (evaluation) on the initial weights, on step 0's data.
        step = max(call - 1, 0)
        record = train_step(state, source, step, forward_only=call == 0,
                            forward_step_func=partial(tagged_forward_step, log))
        steps.append({"loss": record["loss"], "microbatch_losses": log})
    out = {"rank": dist.get_rank(), "steps": steps, "grads": captured.get("grads", {}),
           "num_deferred": WeightGradStore.num_deferred}
    destroy_distributed()
    return out
