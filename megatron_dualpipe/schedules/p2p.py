"""Point-to-point links between adjacent pipeline ranks for the DualPipe schedules.

Every directed flow (src rank -> dst rank, activations or gradients) gets its own process
group with exactly one sender and one receiver. Within one flow the micro-batches are sent
and received in the same order (both ranks run their chunk's micro-batches in order), so
NCCL's in-order matching is correct without tags, no flow can block another, and sends
never block the sender (isend, completed at the end of the step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ACT, GRAD = "act", "grad"
_GROUPS: dict[tuple, dict] = {}


def flow_groups(pp_ranks: list[int]) -> dict[tuple[int, int, str], object]:
    """Process groups keyed by (src_global_rank, dst_global_rank, kind) for this pipeline.

    Collective over the world on first use: every rank creates every pipeline's groups in
    the same order.
    """
    key = tuple(pp_ranks)
    if key in _GROUPS:
        return _GROUPS[key]
    all_pipelines: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_pipelines, key)
    mine = {}
    for pipeline in sorted(set(all_pipelines)):
        for i in range(len(pipeline) - 1):
            a, b = pipeline[i], pipeline[i + 1]
            for src, dst in ((a, b), (b, a)):
                for kind in (ACT, GRAD):
                    group = dist.new_group([a, b])
                    if pipeline == key:
                        mine[(src, dst, kind)] = group
    # NCCL creates a communicator at its first use, collectively over its two ranks. The
    # ranks' first sends/receives come in different orders, so a lazy creation can deadlock
    # (each rank waiting in a different group); create them now, in one order everywhere.
    # The same holds for NCCL's point-to-point connections, set up by the first send/recv of
    # a group (the first isend blocks until the peer's first recv): exercise each flow once.
    device = torch.device("cuda", torch.cuda.current_device()) if (
        dist.get_backend() == "nccl") else torch.device("cpu")
    me = dist.get_rank()
    for (src, dst, _), group in mine.items():
        dist.all_reduce(torch.zeros(1, device=device), group=group)
        if me == src:
            dist.send(torch.zeros(1, device=device), dst, group=group)
        elif me == dst:
            dist.recv(torch.zeros(1, device=device), src, group=group)
    _GROUPS[key] = mine
    return mine


def reset_flow_groups() -> None:
    """Forget the cached flow groups (they die with the process group)."""
    _GROUPS.clear()


class Links:
    """Sends and receives of one schedule step on one rank."""

    def __init__(self, pp_ranks: list[int], shape, dtype, device):
        self.groups = flow_groups(pp_ranks) if len(pp_ranks) > 1 else {}
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.pending: list = []
        self.me = dist.get_rank()

    def send(self, tensor: torch.Tensor, dst: int, kind: str) -> None:
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, dst, group=self.groups[(self.me, dst, kind)])
        self.pending.append((work, tensor))

    def recv(self, src: int, kind: str) -> torch.Tensor:
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        dist.irecv(buffer, src, group=self.groups[(src, self.me, kind)]).wait()
        return buffer

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
