"""Measure one rank's layer parts on one GPU: the calibration `plan --predict` scales.

    python benchmarks/calibrate_layer.py [--recipe R] [--out FILE] [--precisions bf16,fp8]
    python benchmarks/calibrate_layer.py --tiny --out /tmp/cal.json   # CPU check, tiny shapes

Builds Megatron-Core `TransformerLayer`s from the recipe (`model/build.py`, TE layer specs on
the GPU) with the per-GPU shapes of one expert-parallel rank: the recipe's attention on a
micro-batch, and an MoE layer holding `E = num_experts / ep` local experts whose router
sends every token to all E of them, fed `topk * micro-batch / E` tokens so that each expert
gets the `topk * micro-batch * ep / num_experts` rows it gets in training (DeepSeek-V3:
4 experts x 8192 rows). For each part it times the forward, the backward with the weight
gradients deferred (our zero-bubble split, `schedules/wgrad.py` + `te_wgrad.py`: what a
DualPipe B does) and the deferred weight gradients (a W), in BF16 and in the recipe's FP8:

* `dense_mlp`: pre-MLP norm + dense MLP of a dense layer;
* `attention`: the dense layer's whole forward minus its `dense_mlp` (norm + attention +
  residuals), per pass;
* `moe`: pre-MLP norm + MoE block (router, permutation, experts, shared expert, un-permute);
* `head`: final norm + output layer + cross-entropy (BF16).

The JSON it writes (`calibration.py` documents the format) records the FLOPs of what was
timed, so `plan --predict` can scale the times to other shapes. Everything heavy is imported
inside the functions: `--help` and `--tiny` need no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.portable import command_line, portable  # noqa: E402

V3 = ROOT / "recipes" / "deepseek_v3_671b_ep64_tp1_pp16_h800.yaml"
# --tiny: the recipe's structure at toy sizes, fp32 on the CPU (Megatron-Core 0.19's MLA needs
# CUDA, so multi-head attention).
TINY = ["model.attention=mha", "model.hidden_size=64", "model.ffn_hidden_size=96",
        "model.num_attention_heads=4",
        "model.mla.q_lora_rank=16", "model.mla.kv_lora_rank=8", "model.mla.qk_head_dim=8",
        "model.mla.qk_pos_emb_head_dim=4", "model.mla.v_head_dim=8", "model.vocab_size=256",
        "model.seq_length=32", "model.dtype=fp32", "model.spec=local", "moe.ffn_hidden_size=16",
        "moe.shared_expert_ffn_hidden_size=16", "train.device=cpu", "parallel.backend=gloo",
        "fp8.recipe=none", "fp8.param_gather=false", "fp8.activation_input_store=false",
        "model.recompute_modules=[]"]


def rank_overrides(recipe, precision: str) -> list[str]:
    """One process, one dense and one MoE layer with this rank's local experts, no MTP."""
    p, moe = recipe.parallel, recipe.moe
    local = moe.num_experts // p.ep
    # FP8 primary weights (param_gather) need the distributed optimizer's gather; the GEMMs
    # are the same with TE's cached FP8 weight, so the benchmark keeps BF16 primary weights.
    fp8 = ["fp8.param_gather=false"] + (["fp8.recipe=none", "fp8.activation_input_store=false"]
                                        if precision == "bf16" else [])
    return [
        "model.num_layers=2", "model.num_dense_layers=1", "model.mtp_num_layers=0",
        f"moe.num_experts={local}", f"moe.topk={local}", "moe.num_groups=null",
        "moe.group_topk=null", "moe.seq_aux_loss_coeff=0", "fp8.dispatch=false",
        "parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.schedule=1f1b",
        "parallel.layers_per_stage=null", "parallel.num_nodes=1", "parallel.nproc_per_node=1",
        "parallel.overlap_fb=false", "train.micro_batch_size=1", "train.global_batch_size=1",
        "train.batch_ramp=null", "eplb.enabled=false", *fp8,
    ]


