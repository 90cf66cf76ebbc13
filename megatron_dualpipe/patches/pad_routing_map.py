"""Pad a copy of the routing map, not the router's own tensor (GPU, fused router + FP8).

Target: `megatron.core.transformer.moe.token_dispatcher.pad_routing_map`, which the alltoall
dispatcher calls when `moe_router_padding_for_quantization` is on (our FP8 recipes). Megatron
0.19's version writes the padding into its argument (`routing_map[mask] = 1`). With
`moe_router_fusion`, that argument is a tensor Transformer Engine's fused top-k saved for its
backward, so the backward fails ("modified by an inplace operation"). The replacement pads a
copy; the result is the same.
"""

from __future__ import annotations

from megatron_dualpipe.patches.base import Patch


def _make(original):
    def pad_routing_map(routing_map, pad_multiple):
        return original(routing_map.clone(), pad_multiple)

    return pad_routing_map


def make_patch() -> Patch:
    return Patch(
        name="pad_routing_map",
        module="megatron.core.transformer.moe.token_dispatcher",
        replacements={"pad_routing_map": _make},
    )
