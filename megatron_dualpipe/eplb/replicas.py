"""The physical experts of this rank and the state that belongs to them.

* `find_layers(model)`: every MoE layer with an `EPLBRouter`, as an `ExpertLayer` (router,
  local slots and their parameters).
* `sum_replica_grads(layers)`: replicas of one logical expert get the sum of their gradients.
* `mark_duplicates(layers, access)`: only one replica per logical expert counts in the gradient
  norm (Megatron's ``param.shared`` flag), so clipping sees each logical expert once.
* `OptimizerAccess`: the full fp32 main parameter and optimizer-state tensors (Adam moments,
  step) of a model parameter, read and written through Megatron's optimizers (distributed
  optimizer included), for moves and checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_dualpipe.eplb.router import EPLBRouter

_SEQUENTIAL = re.compile(r"^local_experts\.(\d+)\.(.+)$")
_TE_GROUPED = re.compile(r"^(.+?(?:weight|bias))(\d+)$")


@dataclass
class ExpertLayer:
    """One MoE layer on this rank: its router and ``params[j]`` = ``[(name, param)]`` of local
    slot ``j`` (global slot ``ep_rank * slots_per_rank + j``), names without the slot index."""

    layer_id: int
    router: EPLBRouter
    params: list[list[tuple[str, torch.nn.Parameter]]]

    @property
    def num_slots(self) -> int:
        return self.router.num_slots

    @property
    def num_logical(self) -> int:
        return self.router.num_logical

    @property
    def ep_rank(self) -> int:
        return self.router.ep_rank

    @property
    def ep_size(self) -> int:
        return self.router.ep_size

    @property
    def slots_per_rank(self) -> int:
        return self.router.slots_per_rank

    @property
    def phy2log(self) -> torch.Tensor:
        return self.router.expert_map.phy2log

    def global_slot(self, j: int) -> int:
        return self.ep_rank * self.slots_per_rank + j

    def local_slot(self, slot: int) -> int | None:
        j = slot - self.ep_rank * self.slots_per_rank
        return j if 0 <= j < self.slots_per_rank else None


def _slot_params(experts, num_local: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    params: list[list[tuple[str, torch.nn.Parameter]]] = [[] for _ in range(num_local)]
    for name, param in experts.named_parameters():
        match = _SEQUENTIAL.match(name) or _TE_GROUPED.match(name)
        if match is None:
            raise NotImplementedError(
                f"EPLB supports SequentialMLP and TEGroupedMLP experts; cannot place {name!r} "
                "(legacy GroupedMLP packs all local experts in one tensor)")
        if match.re is _SEQUENTIAL:
            j, suffix = int(match.group(1)), match.group(2)
        else:
            j, suffix = int(match.group(2)), match.group(1)
        params[j].append((suffix, param))
    for plist in params:
        plist.sort(key=lambda item: item[0])
    return params


def find_layers(model: list) -> list[ExpertLayer]:
    """The `EPLBRouter` MoE layers of this rank's model chunks, ordered by layer id."""
    layers = []
    for chunk in model:
        module = getattr(chunk, "module", chunk)
        for sub in module.modules():
            router = getattr(sub, "router", None)
            if not isinstance(router, EPLBRouter) or not hasattr(sub, "experts"):
                continue
            layer_id = int(router.layer_number or 0)
            if router.is_mtp_layer:
                layer_id += router.config.num_layers
            params = _slot_params(sub.experts, router.slots_per_rank)
            layers.append(ExpertLayer(layer_id, router, params))
    layers.sort(key=lambda lay: lay.layer_id)
    return layers


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


