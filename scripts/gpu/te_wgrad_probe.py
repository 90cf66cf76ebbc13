#!/usr/bin/env python
"""Print how the installed Transformer Engine defers weight gradients (diagnostic, one GPU):
the `wgrad_store` lines of its Linear / LayerNormLinear / GroupedLinear sources and of the base
`backward_dw`, then what a delayed LayerNormLinear backward queues and what `backward_dw` does."""

import inspect
import re

import torch
import transformer_engine.pytorch as te
from transformer_engine.pytorch.module import base, grouped_linear, layernorm_linear, linear

for mod in (base, linear, layernorm_linear, grouped_linear):
    src = inspect.getsource(mod).splitlines()
    print(f"=== {mod.__name__}")
    for i, line in enumerate(src):
        if re.search(r"wgrad_store|def backward_dw|wgrad_list = |_get_weight_tensors\(\)|"
                     r"return \(\s*$|wgrad = None|get_dummy_wgrad", line):
            print(f"{i:5d}: {line}")

from megatron_dualpipe.schedules.te_wgrad import TEWeightGradDeferral, _te_base_backward_dw  # noqa: E402

m = te.LayerNormLinear(256, 384, bias=False, normalization="RMSNorm",
                       params_dtype=torch.bfloat16, device="cuda")
d = TEWeightGradDeferral([m])
print("deferrable:", len(d), "backward_dw from", _te_base_backward_dw(m).__qualname__,
      "weights", [n for n, _ in m.named_parameters()], "weight tensors",
      [tuple(t.shape) for t in m._get_weight_tensors()])
x = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda", requires_grad=True)
m.wgrad_store.enabled = True
m(x).float().square().sum().backward()
print("after delayed backward: weight.grad", None if m.weight.grad is None else
      float(m.weight.grad.float().abs().sum()), "queue", m.wgrad_store.context.qsize())
m.weight.grad = None
item = m.wgrad_store.context.queue[0]
print("queued:", [type(t).__name__ for t in item[0]], getattr(item[1], "func", item[1]))
_te_base_backward_dw(m)(m)
print("after backward_dw: weight.grad", None if m.weight.grad is None else
      float(m.weight.grad.float().abs().sum()), "queue", m.wgrad_store.context.qsize())
