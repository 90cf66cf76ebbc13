"""The classification table on small synthetic traces, one per naming of expert-parallel (and
other) communication: DeepEP (v1, EPv2 legacy and elastic), HybridEP, NCCL (current and pre-2.19
names, RCCL), torch's all_to_all_single and Megatron's alltoall dispatcher (through the c10d op
that launched the NCCL kernel). gloo: tests/test_trace_analysis.py and test_trace_own.py."""

from __future__ import annotations

import pytest
from trace_events import GEMM, cpu, kernel, launch

from megatron_dualpipe.trace import analyze
from megatron_dualpipe.trace.classify import RULES, kernel_rule, short_name

_ARGS = "(int4*, float*, int*, long*, float*, int*, int*, int4 const*, float const*, " \
    "long const*, float const*, int const*, int, int, int, int, int, int, int, int, void**, " \
    "int**, int, int)"

# (kernel name as torch.profiler writes it, kind, family, role)
KERNELS = [
    # DeepEP 1.x: deep_ep::{intranode,internode,internode_ll}
    (f"void deep_ep::intranode::dispatch<8, 768, 8192>{_ARGS}", "alltoall", "deepep", "dispatch"),
    (f"void deep_ep::intranode::combine<__nv_bfloat16, 8, 768>{_ARGS}", "alltoall", "deepep",
     "combine"),
    ("void deep_ep::intranode::notify_dispatch<8>(int const*, int*, int const*, int*, int, int,"
     " bool const*, int*, int*, int, int, void**, int**, int)", "alltoall", "deepep", "notify"),
    ("void deep_ep::intranode::cached_notify_dispatch<8>(int const*, int, void**, int**, int)",
     "alltoall", "deepep", "notify"),
    ("void deep_ep::intranode::cached_notify_combine<8>(void**, int*, int, int, int, int**, "
     "int)", "alltoall", "deepep", "notify"),
    ("void deep_ep::intranode::barrier<8>(int**, int)", "alltoall", "deepep", "barrier"),
    ("void deep_ep::internode::dispatch<false, 4, false, 7, 4>(int4*, float*, long*, float*, "
     "deep_ep::internode::SourceMeta*, int4 const*, float const*, long const*)", "alltoall",
     "deepep", "dispatch"),
    ("void deep_ep::internode::combine<__nv_bfloat16, 4, 8, 7, 4>(int4*, float*, bool const*, "
     "int4 const*, deep_ep::internode::SourceMeta const*)", "alltoall", "deepep", "combine"),
    ("void deep_ep::internode::notify_dispatch<false, 4>(int const*, int*, int)", "alltoall",
     "deepep", "notify"),
    ("void deep_ep::internode::cached_notify<4>(int, int, int, int, int, int, int*, int*)",
     "alltoall", "deepep", "notify"),
    ("void deep_ep::internode_ll::dispatch<true, 3, 7168>(void*, float*, int*, long*, int*)",
     "alltoall", "deepep", "dispatch"),
    ("void deep_ep::internode_ll::combine<3, 7168, 128>(void*, void*, int*, void*)", "alltoall",
     "deepep", "combine"),
    ("void deep_ep::internode_ll::clean_low_latency_buffer<32>(int*, int, int*, int)",
     "alltoall", "deepep", "buffer"),
    # DeepEP EPv2: the 1.x kernels under deep_ep::legacy, new ones under deep_ep::elastic
    (f"void deep_ep::legacy::intranode::dispatch<8, 768, 8192>{_ARGS}", "alltoall", "deepep",
     "dispatch"),
    ("void deep_ep::legacy::internode_ll::combine<3, 7168, 128>(void*, void*, int*, void*)",
     "alltoall", "deepep", "combine"),
    ("void deep_ep::legacy::intranode::barrier<8>(int**, int)", "alltoall", "deepep", "barrier"),
    ("void deep_ep::elastic::dispatch_impl<true, 8, 128>(void*, deep_ep::sf_pack_t*, long*, "
     "float*)", "alltoall", "deepep-v2", "dispatch"),
    ("void deep_ep::elastic::hybrid_dispatch_impl<8>(void*, long*, float*)", "alltoall",
     "deepep-v2", "dispatch"),
    ("void deep_ep::elastic::dispatch_copy_epilogue_impl<8>(void*, void*, int*)", "alltoall",
     "deepep-v2", "dispatch"),
    ("void deep_ep::elastic::combine_impl<8>(__nv_bfloat16*, float*)", "alltoall", "deepep-v2",
     "combine"),
    ("void deep_ep::elastic::combine_reduce_epilogue_impl<8>(__nv_bfloat16*, float*)",
     "alltoall", "deepep-v2", "combine"),
    ("void deep_ep::elastic::barrier_impl<256>(ncclDevComm, ncclWindow_vidmem*, void*, int, "
     "int)", "alltoall", "deepep-v2", "barrier"),
    ("void deep_ep::elastic::pp_send_impl(ncclDevComm, ncclWindow_vidmem*, void*, long)", "p2p",
     "deepep-v2", "sendrecv"),
    ("void deep_ep::elastic::engram_fetch_impl<4>(ncclDevComm, ncclWindow_vidmem*, void*)",
     "collective", "deepep-v2", "fetch"),
    # HybridEP (Megatron's flex dispatcher, hybridep backend)
    ("void hybrid_ep::dispatch_kernel<__nv_bfloat16, 4, 8>(hybrid_ep::dispatch_kernel_param_t"
     "<__nv_bfloat16>)", "alltoall", "hybrid-ep", "dispatch"),
    ("void hybrid_ep::combine_kernel<4, 8>(hybrid_ep::combine_kernel_param_t)", "alltoall",
     "hybrid-ep", "combine"),
    ("hybrid_ep::device_sync_kernel(unsigned int*, unsigned int*, unsigned int*)", "alltoall",
     "hybrid-ep", "barrier"),
    ("ag_nvl_kernel(void**, void const*, unsigned long, int, int)", "collective", "hybrid-ep",
     "allgather"),
    ("void deep_ep::internode_ll::clean_mask_buffer<32>(int*, int)", "alltoall", "deepep",
     "buffer"),
    # NCCL (2.19+ and older), RCCL
    ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "p2p", "nccl", "sendrecv"),
    ("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclDevComm*, unsigned long, ncclWork*)", "p2p",
     "nccl", "sendrecv"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective",
     "nccl", "allreduce"),
    ("ncclKernel_AllGather_RING_LL_Sum_int8_t(ncclDevComm*, unsigned long, ncclWork*)",
     "collective", "nccl", "allgather"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
     "collective", "nccl", "reducescatter"),
    ("ncclDevKernel_Broadcast_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective", "nccl",
     "broadcast"),
    ("ncclKernel_AllToAllPivot_RING_SIMPLE_Sum_int8_t(ncclDevComm*, unsigned long, ncclWork*)",
     "alltoall", "nccl", "alltoall"),
]

