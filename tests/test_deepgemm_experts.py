"""DeepGEMM behind the routed experts (megatron_dualpipe/fp8/deepgemm), on CPU.

The `deep_gemm` module is replaced by an emulator (tests/deepgemm_emulator.py: DeepGEMM's
argument conventions and host checks, float64 products of the dequantized operands). Checked
against an independent float64 reference of the dequantized operands (tight: only the BF16
rounding of y / dx, FP32 rounding of main_grad) and against the BF16 product (FP8 tolerance,
relative Frobenius error < 6%, as benchmarks/fp8 uses): forward, dgrad, wgrad into main_grad
(evenly spaced buffers in Megatron's reverse order, separate buffers) or param.grad, two
micro-batches accumulating, uneven splits with a zero-row expert and rows not multiples of 128;
the weight cache; the module's BF16 fall-back to TE's forward and its FP8 path; the spec swap.
"""

from __future__ import annotations

import functools
import sys
from types import SimpleNamespace

import pytest
import torch
from deepgemm_emulator import bf16_grouped, emulator, ref_grouped, ref_quant, rel_err

from megatron_dualpipe.fp8.deepgemm import module as dg_module
from megatron_dualpipe.fp8.deepgemm.function import GemmOptions, grouped_fp8_gemm
from megatron_dualpipe.fp8.deepgemm.weights import WeightCache

G, K, N = 4, 256, 384
SPLITS = [130, 0, 77, 256]  # a zero-row expert, rows not multiples of 128, one aligned
TIGHT = 4e-3  # BF16 rounding of the outputs only (FP8 quantization error is about 3.7%)
FP8_BOUND = 0.06


@pytest.fixture
def dg(monkeypatch):
    mod = emulator()
    monkeypatch.setitem(sys.modules, "deep_gemm", mod)
    return mod


def _weights(seed: int, grouped: bool = False):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(G, N, K, generator=g) / K**0.5).bfloat16()
    if grouped:
        return [torch.nn.Parameter(w)]
    return [torch.nn.Parameter(w[e].clone()) for e in range(G)]


def _batch(seed: int, splits):
    g = torch.Generator().manual_seed(seed)
    m = sum(splits)
    return (torch.randn(m, K, generator=g).bfloat16(), torch.randn(m, N, generator=g).bfloat16())


def _attach_main_grads(ws, layout: str):
    """Per-expert FP32 main_grad: `separate` tensors, or Megatron's `buffer` (one flat FP32
    buffer, parameters laid out in reverse order); returns the buffer (or None)."""
    for w in ws:
        w.grad_added_to_main_grad = False
    if layout == "separate":
        for w in ws:
            w.main_grad = torch.zeros(w.shape)
        return None
    buffer = torch.zeros(G * N * K)
    for i, w in enumerate(reversed(ws)):
        w.main_grad = buffer[i * N * K:(i + 1) * N * K].view(N, K)
    return buffer


def _k_grouped_targets(dg) -> list:
    return [args[2] for name, args, _ in dg.calls if name == "k_grouped_fp8_gemm_nt_contiguous"]