def expert_tokens(recipe) -> int:
    """Tokens to feed the local MoE layer (every token visits all its experts) so that each
    local expert gets the rows it gets in training: `tokens * topk * ep / num_experts`."""
    p, moe = recipe.parallel, recipe.moe
    tokens = recipe.model.seq_length * recipe.train.micro_batch_size
    return max(1, tokens * moe.topk * p.ep // moe.num_experts)


class Timer:
    """Wall time of a callable, synchronizing the GPU around it; median of `iters` runs."""

    def __init__(self, device, warmup: int, iters: int) -> None:
        import torch

        self.torch, self.device, self.warmup, self.iters = torch, device, warmup, iters

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def measure(self, run_once) -> tuple[float, float, float]:
        """`run_once(record)` runs f, b, w and calls record(name) after each: medians (ms)."""
        samples: dict[str, list[float]] = {"f": [], "b": [], "w": []}
        for i in range(self.warmup + self.iters):
            marks = []

            def record(name: str, marks=marks) -> None:
                self.sync()
                marks.append((name, time.perf_counter()))

            self.sync()
            start = time.perf_counter()
            run_once(record)
            if i >= self.warmup:
                prev = start
                for name, t in marks:
                    samples[name].append((t - prev) * 1e3)
                    prev = t
        return tuple(statistics.median(samples[k]) for k in ("f", "b", "w"))


def time_part(timer: Timer, forward, make_input, fp8_context):
    """Forward, split backward (input grads, weight grads deferred) and the deferred W."""
    import torch

    from megatron_dualpipe.schedules.wgrad import WeightGradStore

    def run_once(record) -> None:
        x = make_input()
        with fp8_context():
            out = forward(x)
        record("f")
        with WeightGradStore.collect() as item:
            torch.autograd.backward(out, torch.ones_like(out) if out.dim() == 0 else
                                    torch.randn_like(out))
        record("b")
        WeightGradStore.run(item)
        record("w")

    return timer.measure(run_once)


def measure_precision(recipe_path, base_overrides, precision: str, warmup: int,
                      iters: int) -> tuple[dict, dict]:
    """{part: {f_ms, b_ms, w_ms, f_flops, b_flops, w_flops}} and the machine for one precision."""
    import contextlib

    import torch

    from megatron_dualpipe.distributed import destroy_distributed, init_distributed, resolve_device
    from megatron_dualpipe.model.build import build_model
    from megatron_dualpipe.patches import apply_cpu_patches, enable_deferred_wgrad
    from megatron_dualpipe.plan import load_plan_recipe
    from megatron_dualpipe.planning.predict import flops as FL
    from megatron_dualpipe.schedules.te_wgrad import deferral_for
    from megatron_dualpipe.schedules.wgrad import WeightGradStore

    full = load_plan_recipe(recipe_path, base_overrides)
    recipe = load_plan_recipe(recipe_path, [*base_overrides, *rank_overrides(full, precision)])
    device = resolve_device(recipe)
    if device.type == "cpu":
        apply_cpu_patches()
    init_distributed(recipe, device)
    enable_deferred_wgrad()
    from megatron.core import tensor_parallel

    torch.manual_seed(recipe.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(recipe.train.seed)
    try:
        _, chunks = build_model(recipe, device, wrap_ddp=False)
        chunk = chunks[0]
        WeightGradStore.te = deferral_for(chunks)
        dense, moe_layer = chunk.decoder.layers[0], chunk.decoder.layers[1]
        dtype = torch.bfloat16 if recipe.model.dtype == "bf16" else torch.float32
        h = recipe.model.hidden_size
        tokens = recipe.model.seq_length
        timer = Timer(device, warmup, iters)

        def fp8_context(layer_no: int = 0):
            if precision == "bf16" or device.type != "cuda":
                return contextlib.nullcontext()
            from megatron.core.fp8_utils import get_fp8_context

            return get_fp8_context(dense.config, layer_no)

        def hidden(n: int):
            return lambda: torch.randn(n, 1, h, device=device, dtype=dtype, requires_grad=True)

        def mlp_of(layer):
            return lambda x: layer.mlp(layer.pre_mlp_layernorm(x))[0] + x

        def layer_fwd(x):
            return dense(x, attention_mask=None)[0]

        def head_fwd(x):
            logits, _ = chunk.output_layer(chunk.decoder.final_layernorm(x))
            labels = torch.randint(0, recipe.model.vocab_size, (x.shape[0], 1), device=device)
            return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean()

        n_moe = expert_tokens(full)
        times = {
            "layer": time_part(timer, layer_fwd, hidden(tokens), fp8_context),
            "dense_mlp": time_part(timer, mlp_of(dense), hidden(tokens), fp8_context),
            "moe": time_part(timer, mlp_of(moe_layer), hidden(n_moe), fp8_context),
            "head": time_part(timer, head_fwd, hidden(tokens), contextlib.nullcontext),
        }
    finally:
        WeightGradStore.te = None
        destroy_distributed()
    times["attention"] = tuple(max(0.0, a - b) for a, b in zip(times.pop("layer"),
                                                                times["dense_mlp"]))
    flops = {"attention": (FL.attention(recipe), tokens), "dense_mlp": (FL.dense_mlp(recipe),
                                                                         tokens),
             "moe": (FL.moe(recipe), n_moe), "head": (FL.head(recipe), tokens)}
    out = {}
    for part, (f_ms, b_ms, w_ms) in times.items():
        fl, n = flops[part]
        out[part] = {"f_ms": f_ms, "b_ms": b_ms, "w_ms": w_ms, "f_flops": fl.forward * n,
                     "b_flops": fl.backward_input * n, "w_flops": fl.backward_weight * n}
    return out, machine(device)


def machine(device) -> dict:
    import torch

    info = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except (ImportError, AttributeError):
        pass
    try:
        import transformer_engine

        info["transformer_engine"] = transformer_engine.__version__
    except ImportError:
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(V3))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", required=True, help="calibration JSON to write")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--hardware", default="h200", help="the hardware file this GPU is")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tiny", action="store_true",
                    help="toy shapes in fp32 on the CPU (checks the code path; bf16 entries "
                    "are reused for fp8, which needs a GPU)")
    args = ap.parse_args(argv)
    overrides = [*(TINY if args.tiny else []), *args.overrides]
    precisions = {}
    info = {}
    for prec in args.precisions.split(","):
        if args.tiny and prec == "fp8":
            precisions["fp8"] = precisions.get("bf16") or measure_precision(
                args.recipe, overrides, "bf16", args.warmup, args.iters)[0]
            continue
        precisions[prec], info = measure_precision(args.recipe, overrides, prec, args.warmup,
                                                   args.iters)
    for prec in ("bf16", "fp8"):
        precisions.setdefault(prec, precisions[next(iter(precisions))])
    doc = {
        "source": "measured, tiny CPU check (not a calibration)" if args.tiny else "measured",
        "description": "per-part times of one expert-parallel rank (benchmarks/calibrate_layer.py)",
        "hardware": args.hardware,
        "machine": info,
        "command": command_line(os.path.relpath(__file__, ROOT), sys.argv[1:]),
        "recipe": portable(str(args.recipe)),
        "overrides": overrides,
        "precisions": precisions,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({p: {k: round(v["f_ms"] + v["b_ms"] + v["w_ms"], 3)
                          for k, v in parts.items()} for p, parts in precisions.items()}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
