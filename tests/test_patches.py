"""The patches table: each patch one target, version-guarded, reversible."""

import importlib
from pathlib import Path

import pytest
import torch

from megatron_dualpipe.patches import (
    PATCHES as TABLE,
)
from megatron_dualpipe.patches import (
    apply_cpu_patches,
    cpu_patches,
    patches_of,
    revert_cpu_patches,
)
from megatron_dualpipe.patches.base import Patch

PATCHES = cpu_patches()
ALL = [p for entry in TABLE for p in patches_of(entry.name)]


def _ids(patch: Patch) -> str:
    return f"{patch.name}:{patch.module}"


def _target(patch: Patch):
    module, _, cls = patch.module.partition(":")
    target = importlib.import_module(module)
    return getattr(target, cls) if cls else target


def _current(patch: Patch) -> dict:
    target = _target(patch)
    return {attr: target.__dict__.get(attr) for attr in patch.replacements}


@pytest.fixture(autouse=True)
def restore_patch_state():
    """Leave the patches as this test found them (training in this process may need them)."""
    was_applied = {id(p): p.applied for p in ALL}
    yield
    for patch in ALL:
        if was_applied[id(patch)]:
            patch.apply()
        else:
            patch.revert()


def test_the_table_lists_every_patch_file_with_a_condition():
    from pathlib import Path

    import megatron_dualpipe.patches as package

    helpers = {"__init__", "base", "cpu_torch", "cpu_tensor_types", "export_diffs"}
    files = {p.stem for p in Path(package.__file__).parent.glob("*.py")} - helpers
    assert files == {entry.name for entry in TABLE}
    for entry in TABLE:
        assert entry.condition in ("cpu-only", "cpu-only, scoped", "feature"), entry
        assert all(p.name == entry.name for p in patches_of(entry.name)), entry
    assert {p.name for p in PATCHES} == {
        "cuda_calls", "rng_tracker", "alltoall_splits", "clip_grads",
        "distrib_optimizer_init", "float16_optimizer_init"}


def test_there_are_patches_and_each_names_its_target():
    for patch in ALL:
        expected = "torch:" if patch.package == "torch" else "megatron.core."
        assert patch.module.startswith(expected), patch
        assert patch.replacements, patch
        # Every target exists in the installed release.
        target = _target(patch)
        for attr in patch.replacements:
            assert hasattr(target, attr), f"{patch.name}: {patch.module} has no {attr}"


@pytest.mark.parametrize("patch", ALL, ids=_ids)
def test_apply_changes_the_target_and_revert_restores_the_original_object(patch):
    patch.revert()
    original = _current(patch)
    patch.apply()
    assert patch.applied
    patched = _current(patch)
    for attr in patch.replacements:
        assert patched[attr] is not original[attr], f"{patch.name}: {attr} unchanged by apply()"
    # A second apply is a no-op: same replacement objects, originals still remembered.
    patch.apply()
    for attr, value in _current(patch).items():
        assert value is patched[attr], f"{patch.name}: second apply() replaced {attr} again"
    patch.revert()
    assert not patch.applied
    for attr, value in _current(patch).items():
        assert value is original[attr], f"{patch.name}: revert() did not restore {attr}"
    # Reverting again is also a no-op.
    patch.revert()
    for attr, value in _current(patch).items():
        assert value is original[attr]


@pytest.mark.parametrize("version", ["0.20.0", "0.18.0", "0.18.9"])
def test_version_guard_refuses_other_megatron_versions(monkeypatch, version):
    from megatron.core import package_info

    revert_cpu_patches()
    monkeypatch.setattr(package_info, "__version__", version)
    patch = PATCHES[0]
    before = _current(patch)
    with pytest.raises(RuntimeError) as err:
        patch.apply()
    message = str(err.value)
    assert repr(patch.name) in message
    assert ">=0.19.0,<0.20.0" in message
    assert version in message
    assert not patch.applied
    assert _current(patch) == before, "a refused patch must leave its target untouched"
    with pytest.raises(RuntimeError, match="megatron-core>=0.19.0,<0.20.0"):
        apply_cpu_patches(force=True)
    assert not any(p.applied for p in PATCHES)


def test_version_guard_accepts_patch_releases(monkeypatch):
    from megatron.core import package_info

    revert_cpu_patches()
    monkeypatch.setattr(package_info, "__version__", "0.19.9")
    assert apply_cpu_patches(force=True) is True