@pytest.mark.parametrize("layout", ["buffer", "separate", "param_grad"])
def test_forward_backward_two_microbatches(dg, layout):
    ws = _weights(0)
    buffer = None if layout == "param_grad" else _attach_main_grads(ws, layout)
    quantized = WeightCache().get(ws)
    options = GemmOptions(accumulate=layout != "param_grad", quantizer="torch")
    total_ref = torch.zeros(G, N, K, dtype=torch.float64)
    total_bf16 = torch.zeros(G, N, K, dtype=torch.float64)
    for micro in range(2):
        x, dy = _batch(10 + micro, SPLITS)
        xr = x.clone().requires_grad_(True)
        y = grouped_fp8_gemm(xr, SPLITS, ws, quantized, options)
        y.backward(dy)
        y_ref, dx_ref, dw_ref = ref_grouped(x, dy, [w.detach() for w in ws], SPLITS)
        y_bf, dx_bf, dw_bf = bf16_grouped(x, dy, [w.detach() for w in ws], SPLITS)
        assert y.dtype == torch.bfloat16 and y.shape == (sum(SPLITS), N)
        assert rel_err(y, y_ref) < TIGHT
        assert rel_err(xr.grad, dx_ref) < TIGHT
        assert 0.01 < rel_err(y, y_bf) < FP8_BOUND  # really FP8, and within its tolerance
        assert rel_err(xr.grad, dx_bf) < FP8_BOUND
        total_ref += dw_ref
        total_bf16 += dw_bf
        if layout != "param_grad":
            assert all(w.grad_added_to_main_grad for w in ws)
            assert all(w.grad is not None and w.grad.shape == w.shape for w in ws)
            for w in ws:  # what Megatron's DDP hook does after skipping its add
                w.grad = None
    if layout == "param_grad":
        got = torch.stack([w.grad for w in ws])
        assert got.dtype == torch.bfloat16
        assert rel_err(got, total_ref) < TIGHT
    else:
        got = torch.stack([w.main_grad for w in ws])
        assert rel_err(got, total_ref) < 1e-6
        assert torch.count_nonzero(ws[1].main_grad) == 0  # the zero-row expert
    assert rel_err(got, total_bf16) < FP8_BOUND
    targets = _k_grouped_targets(dg)
    assert len(targets) == 2
    if layout == "buffer":  # accumulated in place, experts in memory order
        assert all(t.data_ptr() == buffer.data_ptr() for t in targets)
    else:
        assert all(t.data_ptr() != w.main_grad.data_ptr() for t in targets for w in ws
                   if hasattr(w, "main_grad"))


