"""`python -m benchmarks.fp8.deepgemm_speed`: `benchmarks.speed` with three more system
modifiers: that system's routed experts (TEGroupedMLP's linear_fc1 / linear_fc2) run their
blockwise FP8 GEMMs on DeepGEMM (megatron_dualpipe/fp8/deepgemm), quantizing activations with
TE's fused kernel (`+deepgemm`), with TE's kernel for the GEMM operand and plain torch ops for
the wgrad operand (`+deepgemm-terows`), or with plain torch ops only (`+deepgemm-torchq`,
slow); the last two are fall-backs should TE's columnwise layout not be what the code expects.
BF16 steps stay on TE.

    export PYTHONPATH=$PWD:${DEEPGEMM_DIR:-$HOME/deepgemm}/DeepGEMM
    python -m benchmarks.fp8.deepgemm_speed \\
        --systems ours_1f1b+padcap+gaf,ours_1f1b+padcap+gaf+deepgemm --precisions bf16,fp8 \\
        --layers 2 --warmup-steps 4 --rounds 5 --steps-per-round 2 --profile \\
        --json speed_deepgemm.json

Experimental, until model/build.py has `fp8.gemm_backend: deepgemm`: while a `+deepgemm`
system is built, `megatron_dualpipe.model.build.layer_specs` is wrapped so that every chunk's
layer specs go through `deepgemm_expert_spec`. Other options as `benchmarks.speed`, except
`--write-docs` (its docs section describes the default path).
"""

from __future__ import annotations

import sys

QUANTIZER = {"deepgemm": None, "deepgemm-terows": "te-rows",  # modifier -> quantizer
             "deepgemm-torchq": "torch"}


def _deepgemm_build(build):
    """`benchmarks.speed`'s `build`, building `+deepgemm` systems with DeepGEMM experts."""

    def wrapped(args, name: str, device):
        base, *modifiers = name.split("+")
        chosen = [m for m in modifiers if m in QUANTIZER]
        if not chosen:
            return build(args, name, device)
        import megatron_dualpipe.model.build as model_build
        from megatron_dualpipe.fp8.deepgemm import deepgemm_expert_spec

        original = model_build.layer_specs

        def layer_specs(*a, **kw):
            block, mtp = original(*a, **kw)
            quantizer = QUANTIZER[chosen[-1]]
            swapped = (deepgemm_expert_spec(block, quantizer)
                       + deepgemm_expert_spec(mtp, quantizer))
            if not swapped:
                raise SystemExit(f"--systems {name}: no TEGroupedMLP experts to put on DeepGEMM "
                                 "(needs model.spec te and moe.grouped_gemm true)")
            return block, mtp

        model_build.layer_specs = layer_specs
        try:
            system = build(args, "+".join([base, *(m for m in modifiers if m not in QUANTIZER)]),
                           device)
        finally:
            model_build.layer_specs = original
        system.name = name
        return system

    return wrapped


def main(argv=None) -> int:
    from benchmarks.speed import __main__ as speed

    argv = sys.argv[1:] if argv is None else argv
    if "--write-docs" in argv:
        raise SystemExit("--write-docs: not with DeepGEMM experts (experimental)")
    speed.build = _deepgemm_build(speed.build)
    return speed.main(argv)


if __name__ == "__main__":
    sys.exit(main())
