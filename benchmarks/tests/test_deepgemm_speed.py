"""benchmarks.fp8.deepgemm_speed on CPU: `+deepgemm` systems get DeepGEMM experts while they
are built (the modifier stripped for benchmarks.speed), other systems and later builds not."""

from __future__ import annotations

from types import SimpleNamespace

from megatron.core.transformer.moe.experts import GroupedMLPSubmodules

import megatron_dualpipe.model.build as model_build
from benchmarks.fp8.deepgemm_speed import _deepgemm_build


class _Column:  # stand-ins for TE's grouped linears (only their classes are swapped here)
    pass


class _Row:
    pass


def test_speed_wrapper_swaps_only_deepgemm_systems(monkeypatch):
    def layer_specs(*args, **kwargs):
        return GroupedMLPSubmodules(linear_fc1=_Column, linear_fc2=_Row), None

    monkeypatch.setattr(model_build, "layer_specs", layer_specs)
    seen = []

    def build(args, name, device):
        seen.append(name)
        block, _ = model_build.layer_specs()
        return SimpleNamespace(name=name, fc1=block.linear_fc1, fc2=block.linear_fc2)

    wrapped = _deepgemm_build(build)
    plain = wrapped(None, "ours_1f1b+gaf", None)
    fast = wrapped(None, "ours_1f1b+gaf+deepgemm-torchq", None)
    rows = wrapped(None, "ours_1f1b+deepgemm-terows", None)
    again = wrapped(None, "ours_dualpipev", None)
    assert seen == ["ours_1f1b+gaf", "ours_1f1b+gaf", "ours_1f1b", "ours_dualpipev"]
    assert plain.fc1 is _Column and again.fc2 is _Row
    assert fast.name == "ours_1f1b+gaf+deepgemm-torchq"
    assert issubclass(fast.fc1, _Column) and issubclass(fast.fc2, _Row)
    assert fast.fc1 is not _Column and fast.fc1.deepgemm_quantizer == "torch"
    assert rows.fc2.deepgemm_quantizer == "te-rows"
    assert model_build.layer_specs is layer_specs
