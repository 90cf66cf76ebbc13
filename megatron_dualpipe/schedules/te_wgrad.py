"""Zero-bubble W split for Transformer Engine linears (TE's delayed weight gradients).

Transformer Engine modules (`Linear`, `LayerNormLinear`, `GroupedLinear`, `LayerNormMLP`) keep
a `wgrad_store`; while its `delay_wgrad_compute()` is true, their backward computes only the
input gradient and queues the weight GEMM, and `backward_dw()` runs the oldest queued one.
TE reads that switch in the *backward*, so it can be turned on only inside the backwards that
the schedule splits (`WeightGradStore.collect()`).

Megatron-Core 0.19 enables TE's delay only through `TransformerConfig.delay_wgrad_compute`,
which it ties to its own combined-1F1B EP overlap (an assertion), and its wrappers'
`backward_dw()` are no-ops without it. So the deferral here works on the TE modules directly:
every deferrable module gets a delaying store (switched off), `collect()` switches the stores
on for one backward, and the W item calls TE's own `backward_dw()` for each module that
queued something, then moves the gradient TE wrote into `param.grad` to `main_grad`, exactly
where Megatron's DDP hook would have put it (`gradient_accumulation_fusion` is off in our
configs, so TE never writes `main_grad` itself).

Modules with a bias or with fused weight-gradient accumulation are left alone (not deferred):
bias gradients and `main_grad` fusion take other paths in TE's delayed mode.

TE 2.20 quirks handled here (see tests/test_te_wgrad_gpu.py): `GroupedLinear`, while
deferring, hands autograd the weight-gradient buffers its queued GEMM will fill later
(uninitialized until then); Megatron's DDP hook would add them to `main_grad` (NaN losses from
the second DualPipeV step in BF16, seen on an H200). A tensor hook on each deferred weight marks
it `grad_added_to_main_grad` (the flag the DDP hook honours) when its module has just queued.
`Linear` decides whether to defer at *forward* time (it passes its store to autograd only if
the delay is already on), so its GEMMs are not deferred here: its weight gradients arrive in
the B as usual and are kept.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable

from megatron_dualpipe.schedules.wgrad import accumulate_weight_grad


def _te_base_backward_dw(module):
    """TE's own `backward_dw` of `module` (Megatron's wrappers override it with a method that
    is a no-op unless `config.delay_wgrad_compute`)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("transformer_engine.") and "backward_dw" in vars(cls):
            return vars(cls)["backward_dw"]
    return None


def weight_params(module) -> list:
    """The trainable `weight*` parameters of a TE module (not its norm weights or biases)."""
    return [p for name, p in module.named_parameters(recurse=False)
            if name.startswith("weight") and p.requires_grad]


def is_deferrable(module) -> bool:
    """A TE module whose weight gradients can be deferred here."""
    if getattr(module, "wgrad_store", None) is None:
        return False
    if _te_base_backward_dw(module) is None or not weight_params(module):
        return False
    if getattr(module, "fuse_wgrad_accumulation", False):
        return False
    has_bias = any(name.startswith("bias") and p.requires_grad and p.numel()
                   for name, p in module.named_parameters(recurse=False))
    return not has_bias and not getattr(module, "use_bias", False)


class TEWeightGradDeferral:
    """The deferrable TE modules of some model chunks, with their delay switches."""

    num_deferred = 0  # TE weight GEMMs deferred so far in this process (for tests and logs)

    def __init__(self, modules: Iterable) -> None:
        self.modules = [m for m in modules if is_deferrable(m)]
        self._backward_dw = {id(m): _te_base_backward_dw(m) for m in self.modules}
        self._before: dict | None = None  # queue sizes while a deferred backward runs
        self._marked: list = []
        for module in self.modules:
            store = module.wgrad_store
            if store.context is None:  # built without delay: give it a delaying store
                module.wgrad_store = type(store)(True)
            module.wgrad_store.enabled = False
            for weight in weight_params(module):
                weight.register_hook(self._placeholder_guard(module, weight))

    def _placeholder_guard(self, module, weight):
        """A tensor hook (runs before the gradient reaches Megatron's DDP hook): during a
        deferred backward, a gradient arriving for a weight whose module has just queued its
        GEMM is TE's placeholder; mark the weight so the DDP hook skips it."""
        def hook(grad):
            before = self._before
            if (before is not None and hasattr(weight, "main_grad")
                    and module.wgrad_store.context.qsize() > before[id(module)]
                    and not getattr(weight, "grad_added_to_main_grad", False)):
                self._marked.append((weight, getattr(weight, "grad_added_to_main_grad", False)))
                weight.grad_added_to_main_grad = True
            return None

        return hook

    @classmethod
    def of_chunks(cls, chunks: Iterable) -> TEWeightGradDeferral:
        return cls(m for chunk in chunks for m in chunk.modules())

    def __len__(self) -> int:
        return len(self.modules)

    def _set(self, on: bool) -> None:
        for module in self.modules:
            module.wgrad_store.enabled = on

    @contextlib.contextmanager
    def deferring(self, item: list):
        """Within the block (one backward), TE weight GEMMs are queued; on exit a closure that
        runs them is appended to `item`."""
        before = {id(m): m.wgrad_store.context.qsize() for m in self.modules}
        self._before, self._marked = before, []
        self._set(True)
        try:
            yield
        finally:
            self._set(False)
            for weight, value in self._marked:
                weight.grad_added_to_main_grad = value
            self._before, self._marked = None, []
        pending = [(m, m.wgrad_store.context.qsize() - before[id(m)]) for m in self.modules]
        pending = [(m, n) for m, n in pending if n > 0]
        TEWeightGradDeferral.num_deferred += sum(n for _, n in pending)
        if pending:
            item.append(lambda: self._run(pending))

    def _run(self, pending) -> None:
        for module, count in pending:
            backward_dw = self._backward_dw[id(module)]
            module.wgrad_store.enabled = True  # TE's backward_dw is a no-op when off
            try:
                weights = weight_params(module)
                for _ in range(count):
                    kept = [w.grad for w in weights]  # TE assigns .grad: keep what was there
                    for weight in weights:
                        weight.grad = None
                    backward_dw(module)
                    for weight, grad in zip(weights, kept):
                        computed, weight.grad = weight.grad, grad
                        if computed is not None:
                            accumulate_weight_grad(weight, computed)
            finally:
                module.wgrad_store.enabled = False


_DEFERRALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def deferral_for(chunks: list) -> TEWeightGradDeferral | None:
    """The (cached) deferral of these model chunks; None when they have no TE linears."""
    key = chunks[0]
    if key not in _DEFERRALS:
        _DEFERRALS[key] = TEWeightGradDeferral.of_chunks(chunks)
    deferral = _DEFERRALS[key]
    return deferral if len(deferral) else None