COMPUTE = [
    GEMM,
    "void deep_ep::layout::get_dispatch_layout<256, 32, 8>(long const*, int*, int*, int*, "
    "bool*, int, int, int, int)",
    "void deep_ep::internode::get_dispatch_layout<256, 32, 8>(long const*, int*, int*, int*, "
    "bool*, int, int, int, int)",
    "void (anonymous namespace)::permute_kernel<__nv_bfloat16>(__nv_bfloat16 const*, "
    "__nv_bfloat16*)",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, "
    "at::native::FillFunctor<float>)",
]


@pytest.mark.parametrize("name,kind,family,role", KERNELS,
                         ids=[short_name(k[0]) for k in KERNELS])
def test_comm_kernel_in_a_synthetic_trace(name, kind, family, role):
    rule = kernel_rule(name)
    assert rule is not None and (rule.kind, rule.family, rule.role) == (kind, family, role)
    # The kernel on stream 20 over [0, 100), a GEMM on stream 7 over [60, 160): 40 of the
    # 100 us overlapped, counted under its kind and "all", nowhere else.
    r = analyze([kernel(name, 0, 100, stream=20), kernel(GEMM, 60, 100, stream=7)])
    for k in ("alltoall", "p2p", "collective"):
        s = r["comm"][k]
        assert (s["count"], s["time_us"], s["overlapped_us"]) == \
            ((1, 100, 40) if k == kind else (0, 0, 0))
    assert r["comm"]["all"]["exposed_us"] == 60
    assert r["compute_time_us"] == 100
    top = r["top_exposed"]
    assert [(t["name"], t["kind"], t["exposed_us"]) for t in top] == \
        [(short_name(name), kind, 60)]


@pytest.mark.parametrize("name", COMPUTE, ids=range(len(COMPUTE)))
def test_compute_kernels(name):
    assert kernel_rule(name) is None
    r = analyze([kernel(name, 0, 100, stream=20), kernel(GEMM, 50, 100, stream=7)])
    assert r["comm"]["all"]["count"] == 0 and r["compute_time_us"] == 150


def test_every_kernel_row_is_exercised():
    used = {kernel_rule(k[0]) for k in KERNELS}
    rows = {r for r in RULES if r.where == "kernel" and r.kind != "compute"
            and r.family and r.role != "other"}  # catch-all rows aside
    assert [r.pattern for r in RULES if r in rows - used] == []


SENDRECV = "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"


def _nccl_under(ops, corr=11):
    """A SendRecv kernel (stream 20, [100, 140)) launched inside the given CPU ops, and a GEMM
    on stream 7 over [120, 220)."""
    return [*ops, launch(5, corr=corr), kernel(SENDRECV, 100, 40, stream=20, corr=corr),
            kernel(GEMM, 120, 100, stream=7)]


@pytest.mark.parametrize("ops,kind", [
    # torch.distributed.all_to_all_single on NCCL (what Megatron's alltoall dispatcher calls)
    ([cpu("c10d::alltoall_base_", 0, 20),
      cpu("record_param_comms", 1, 10, args={"Collective name": "all_to_allv"})], "alltoall"),
    ([cpu("nccl:all_to_all", 0, 20, cat="user_annotation")], "alltoall"),
    # Megatron's _AllToAll autograd function around it
    ([cpu("_AllToAll", 0, 30, cat="python_function"), cpu("c10d::alltoall_base_", 1, 20)],
     "alltoall"),
    # pipeline point-to-point and a collective, also SendRecv / named kernels
    ([cpu("c10d::send", 0, 20), cpu("nccl:send 0->1", 1, 10, cat="user_annotation")], "p2p"),
    ([cpu("c10d::recv_", 0, 20)], "p2p"),
    ([cpu("record_param_comms", 0, 20, args={"Collective name": "allgather_into_tensor"})],
     "collective"),
    # no communication op around the launch: the kernel's own name decides
    ([cpu("aten::copy_", 0, 20)], "p2p"),
])
def test_nccl_kernel_kind_from_the_launching_op(ops, kind):
    r = analyze(_nccl_under(ops))["comm"]
    assert (r[kind]["count"], r[kind]["time_us"], r[kind]["overlapped_us"]) == (1, 40, 20)
    assert r["all"]["count"] == 1


def test_short_name():
    assert short_name(KERNELS[0][0]) == "deep_ep::intranode::dispatch"
    assert short_name(SENDRECV) == "ncclDevKernel_SendRecv"
    assert short_name(COMPUTE[3]) == "anon::permute_kernel"
    assert short_name("gloo:all_to_all") == "gloo:all_to_all"