def test_apply_cpu_patches_is_on_only_without_cuda():
    revert_cpu_patches()
    if torch.cuda.is_available():
        assert apply_cpu_patches() is False
        assert not any(p.applied for p in PATCHES)
    else:
        assert apply_cpu_patches() is True
        assert all(p.applied for p in PATCHES)


def test_apply_cpu_patches_reverts_completely():
    revert_cpu_patches()
    originals = [_current(p) for p in PATCHES]
    assert apply_cpu_patches(force=True) is True
    assert all(p.applied for p in PATCHES)
    assert apply_cpu_patches(force=True) is True  # idempotent
    revert_cpu_patches()
    assert not any(p.applied for p in PATCHES)
    assert [_current(p) for p in PATCHES] == originals


def test_megatron_modules_see_the_cpu_as_their_cuda_device():
    from megatron.core.transformer.moe import router

    revert_cpu_patches()
    assert router.torch is torch
    apply_cpu_patches(force=True)
    assert router.torch.cuda.current_device() == torch.device("cpu")
    assert router.torch.cuda.is_available() is False
    assert router.torch.zeros(2, device="cuda").device.type == "cpu"
    # Everything else is the real torch; torch itself is untouched.
    assert router.torch.Tensor is torch.Tensor
    assert torch.cuda.current_device is not router.torch.cuda.current_device
    revert_cpu_patches()
    assert router.torch is torch


def _params_with_grads(*grads):
    params = []
    for grad in grads:
        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad.clone()
        params.append(p)
    return params


def test_clip_grads_scales_cpu_grads_by_max_norm_over_total_norm():
    from megatron.core.optimizer import optimizer

    grads = (torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]]))
    total_norm = 5.0
    revert_cpu_patches()
    with pytest.raises(AssertionError):  # the original accepts CUDA gradients only
        optimizer.clip_grad_by_total_norm_fp32(_params_with_grads(*grads), 1.0, total_norm)
    apply_cpu_patches(force=True)
    params = _params_with_grads(*grads)
    optimizer.clip_grad_by_total_norm_fp32(params, 1.0, total_norm)
    coeff = 1.0 / (total_norm + 1e-6)
    torch.testing.assert_close(params[0].grad, grads[0] * coeff)
    torch.testing.assert_close(params[1].grad, grads[1] * coeff)
    # Under the limit nothing changes; a tensor coefficient is clamped at 1.
    params = _params_with_grads(*grads)
    optimizer.clip_grad_by_total_norm_fp32(params, 10.0, total_norm)
    torch.testing.assert_close(params[0].grad, grads[0])
    params = _params_with_grads(*grads)
    optimizer.clip_grad_by_total_norm_fp32(params, 10.0, torch.tensor(total_norm))
    torch.testing.assert_close(params[1].grad, grads[1])


def test_alltoall_splits_become_host_arrays():
    import megatron.core.transformer.moe.token_dispatcher as dispatcher
    import numpy as np

    apply_cpu_patches(force=True)
    splits = dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2, 3]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [1, 2, 3]
    assert dispatcher.maybe_move_tensor_to_cpu(None) is None


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    apply_cpu_patches(force=True)
    draws = []
    for _ in range(2):
        tracker = CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 123)
        torch.manual_seed(0)
        outside = torch.get_rng_state()
        with tracker.fork("model-parallel-rng"):
            draws.append(torch.rand(3))
        assert torch.equal(torch.get_rng_state(), outside), "fork() must restore the state"
    # The tracked stream is seeded by its own seed, not by the default generator's state.
    assert torch.equal(draws[0], draws[1])
    torch.manual_seed(123)
    assert torch.equal(draws[0], torch.rand(3))


def test_optimizer_init_sees_cuda_type_names_only_inside():
    from megatron_dualpipe.patches.cpu_tensor_types import cuda_type_names

    t = torch.zeros(2)
    with cuda_type_names():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64
    assert t.type() == "torch.FloatTensor"


def test_pad_routing_map_patch_pads_a_copy_with_the_same_result():
    from megatron.core.transformer.moe import token_dispatcher

    from megatron_dualpipe.patches import pad_routing_map

    patch = pad_routing_map.make_patch()
    original = token_dispatcher.pad_routing_map
    generator = torch.Generator().manual_seed(0)
    routing_map = torch.rand(64, 8, generator=generator) < 0.3  # [tokens, experts]
    expected = original(routing_map.clone(), 16)
    assert (expected.sum(0) % 16 == 0).all() and not torch.equal(expected, routing_map)
    before = routing_map.clone()
    patch.apply()
    try:
        assert token_dispatcher.pad_routing_map is not original
        padded = token_dispatcher.pad_routing_map(routing_map, 16)
        assert torch.equal(padded, expected)
        assert torch.equal(routing_map, before)  # the router's tensor is left as it was
    finally:
        patch.revert()
    assert token_dispatcher.pad_routing_map is original
    patch.check_version()


