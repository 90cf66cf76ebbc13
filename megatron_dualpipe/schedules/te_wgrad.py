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

In its delayed mode TE 2.20's `GroupedLinear` returns to autograd the weight-gradient buffers
its queued GEMM will fill later (uninitialized until then), where `Linear` returns None; with
DDP-wrapped BF16 models Megatron's grad hook would add those into `main_grad` (NaN losses from
the second step on, seen on an H200). During a deferred backward the deferred weights are
therefore marked `grad_added_to_main_grad`, the flag Megatron's hook honours.
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


def _weights(module) -> list:
    return [p for name, p in module.named_parameters(recurse=False)
            if name.startswith("weight") and p.requires_grad]


def is_deferrable(module) -> bool:
    """A TE module whose weight gradients can be deferred here."""
    if getattr(module, "wgrad_store", None) is None:
        return False
    if _te_base_backward_dw(module) is None or not _weights(module):
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
        for module in self.modules:
            store = module.wgrad_store
            if store.context is None:  # built without delay: give it a delaying store
                module.wgrad_store = type(store)(True)
            module.wgrad_store.enabled = False

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
        weights = [w for m in self.modules for w in _weights(m) if hasattr(w, "main_grad")]
        added = [getattr(w, "grad_added_to_main_grad", None) for w in weights]
        self._set(True)
        # Whatever TE hands autograd for a delayed weight (GroupedLinear: the still-empty
        # buffers its queued GEMM will fill) must not reach main_grad through Megatron's DDP
        # hook, which skips weights marked `grad_added_to_main_grad`.
        for weight in weights:
            weight.grad_added_to_main_grad = True
        try:
            yield
        finally:
            self._set(False)
            for weight, value in zip(weights, added):
                if value is None:
                    del weight.grad_added_to_main_grad
                else:
                    weight.grad_added_to_main_grad = value
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
                weights = _weights(module)
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