@torch.no_grad()
def sum_replica_grads(layers: list[ExpertLayer]) -> None:
    """Give every replica of a logical expert the sum of the replicas' gradients.

    Per layer, the gradients of the replicated experts are scatter-added into a
    ``[replicated experts, numel]`` buffer, all-reduced over the EP group and written back to
    every replica. Tokens are split among replicas, so the sum is the gradient the expert would
    get without replication. Layers without replicas are left untouched (bit-exact).
    """
    for layer in layers:
        emap = layer.router.expert_map
        replicated = torch.nonzero(emap.logcnt > 1).flatten()
        if len(replicated) == 0:
            continue
        row_of = {int(e): i for i, e in enumerate(replicated.tolist())}
        grads0 = [_grad(p) for _, p in layer.params[0]]
        numel = sum(g.numel() for g in grads0)
        buf = torch.zeros(len(replicated), numel, dtype=grads0[0].dtype, device=grads0[0].device)
        mine = []
        for j, plist in enumerate(layer.params):
            row = row_of.get(int(emap.phy2log[layer.global_slot(j)]))
            if row is None:
                continue
            mine.append((j, row))
            offset = 0
            for _, param in plist:
                grad = _grad(param)
                buf[row, offset:offset + grad.numel()] += grad.reshape(-1)
                offset += grad.numel()
        dist.all_reduce(buf, group=layer.router.ep_group)
        for j, row in mine:
            offset = 0
            for _, param in layer.params[j]:
                grad = _grad(param)
                grad.copy_(buf[row, offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()


class OptimizerAccess:
    """Main parameters and optimizer state of model parameters, as full (unsharded) tensors.

    Works with Megatron's `DistributedOptimizer` (through its
    ``_get/_set_main_param_and_optimizer_states``; shards over the expert-data-parallel group are
    gathered with an all-reduce) and with the non-distributed optimizers (fp32 and
    float16-with-fp32-main). Tensors are returned flat; ``"param"`` is the fp32 main parameter
    and is left out where it is the model parameter's own memory (fp32 training).
    """

    def __init__(self, optimizer):
        self.subs = list(getattr(optimizer, "chained_optimizers", [optimizer]))
        self._owner: dict[int, object] = {}
        for sub in self.subs:
            for param in _model_params(sub):
                self._owner[id(param)] = sub

    def owner(self, param):
        return self._owner.get(id(param))

    def main_param(self, param) -> torch.Tensor | None:
        """The optimizer-side tensor of ``param`` on this rank (its shard), or None."""
        sub = self.owner(param)
        if sub is None:
            return None
        if hasattr(sub, "model_param_group_index_map"):
            index = sub.model_param_group_index_map.get(param)
            if index is None:
                return None
            return sub.optimizer.param_groups[index[0]]["params"][index[1]]
        return _plain_main(sub, param)

    def read(self, param) -> dict[str, torch.Tensor]:
        """Full flat main param (unless aliased) and state tensors of ``param``."""
        sub = self.owner(param)
        if sub is None:
            return {}
        if hasattr(sub, "model_param_group_index_map"):
            return self._read_distributed(sub, param)
        main = _plain_main(sub, param)
        state = sub.optimizer.state.get(main, {})
        out = {k: v.reshape(-1) for k, v in state.items() if isinstance(v, torch.Tensor)}
        if main is not None and not _aliases(main, param):
            out["param"] = main.reshape(-1)
        return out

    def layout(self, param) -> list[tuple[str, torch.dtype, int]]:
        """``(key, dtype, numel)`` of what :meth:`read` returns, in sorted key order, found
        locally (no communication)."""
        sub = self.owner(param)
        if sub is None:
            return []
        if hasattr(sub, "model_param_group_index_map") and sub.data_parallel_group.size() > 1:
            return [(key, dtype, 1 if scalar else param.numel())
                    for key, (dtype, scalar) in sorted(_state_template(sub).items())]
        state = self.read(param)  # views only: no communication without expert-DP shards
        return [(key, state[key].dtype, state[key].numel()) for key in sorted(state)]

    def write(self, param, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full flat tensors (as returned by :meth:`read`) into ``param``'s state."""
        sub = self.owner(param)
        if sub is None:
            return
        if hasattr(sub, "model_param_group_index_map"):
            self._write_distributed(sub, param, tensors)
            return
        main = _plain_main(sub, param)
        state = sub.optimizer.state.get(main, {})
        for key, value in tensors.items():
            if key == "param":
                if main is not None and not _aliases(main, param):
                    main.view(-1).copy_(value)
            elif key in state:
                state[key].view(-1).copy_(value.view(-1))

    # -- distributed optimizer --------------------------------------------------------------
    @staticmethod
    def _range(sub, param) -> tuple[int, int]:
        try:
            rng = sub._get_model_param_range_map(param)["param"]
        except KeyError:
            return 0, 0
        return rng.start, rng.end

    def _read_distributed(self, sub, param) -> dict[str, torch.Tensor]:
        group = sub.data_parallel_group
        has_shard = param in sub.model_param_group_index_map
        shard = sub._get_main_param_and_optimizer_states(param) if has_shard else {}
        if group.size() == 1:
            return {k: v.reshape(-1) for k, v in shard.items()
                    if not (k == "param" and _aliases(v, param))}
        # Expert-data-parallel shards: every rank fills its range, an all-reduce completes it.
        start, end = self._range(sub, param)
        out = {}
        for key, (dtype, scalar) in _state_template(sub).items():
            if scalar:  # e.g. Adam's step: the same on every rank
                full = torch.zeros((), dtype=dtype, device=param.device)
                if key in shard:
                    full.copy_(shard[key])
                dist.all_reduce(full, op=dist.ReduceOp.MAX, group=group)
            else:
                full = torch.zeros(param.numel(), dtype=dtype, device=param.device)
                if key in shard and end > start:
                    full[start:end] = shard[key].reshape(-1)
                dist.all_reduce(full, group=group)
            out[key] = full.reshape(-1)
        return out

    def _write_distributed(self, sub, param, tensors) -> None:
        if param not in sub.model_param_group_index_map:
            return
        shard = sub._get_main_param_and_optimizer_states(param)
        start, end = self._range(sub, param)
        for key, dst in shard.items():
            if key not in tensors or (key == "param" and _aliases(dst, param)):
                continue
            value = tensors[key].reshape(-1)
            if dst.dim() == 0:
                dst.copy_(value.reshape(()))
            else:
                dst.view(-1).copy_(value[start:end])


def _model_params(sub) -> list:
    """Model parameters handled by one (non-chained) Megatron optimizer."""
    params = []
    for attr in ("model_float16_groups", "model_fp32_groups", "float16_groups",
                 "fp32_from_fp32_groups"):
        for group in getattr(sub, attr, []):
            params.extend(group)
    if not params and hasattr(sub, "optimizer"):  # FP32Optimizer: the model params themselves
        for group in sub.optimizer.param_groups:
            params.extend(group["params"])
    return params


def _plain_main(sub, param):
    """Main parameter of ``param`` in a non-distributed Megatron optimizer."""
    for model_groups, main_groups in ((getattr(sub, "float16_groups", []),
                                       getattr(sub, "fp32_from_float16_groups", [])),):
        for model_group, main_group in zip(model_groups, main_groups):
            for model_param, main in zip(model_group, main_group):
                if model_param is param:
                    return main
    return param


def _state_template(sub) -> dict[str, tuple[torch.dtype, bool]]:
    """``{key: (dtype, is_scalar)}`` of the state of the distributed optimizer ``sub``, from
    any parameter with state (all of its parameters have the same keys)."""
    for group in sub.optimizer.param_groups:
        for main in group["params"]:
            state = sub.optimizer.state.get(main)
            if state:
                out = {"param": (main.dtype, False)}
                out.update({k: (v.dtype, v.dim() == 0) for k, v in state.items()
                            if isinstance(v, torch.Tensor)})
                return out
    return {"param": (torch.float32, False)}


def _aliases(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``tensor`` lies inside ``param``'s memory (fp32 main params are views)."""
    if tensor.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        return False
    lo, hi = param.data_ptr(), param.data_ptr() + param.numel() * param.element_size()
    return lo <= tensor.data_ptr() < hi


def duplicate_flags(layer: ExpertLayer) -> list[bool]:
    """Per local slot: True where the slot is not its logical expert's canonical replica."""
    canonical = layer.router.expert_map.canonical()
    flags = []
    for j in range(layer.slots_per_rank):
        slot = layer.global_slot(j)
        flags.append(int(canonical[int(layer.phy2log[slot])]) != slot)
    return flags


def mark_duplicates(layers: list[ExpertLayer], access: OptimizerAccess) -> None:
    """Set Megatron's ``shared`` flag on non-canonical replicas (model and main params), so the
    gradient norm counts each logical expert once, as without replication."""
    for layer in layers:
        for j, duplicate in enumerate(duplicate_flags(layer)):
            for _, param in layer.params[j]:
                param.shared = duplicate
                main = access.main_param(param)
                if main is not None:
                    main.shared = duplicate
