"""Where the experts' weight gradients go: FP32 `main_grad` (fused accumulation, as TE's
`fuse_wgrad_accumulation` does for Megatron's `gradient_accumulation_fusion`) or `param.grad`.

With fused accumulation the k-grouped wgrad kernel adds straight into the `main_grad` buffers
when they form one evenly spaced [G, N, K] block of memory (Megatron's DDP lays a module's
parameters out back to back, in reverse order: the kernel then runs the experts in memory
order), else into a scratch buffer that is added afterwards. Each weight is then marked
`grad_added_to_main_grad` and autograd gets a dummy gradient, so Megatron's DDP hook skips its
own add (TE's convention; without the attribute the gradient is None).
"""

from __future__ import annotations

_DUMMIES: dict = {}


def expert_main_grads(weights) -> list:
    """Each expert's [N, K] FP32 main_grad (views into a single grouped parameter's)."""
    grads = []
    for w in weights:
        mg = getattr(w, "main_grad", None)
        if mg is None:
            raise RuntimeError("fused weight-gradient accumulation needs `main_grad` on every "
                               "expert weight (Megatron's DDP creates it)")
        grads.extend(mg.unbind(0) if w.dim() == 3 else [mg])
    return grads


def stacked_view(grads):
    """(a [G, N, K] view covering `grads` in memory order, that order) when they are
    contiguous FP32 tensors of one storage spaced exactly N*K apart, else None."""
    import torch

    first = grads[0]
    if any(g.dtype != torch.float32 or not g.is_contiguous() or g.shape != first.shape
           or g.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
           for g in grads):
        return None
    step = first.numel()
    order = sorted(range(len(grads)), key=lambda e: grads[e].storage_offset())
    offsets = [grads[e].storage_offset() for e in order]
    if any(b - a != step for a, b in zip(offsets, offsets[1:])):
        return None
    base = grads[order[0]]
    view = base.as_strided((len(grads), *first.shape), (step, first.shape[1], 1), offsets[0])
    return view, order


def wgrad_target(weights, accumulate: bool, num_experts: int):
    """(expert order of the wgrad kernel's groups, [G, N, K] view of the main_grads to
    accumulate into or None): the main_grads' memory order and their stacked view when
    accumulating into them in place, else the natural order and None (a scratch buffer)."""
    if accumulate:
        found = stacked_view(expert_main_grads(weights))
        if found is not None:
            return found[1], found[0]
    return list(range(num_experts)), None


def dummy_grad(weight):
    """TE's stand-in gradient for a weight whose real gradient went into main_grad (zeros if
    the weight asks for `zero_out_wgrad`); cached per shape, dtype and device."""
    import torch

    zero = bool(getattr(weight, "zero_out_wgrad", False))
    key = (tuple(weight.shape), weight.dtype, weight.device, zero)
    if key not in _DUMMIES:
        make = torch.zeros if zero else torch.empty
        _DUMMIES[key] = make(weight.shape, dtype=weight.dtype, device=weight.device)
    return _DUMMIES[key]


def finish_fused(weights) -> list:
    """Mark the weights and give autograd TE's placeholder gradients."""
    out = []
    for w in weights:
        if hasattr(w, "grad_added_to_main_grad"):
            w.grad_added_to_main_grad = True
            out.append(dummy_grad(w))
        else:
            out.append(None)
    return out