class _FakeTEBlockQuantizer:
    """TE 2.20's Float8BlockQuantizer output as benchmarks/fp8/blockwise_quant.py reads it on
    the H200: rowwise data [m, k] with scales [k/128, tma(m)] row-major; columnwise data
    x^T [k, m] (1x128 along m) with scales [m/128, tma(k)] row-major."""

    def __init__(self, columnwise: bool):
        self.columnwise = columnwise

    @staticmethod
    def _one(t):
        r, c = t.shape
        v = t.float().view(r, c // 128, 128)
        s = v.abs().amax(-1).clamp(min=1e-4) * (1.0 / 448.0)  # ref_quant's arithmetic
        q = (v * (1.0 / s.unsqueeze(-1))).to(torch.float8_e4m3fn).view(r, c)
        buf = torch.zeros(c // 128, -(-r // 4) * 4)
        buf[:, :r] = s.t()
        return q.view(torch.uint8), buf

    def quantize(self, x):
        row, row_sf = self._one(x)
        col, col_sf = self._one(x.t()) if self.columnwise else (None, None)
        return SimpleNamespace(_rowwise_data=row, _rowwise_scale_inv=row_sf,
                               _columnwise_data=col, _columnwise_scale_inv=col_sf)


@pytest.mark.parametrize("quantizer", ["te", "te-rows"])
def test_te_quantizer_layout_regrouped_for_wgrad(dg, monkeypatch, quantizer):
    from megatron_dualpipe.fp8.deepgemm import quantize

    monkeypatch.setattr(quantize, "_te_block_quantizer", _FakeTEBlockQuantizer)
    ws = _weights(13)
    _attach_main_grads(ws, "buffer")  # experts regrouped in reverse (memory) order
    x, dy = _batch(14, SPLITS)
    x.requires_grad_(True)
    options = GemmOptions(accumulate=True, quantizer=quantizer)
    y = grouped_fp8_gemm(x, SPLITS, ws, WeightCache().get(ws), options)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = ref_grouped(x.detach(), dy, [w.detach() for w in ws], SPLITS)
    assert rel_err(y, y_ref) < TIGHT and rel_err(x.grad, dx_ref) < TIGHT
    assert rel_err(torch.stack([w.main_grad for w in ws]), dw_ref) < 1e-6


def test_single_grouped_weight_accumulates_in_place(dg):
    (w,) = _weights(1, grouped=True)
    w.main_grad = torch.full((G, N, K), 0.5)
    w.grad_added_to_main_grad = False
    x, dy = _batch(3, SPLITS)
    y = grouped_fp8_gemm(x, SPLITS, [w], WeightCache().get([w]), GemmOptions(accumulate=True))
    y.backward(dy)
    _, _, dw_ref = ref_grouped(x, dy, list(w.detach()), SPLITS)
    assert rel_err(w.main_grad - 0.5, dw_ref) < 1e-5
    assert _k_grouped_targets(dg)[0].data_ptr() == w.main_grad.data_ptr()


@pytest.mark.parametrize("splits", [[128, 256, 0, 128], [1, 2, 3, 129], [0, 0, 0, 0]],
                         ids=["aligned", "tiny", "empty"])
def test_splits(dg, splits):
    ws = _weights(2)
    x, dy = _batch(4, splits)
    x.requires_grad_(True)
    y = grouped_fp8_gemm(x, splits, ws, WeightCache().get(ws), GemmOptions())
    y.backward(dy)
    y_ref, dx_ref, dw_ref = ref_grouped(x.detach(), dy, [w.detach() for w in ws], splits)
    assert y.shape == (sum(splits), N) and x.grad.shape == x.shape
    if sum(splits):
        assert rel_err(y, y_ref) < TIGHT and rel_err(x.grad, dx_ref) < TIGHT
        assert rel_err(torch.stack([w.grad for w in ws]), dw_ref) < TIGHT
    else:
        assert all(torch.count_nonzero(w.grad) == 0 for w in ws)
        assert not dg.calls


def test_padding_rows_never_reach_the_output(dg):
    """The emulator fills rows tagged -1 with NaN: none may leak into y or dx."""
    ws = _weights(5)
    x, dy = _batch(6, SPLITS)
    x.requires_grad_(True)
    y = grouped_fp8_gemm(x, SPLITS, ws, WeightCache().get(ws), GemmOptions())
    y.backward(dy)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(w.grad).all() for w in ws)


def test_rejects_bad_inputs(dg):
    ws = _weights(7)
    q = WeightCache().get(ws)
    x, _ = _batch(8, SPLITS)
    with pytest.raises(ValueError, match="do not add up"):
        grouped_fp8_gemm(x, [1, 2, 3, 4], ws, q)
    with pytest.raises(TypeError, match="BF16"):
        grouped_fp8_gemm(x.float(), SPLITS, ws, q)


def test_weight_cache():
    ws = _weights(9)
    cache = WeightCache()
    first = cache.get(ws)
    assert cache.get(ws) is first and cache.refreshes == 1  # reused within the step
    for e, w in enumerate(ws):  # W and W^T from one pass, equal to the reference blocks
        (q, sf), (qt, sft) = (t[e] for t in first.w), (t[e] for t in first.wt)
        deq = q.double() * sf.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
        assert torch.equal(deq, ref_quant(w.detach(), 128, 128))
        assert torch.equal(qt.view(torch.uint8), q.t().contiguous().view(torch.uint8))
        assert torch.equal(sft, sf.t())
    refreshed = cache.get(ws, refresh=True)  # the step's first micro-batch
    assert refreshed is not first and cache.refreshes == 2
    cache.invalidate()
    assert cache.get(ws) is not refreshed and cache.refreshes == 3
    with torch.no_grad():
        ws[0].add_(1.0)  # an in-place update autograd sees (bumps _version)
    updated = cache.get(ws)
    assert cache.refreshes == 4
    assert not torch.equal(updated.w[1][0], refreshed.w[1][0])
    with torch.no_grad():
        ws[0].data.mul_(2.0)  # through .data: invisible, caught only by refresh=True
    assert cache.get(ws) is updated
    assert cache.get(ws, refresh=True) is not updated


class _FakeTEGroupedLinear(torch.nn.Module):
    """Stands in for Megatron's TE grouped-linear wrappers (no TE on CPU): their constructor
    and the attributes the DeepGEMM subclass reads; forward is a BF16 grouped matmul."""

    def __init__(self, num_gemms, input_size, output_size, *, config=None, init_method=None,
                 bias=False, skip_bias_add=False, is_expert=True, tp_comm_buffer_name=None,
                 pg_collection=None, name=None):
        super().__init__()
        self.num_gemms, self.in_features, self.out_features = num_gemms, input_size, output_size
        self.use_bias = bias
        self.fuse_wgrad_accumulation = False
        self.is_first_microbatch = True
        self.disable_parameter_transpose_cache = False
        self.te_quant_params = None
        self.delay_wgrad_compute = False
        self.te_forward_calls = 0
        g = torch.Generator().manual_seed(11)
        for i in range(num_gemms):
            w = (torch.randn(output_size, input_size, generator=g) / input_size**0.5).bfloat16()
            self.register_parameter(f"weight{i}", torch.nn.Parameter(w))

    def forward(self, x, m_splits):
        self.te_forward_calls += 1
        ws = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        out = torch.cat([xs @ w.t() for xs, w in zip(x.split(m_splits), ws, strict=True)])
        self.is_first_microbatch = False
        return out, None


class _Recipe:
    def __init__(self, blockwise: bool):
        self.blockwise = blockwise

    def float8_block_scaling(self) -> bool:
        return self.blockwise


def _pair(fp8, monkeypatch):
    monkeypatch.setattr(dg_module, "active_fp8_recipe", lambda: fp8)
    cls = dg_module.deepgemm_grouped_linear(_FakeTEGroupedLinear, "torch")
    return cls(G, K, N), _FakeTEGroupedLinear(G, K, N)


def test_module_bf16_is_te_forward(dg, monkeypatch):
    ours, te = _pair(None, monkeypatch)
    assert list(ours.state_dict()) == list(te.state_dict())  # same checkpoint format
    x, dy = _batch(12, SPLITS)
    outs = []
    for module in (ours, te):
        xr = x.clone().requires_grad_(True)
        y, bias = module(xr, SPLITS)
        y.backward(dy)
        outs.append((y, xr.grad, [w.grad for w in module.parameters()], bias))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2], strict=True))
    assert outs[0][3] is None and ours.te_forward_calls == 1 and not dg.calls


