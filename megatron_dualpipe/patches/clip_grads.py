"""Gradient clipping by total norm without the CUDA-only type assertion.

Target: `megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32` (the binding the
optimizer calls), whose original asserts `param.grad.type() == 'torch.cuda.FloatTensor'`.
The replacement scales the same gradients by the same coefficient, in place.
"""

from __future__ import annotations

import torch

from megatron_dualpipe.patches.base import Patch


def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    with torch.no_grad():
        for grad in grads:
            grad.mul_(clip_coeff)


def make_patch() -> Patch:
    return Patch(
        name="clip_grads",
        module="megatron.core.optimizer.optimizer",
        replacements={"clip_grad_by_total_norm_fp32": lambda _: clip_grad_by_total_norm_fp32},
    )
