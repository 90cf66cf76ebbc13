"""Let optimizer construction accept CPU parameters.

Megatron-Core's optimizers sort parameters by `param.type()` strings and accept only
`torch.cuda.*Tensor`. Inside the wrapped constructors, a CPU tensor's `type()` reports the
CUDA name of the same dtype; outside them `torch.Tensor.type` is untouched.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def cuda_type_names():
    original = torch.Tensor.type

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not self.is_cuda:
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = original


def with_cuda_type_names(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with cuda_type_names():
            return func(*args, **kwargs)

    return wrapper