def test_module_fp8_runs_deepgemm_once_quantized_per_step(dg, monkeypatch):
    ours, _ = _pair(_Recipe(blockwise=True), monkeypatch)
    ours.fuse_wgrad_accumulation = True
    ws = ours.expert_weights()
    _attach_main_grads(ws, "buffer")
    for step in range(2):
        ours.is_first_microbatch = True  # Megatron's set_is_first_microbatch()
        for micro in range(2):
            x, dy = _batch(20 + 2 * step + micro, SPLITS)
            y, bias = ours(x, SPLITS)
            y.backward(dy)
            y_ref, _, _ = ref_grouped(x, dy, [w.detach() for w in ws], SPLITS)
            assert bias is None and rel_err(y, y_ref) < TIGHT
        assert ours.deepgemm_weights.refreshes == step + 1
        with torch.no_grad():  # an optimizer step writing through .data
            for w in ws:
                w.data.mul_(0.5)
    assert ours.te_forward_calls == 0 and all(w.grad_added_to_main_grad for w in ws)


def test_module_fallbacks_and_refusals(dg, monkeypatch):
    ours, _ = _pair(_Recipe(blockwise=False), monkeypatch)
    x, _ = _batch(30, SPLITS)
    with pytest.raises(RuntimeError, match="blockwise"):
        ours(x, SPLITS)
    ours.te_quant_params = object()  # fp8.bf16_modules keeps this module on TE (BF16)
    ours(x, SPLITS)
    assert ours.te_forward_calls == 1 and not dg.calls
    cls = dg_module.deepgemm_grouped_linear(_FakeTEGroupedLinear)
    with pytest.raises(ValueError, match="expert biases"):
        cls(G, K, N, bias=True)
    with pytest.raises(ValueError, match="in_features 200"):
        cls(G, 200, N)
    with pytest.raises(ValueError, match="quantizer"):
        dg_module.deepgemm_grouped_linear(_FakeTEGroupedLinear, "fast")


class _FakeColumn(_FakeTEGroupedLinear):
    pass


class _FakeRow(_FakeTEGroupedLinear):
    pass


