"""A stand-in for the `torch` module as seen by Megatron-Core code running without CUDA.

Everything is forwarded to the real `torch` except `torch.cuda` (streams and events become
no-ops, `current_device()` is the CPU, the RNG calls use the CPU generator) and tensor
factories, whose `device="cuda"` becomes the CPU.
"""

from __future__ import annotations

import contextlib
import types

import torch

_CPU = torch.device("cpu")
_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)  # fmt: skip


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    return factory


class NullEvent:
    """A CUDA event that is always complete."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class NullStream:
    """A CUDA stream on which everything has already run (CPU execution is synchronous)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, NullStream)

    def __hash__(self):
        return 0


class _CpuCuda(types.ModuleType):
    Stream = NullStream
    Event = NullEvent

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def current_stream(device=None):
        return NullStream()

    @staticmethod
    def default_stream(device=None):
        return NullStream()

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed):
        torch.manual_seed(seed)

    @staticmethod
    def memory_allocated(device=None):
        return 0

    @staticmethod
    def max_memory_allocated(device=None):
        return 0

    @staticmethod
    def nvtx_range_push(*args, **kwargs):
        pass


class CpuTorch(types.ModuleType):
    """Module object that forwards to `torch`, with CUDA redirected to the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


cpu_torch = CpuTorch()