def test_capacity_dropping_with_fp8_router_padding_needs_the_routing_map_copy():
    """Megatron-Core 0.19 drops tokens over capacity with `probs * routing_map`, which autograd
    saves; FP8 router padding then writes into that map. Unpatched the backward fails (what
    the H200 run of `benchmarks.speed --systems ours_1f1b+padcap` hit); with the copy it runs
    and the gradient is the one of the unpadded map."""
    from megatron.core.transformer.moe import token_dispatcher
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.patches import needs_routing_map_copy, pad_routing_map

    def route_and_pad():
        logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1),
                             requires_grad=True)
        probs = torch.sigmoid(logits)
        routing_map = torch.zeros(64, 8, dtype=torch.bool).scatter(
            1, probs.topk(2, dim=1).indices, True)
        kept, kept_map = apply_router_token_dropping(
            probs * routing_map, routing_map, router_topk=2, capacity_factor=1.0,
            drop_policy="probs")
        token_dispatcher.pad_routing_map(kept_map, 16)
        kept.sum().backward()
        return logits.grad

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        route_and_pad()
    patch = pad_routing_map.make_patch()
    patch.apply()
    try:
        grad = route_and_pad()
    finally:
        patch.revert()
    assert grad.abs().sum() > 0
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "fp8_proxy_1gpu.yaml"
    dropping = load_recipe(recipe, ["moe.capacity_factor=1.0", "moe.router_fusion=false"])
    assert needs_routing_map_copy(dropping, "cuda")
    assert not needs_routing_map_copy(dropping, "cpu")
    padded = load_recipe(recipe, ["moe.capacity_factor=1.0", "moe.pad_to_capacity=true",
                                  "moe.router_fusion=false"])
    assert not needs_routing_map_copy(padded, "cuda")


def test_rope_cache_copy_survives_megatron_s_in_place_buffer_restore():
    """What Megatron-Core 0.19's graph capture does after a layer's forward (`buf.copy_` of
    every module buffer, transformer/cuda_graphs.py) breaks a backward that saved the yarn
    embedding's cached cos/sin, as MLA's fused rope does (the H200 capture failure); with the
    patch the same forward saves copies: the backward runs and the gradient is unchanged."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
    )

    from megatron_dualpipe.patches import rope_cache_copy

    apply_cpu_patches()  # the embedding asks torch.cuda for its device
    rope = YarnRotaryEmbedding(kv_channels=8, use_cpu_initialization=True, scaling_factor=40.0)
    x = torch.randn(16, 1, 1, 8, generator=torch.Generator().manual_seed(0))

    def forward_restore_backward():
        q = x.clone().requires_grad_()
        cos, sin = rope.get_cached_cos_sin(16, dtype=torch.float32)
        out = q * cos + q.flip(-1) * sin  # saves cos and sin, as the fused rope does
        backup = [b.clone() for b in rope.buffers()]
        for saved, buf in zip(backup, rope.buffers()):
            buf.copy_(saved)
        out.sum().backward()
        return q.grad

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        forward_restore_backward()
    patch = rope_cache_copy.make_patch()
    patch.apply()
    try:
        grad = forward_restore_backward()
        cos, sin = rope.get_cached_cos_sin(16, dtype=torch.float32)
    finally:
        patch.revert()
    assert torch.equal(cos, rope.cos_cached[:16]) and torch.equal(sin, rope.sin_cached[:16])
    assert cos.data_ptr() != rope.cos_cached.data_ptr()
    assert torch.allclose(grad, (rope.cos_cached[:16] + rope.sin_cached[:16].flip(-1)
                                 ).expand_as(x))


def test_record_stream_ignores_cpu_tensors_only_inside_the_block():
    from megatron_dualpipe.patches.record_stream import cpu_record_stream

    original = torch.Tensor.record_stream
    t = torch.zeros(2)
    with pytest.raises(Exception):
        t.record_stream(None)  # the real method refuses a CPU tensor
    with cpu_record_stream():
        assert torch.Tensor.record_stream is not original
        assert t.record_stream(None) is None
        with cpu_record_stream():  # nested: the inner block leaves the patch on
            pass
        assert torch.Tensor.record_stream is not original
    assert torch.Tensor.record_stream is original
