"""Which trace events are communication, of which kind: the one classification table.

`RULES` is read top to bottom and the first matching row wins. A row applies to

- ``kernel``: GPU kernel names (``cat: kernel``);
- ``op``: CPU-side operations (``cpu_op``/``user_annotation``/``python_function``) that are
  communication: the operations of a CPU (gloo) trace, and on GPU the operation that launched an
  NCCL kernel;
- ``text``: the kind named by an operation's text (its name or its ``Collective name``).

Kinds: ``alltoall`` (MoE dispatch/combine), ``p2p`` (pipeline send/recv), ``collective``
(all-reduce, all-gather, ...) and ``compute`` (a kernel of a communication library that only
computes, e.g. DeepEP's dispatch layout). A kernel that matches no row is compute.

NCCL runs all-to-all and point-to-point both as ``SendRecv`` kernels, so rows marked
``by_launch`` take their kind from the c10d operation that launched the kernel when the trace
links the two (correlation ids), and from the row otherwise.

Kernel names, from the libraries' sources:

- DeepEP, releases up to 1.x (``csrc/kernels/{intranode,internode,internode_ll,runtime,
  layout}.cu``): ``deep_ep::intranode::{notify_dispatch, cached_notify_dispatch, dispatch,
  cached_notify_combine, combine, barrier}``, ``deep_ep::internode::{notify_dispatch, dispatch,
  cached_notify, combine, get_dispatch_layout, ibgda_initialize_recv_queue}``,
  ``deep_ep::internode_ll::{clean_low_latency_buffer, dispatch, combine, query_mask_buffer,
  update_mask_buffer, clean_mask_buffer}``, ``deep_ep::layout::get_dispatch_layout``.
- DeepEP EPv2 (2026): the same kernels under ``deep_ep::legacy::``, and the new ones
  ``deep_ep::elastic::{dispatch_impl, hybrid_dispatch_impl, dispatch_copy_epilogue_impl,
  combine_impl, hybrid_combine_impl, combine_reduce_epilogue_impl, barrier_impl,
  pp_send_impl, pp_recv_impl, engram_fetch_impl, engram_fetch_wait_impl}``.
- HybridEP (DeepEP's ``hybrid-ep`` branch, Megatron's flex dispatcher with the ``hybridep``
  backend): ``hybrid_ep::{dispatch_kernel, combine_kernel, device_sync_kernel,
  rdma_sync_kernel, update_expected_value_kernel}``, ``ag_nvl_kernel``; its
  ``permute_kernel``/``unpermute_kernel`` are compute.
- NCCL: ``ncclDevKernel_SendRecv``, ``ncclDevKernel_AllReduce_Sum_bf16_RING_LL``,
  ``ncclDevKernel_AllGather_RING_LL``, ``ncclDevKernel_ReduceScatter_...``, ``..._Broadcast``,
  ``ncclDevKernel_Generic``; before NCCL 2.19 ``ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t``,
  ``ncclKernel_AllReduce_RING_LL_Sum_float``, ...; RCCL ``ncclKernel_AllToAllPivot_...``.
- torch ``all_to_all_single`` / Megatron's ``alltoall`` dispatcher: NCCL ``SendRecv`` kernels
  launched under ``record_param_comms`` (``Collective name: all_to_allv``), ``nccl:all_to_all``
  and ``c10d::alltoall_base_``; on gloo ``c10d::alltoall_base_`` and ``gloo:all_to_all``.
  Megatron's ``flex`` dispatcher launches the DeepEP / HybridEP kernels above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Rule:
    """One row of the table: names matching `pattern` (searched, case-insensitive)."""

    where: str  # "kernel", "op" or "text"
    pattern: str
    kind: str | None  # alltoall / p2p / collective / compute; None: from the op's text
    family: str = ""  # library: deepep, deepep-v2, hybrid-ep, nccl, torch, gloo
    role: str = ""  # dispatch, combine, notify, barrier, buffer, sendrecv, ...
    by_launch: bool = False  # the launching c10d op decides the kind when known

    @property
    def regex(self) -> re.Pattern:
        return _compile(self.pattern)


@lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


_EP = r"deep_ep::(?:legacy::)?"
_ELASTIC = r"deep_ep::elastic::"

RULES: tuple[Rule, ...] = (
    # --- DeepEP, normal (intranode/internode) and low-latency (internode_ll) kernels.
    Rule("kernel", _EP + r"(?:layout|internode)::get_dispatch_layout\b", "compute",
         "deepep", "layout"),
    Rule("kernel", _EP + r"(?:intranode|internode|internode_ll)::dispatch\b", "alltoall",
         "deepep", "dispatch"),
    Rule("kernel", _EP + r"(?:intranode|internode|internode_ll)::combine\b", "alltoall",
         "deepep", "combine"),
    Rule("kernel", _EP + r"(?:intranode|internode)::(?:cached_)?notify(?:_dispatch|_combine)?\b",
         "alltoall", "deepep", "notify"),
    Rule("kernel", _EP + r"(?:intranode|internode)::barrier\b", "alltoall", "deepep", "barrier"),
    Rule("kernel", _EP + r"internode(?:_ll)?::(?:clean_low_latency_buffer|\w+_mask_buffer|"
         r"ibgda_initialize_recv_queue)\b", "alltoall", "deepep", "buffer"),
    # --- DeepEP EPv2.
    Rule("kernel", _ELASTIC + r"(?:hybrid_)?dispatch(?:_copy_epilogue)?_impl\b", "alltoall",
         "deepep-v2", "dispatch"),
    Rule("kernel", _ELASTIC + r"(?:hybrid_)?combine(?:_reduce_epilogue)?_impl\b", "alltoall",
         "deepep-v2", "combine"),
    Rule("kernel", _ELASTIC + r"barrier_impl\b", "alltoall", "deepep-v2", "barrier"),
    Rule("kernel", _ELASTIC + r"pp_(?:send|recv)_impl\b", "p2p", "deepep-v2", "sendrecv"),
    Rule("kernel", _ELASTIC + r"engram_fetch(?:_wait)?_impl\b", "collective", "deepep-v2",
         "fetch"),
    Rule("kernel", r"deep_ep::", "alltoall", "deepep", "other"),
    # --- HybridEP.
    Rule("kernel", r"hybrid_ep::dispatch_kernel\b", "alltoall", "hybrid-ep", "dispatch"),
    Rule("kernel", r"hybrid_ep::combine_kernel\b", "alltoall", "hybrid-ep", "combine"),
    Rule("kernel", r"hybrid_ep::(?:device_sync|rdma_sync|update_expected_value)_kernel\b",
         "alltoall", "hybrid-ep", "barrier"),
    Rule("kernel", r"\bag_nvl_kernel\b", "collective", "hybrid-ep", "allgather"),
    # --- NCCL / RCCL.
    Rule("kernel", r"nccl\w*?(?:SendRecv|_Send\b|_Recv\b)", "p2p", "nccl", "sendrecv",
         by_launch=True),
    Rule("kernel", r"nccl\w*?all_?to_?all", "alltoall", "nccl", "alltoall", by_launch=True),
    Rule("kernel", r"nccl\w*?AllReduce", "collective", "nccl", "allreduce", by_launch=True),
    Rule("kernel", r"nccl\w*?AllGather", "collective", "nccl", "allgather", by_launch=True),
    Rule("kernel", r"nccl\w*?ReduceScatter", "collective", "nccl", "reducescatter",
         by_launch=True),
    Rule("kernel", r"nccl\w*?(?:Broadcast|Reduce)", "collective", "nccl", "broadcast",
         by_launch=True),
    Rule("kernel", r"nccl", "collective", "nccl", "other", by_launch=True),
    # --- Other kernels named after an all-to-all or a send/recv.
    Rule("kernel", r"all_?to_?all", "alltoall", "", "alltoall", by_launch=True),
    Rule("kernel", r"sendrecv", "p2p", "", "sendrecv", by_launch=True),
    # --- CPU-side communication operations (kind: from their text).
    Rule("op", r"gloo", None, "gloo"),
    Rule("op", r"^c10d::", None, "torch"),
    Rule("op", r"^nccl:", None, "torch"),
    Rule("op", r"record_param_comms", None, "torch"),
    # --- The kind an operation's text names (all_to_allv, nccl:send, allreduce_, ...).
    Rule("text", r"all_?to_?all|deep_ep", "alltoall"),
    Rule("text", r"reduce|gather|scatter|broadcast|barrier", "collective"),
    Rule("text", r"send|recv", "p2p"),
)

KINDS = ("alltoall", "p2p", "collective", "all")
STEP_RE = re.compile(r"^ProfilerStep#(\d+)$")
COLLECTIVE_KEYS = ("Collective name", "collective_name")


def _first(where: str, text: str) -> Rule | None:
    for rule in RULES:
        if rule.where == where and rule.regex.search(text):
            return rule
    return None


@lru_cache(maxsize=65536)
def kernel_rule(name: str) -> Rule | None:
    """The row of a communication kernel (None: a compute kernel)."""
    rule = _first("kernel", name)
    return None if rule is None or rule.kind == "compute" else rule


@lru_cache(maxsize=65536)
def op_rule(name: str) -> Rule | None:
    """The row of a CPU-side communication operation (None: not communication)."""
    return _first("op", name)


@lru_cache(maxsize=4096)
def kind_from_text(text: str) -> str | None:
    rule = _first("text", text)
    return rule.kind if rule else None


def op_kind(name: str, collective: str | None) -> str | None:
    """Kind of a CPU-side communication op: its ``Collective name`` argument, else its name."""
    if collective is not None:
        return kind_from_text(collective) or "collective"
    return kind_from_text(name)


def short_name(name: str) -> str:
    """A kernel's qualified function name without ``void``, template and call arguments."""
    text = name.replace("(anonymous namespace)", "anon")
    if text.startswith("void "):
        text = text[5:]
    cut = min((i for i in (text.find("<"), text.find("(")) if i > 0), default=len(text))
    return text[:cut].strip() or name