def _type_fields(spec, path="spec", seen=None) -> dict:
    """{path: class} of every class-valued field below `spec` (this test's own walk)."""
    import dataclasses

    seen = set() if seen is None else seen
    out = {}
    if id(spec) in seen:
        return out
    seen.add(id(spec))
    if isinstance(spec, functools.partial):
        items = [("func", spec.func)] + list(spec.keywords.items())
    elif isinstance(spec, list):
        items = [(str(i), v) for i, v in enumerate(spec)]
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        items = [(f.name, getattr(spec, f.name)) for f in dataclasses.fields(spec)]
    else:
        return out
    for key, value in items:
        if isinstance(value, type):
            out[f"{path}.{key}"] = value
        else:
            out.update(_type_fields(value, f"{path}.{key}", seen))
    return out


def test_spec_swap_replaces_exactly_the_expert_linears():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    def moe_layer():
        experts = functools.partial(TEGroupedMLP, submodules=GroupedMLPSubmodules(
            linear_fc1=_FakeColumn, linear_fc2=_FakeRow))
        shared = functools.partial(MLP, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
        moe = functools.partial(MoELayer, submodules=MoESubmodules(experts=experts,
                                                                   shared_experts=shared))
        return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(mlp=moe))

    dense = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))))
    shared_moe = moe_layer()
    block = TransformerBlockSubmodules(layer_specs=[dense, shared_moe, moe_layer(), shared_moe])
    before = _type_fields(block)
    assert dg_module.deepgemm_expert_spec(block) == 2  # two distinct expert specs
    after = _type_fields(block)
    changed = {p for p in before if before[p] is not after[p]}
    assert len(changed) == 4 and all(p.endswith(("experts.submodules.linear_fc1",
                                                   "experts.submodules.linear_fc2"))
                                     for p in changed)
    for p in changed:
        assert issubclass(after[p], before[p])
        assert issubclass(after[p], dg_module.DeepGEMMGroupedLinearMixin)
    assert dg_module.deepgemm_expert_spec(block) == 0  # idempotent
    assert _type_fields(block) == after


def test_inside_megatron_te_grouped_mlp(dg, monkeypatch):
    """Megatron-Core's own TEGroupedMLP (SwiGLU, router probabilities) with the swapped
    linears: its calls reach DeepGEMM with the right splits (each GEMM's output against the
    reference of the input it got) and its backward runs through both."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP

    monkeypatch.setattr(dg_module, "active_fp8_recipe", lambda: _Recipe(blockwise=True))
    config = TransformerConfig(num_layers=1, hidden_size=K, num_attention_heads=4,
                               moe_ffn_hidden_size=128, num_moe_experts=G,
                               gated_linear_unit=True, activation_func=F.silu,
                               add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16,
                               bias_activation_fusion=False)
    submodules = GroupedMLPSubmodules(
        linear_fc1=dg_module.deepgemm_grouped_linear(_FakeColumn, "torch"),
        linear_fc2=dg_module.deepgemm_grouped_linear(_FakeRow, "torch"))
    pg = SimpleNamespace(ep=None, expt_tp=None)
    experts = TEGroupedMLP(G, config, submodules, pg_collection=pg)
    seen = {}
    for name in ("linear_fc1", "linear_fc2"):
        getattr(experts, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], args[1], out[0])))
    x, _ = _batch(40, SPLITS)
    x.requires_grad_(True)
    probs = torch.rand(sum(SPLITS), generator=torch.Generator().manual_seed(41))
    out, bias = experts(x, torch.tensor(SPLITS), probs)
    assert bias is None and out.shape == x.shape
    for name in ("linear_fc1", "linear_fc2"):
        inp, splits, got = seen[name]
        assert list(splits) == SPLITS
        ws = [w.detach() for w in getattr(experts, name).expert_weights()]
        y_ref, _, _ = ref_grouped(inp.detach(), got.detach(), ws, SPLITS)
        assert rel_err(got, y_ref) < TIGHT
    assert torch.equal(out, seen["linear_fc2"][2])
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(w.grad is not None for w in experts.parameters())
