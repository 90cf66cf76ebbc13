"""Plan quality and migration reporting: balancedness, duplicates, slots and bytes moved."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_dualpipe.eplb.placement.planner import as_weight_array, bin_loads


def _as_ids(phy2log: object, name: str) -> np.ndarray:
    if hasattr(phy2log, "detach"):  # a torch.Tensor
        phy2log = phy2log.detach().cpu().numpy()
    arr = np.asarray(phy2log)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 2-D integer [layers, num_replicas] array, "
                         f"got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64)


def gpu_loads(weight_LE: np.ndarray, phy2log_LR: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L, num_gpus]`` load per GPU; each replica carries ``load / replica count``."""
    num_layers, num_logical = weight_LE.shape
    flat = phy2log_LR + (np.arange(num_layers) * num_logical)[:, None]
    count = np.bincount(flat.ravel(), minlength=weight_LE.size)
    per_replica = weight_LE.ravel() / np.maximum(count, 1)
    return bin_loads(per_replica[flat].reshape(num_layers, num_gpus, -1))


def balancedness(loads_XG: np.ndarray) -> np.ndarray:
    """Mean load / max load over the last axis (1.0 where everything is idle)."""
    top = loads_XG.max(axis=-1)
    safe = np.where(top > 0, top, 1.0)
    return np.where(top > 0, loads_XG.mean(axis=-1) / safe, 1.0)


def count_duplicates(phy2log_LR: np.ndarray, num_gpus: int) -> int:
    """Number of replicas that share a GPU with another replica of the same expert."""
    per_gpu = np.sort(phy2log_LR.reshape(phy2log_LR.shape[0], num_gpus, -1), axis=2)
    return int((per_gpu[:, :, 1:] == per_gpu[:, :, :-1]).sum())


def slot_moves(old_phy2log: object, new_phy2log: object) -> list[list[tuple[int, int, int]]]:
    """Per layer, the slots whose expert changes: ``[(slot, old_logical, new_logical), ...]``.

    Each listed slot must load the weights of ``new_logical`` (from any GPU that holds it).
    """
    old, new = _as_ids(old_phy2log, "old_phy2log"), _as_ids(new_phy2log, "new_phy2log")
    if old.shape != new.shape:
        raise ValueError(f"old_phy2log {old.shape} and new_phy2log {new.shape} differ in shape")
    layer, slot = np.nonzero(old != new)
    moves: list[list[tuple[int, int, int]]] = [[] for _ in range(old.shape[0])]
    for lay, s, a, b in zip(layer.tolist(), slot.tolist(), old[layer, slot].tolist(),
                            new[layer, slot].tolist()):
        moves[lay].append((s, a, b))
    return moves


@dataclass
class EplbReport:
    """Quality of a placement for given loads (see :func:`report`)."""

    balancedness: np.ndarray  # [L] mean GPU load / max GPU load
    balancedness_per_node: np.ndarray  # [L, N], within each node
    duplicates: int
    slots_moved_per_layer: np.ndarray  # [L], zeros without a current placement
    expert_bytes: int

    @property
    def mean_balancedness(self) -> float:
        return float(self.balancedness.mean())

    @property
    def slots_moved(self) -> int:
        return int(self.slots_moved_per_layer.sum())

    @property
    def bytes_moved(self) -> int:
        return self.slots_moved * self.expert_bytes

    def as_dict(self) -> dict:
        """Plain-Python summary (JSON / checkpoint metadata friendly)."""
        return {
            "balancedness_mean": self.mean_balancedness,
            "balancedness_min": float(self.balancedness.min()),
            "balancedness_per_layer": self.balancedness.tolist(),
            "balancedness_per_node_mean": self.balancedness_per_node.mean(axis=0).tolist(),
            "duplicates": self.duplicates,
            "slots_moved": self.slots_moved,
            "slots_moved_per_layer": self.slots_moved_per_layer.tolist(),
            "bytes_moved": self.bytes_moved,
        }


def report(weight: object, phy2log: object, num_gpus: int, num_nodes: int = 1, *,
           current_phy2log: object | None = None, expert_bytes: int = 0) -> EplbReport:
    """Balancedness per layer and per node, duplicates, and migration cost of a placement.

    Args:
        weight: ``[layers, num_logical]`` loads the placement is judged against.
        phy2log: ``[layers, num_replicas]`` placement to judge.
        num_gpus, num_nodes: topology; GPU ``g`` is on node ``g // (num_gpus // num_nodes)``.
        current_phy2log: placement before the change; slots whose expert differs count as moved.
        expert_bytes: size of one expert's weights, for ``bytes_moved``.
    """
    weight_LE = as_weight_array(weight)
    new = _as_ids(phy2log, "phy2log")
    num_layers, num_replicas = new.shape
    if num_layers != weight_LE.shape[0]:
        raise ValueError(f"phy2log has {num_layers} layers but weight has {weight_LE.shape[0]}")
    if new.min() < 0 or new.max() >= weight_LE.shape[1]:
        raise ValueError(f"phy2log ids must lie in [0, {weight_LE.shape[1]})")
    if num_gpus < 1 or num_replicas % num_gpus:
        raise ValueError(f"num_gpus ({num_gpus}) must divide num_replicas ({num_replicas})")
    if num_nodes < 1 or num_gpus % num_nodes:
        raise ValueError(f"num_nodes ({num_nodes}) must divide num_gpus ({num_gpus})")
    if expert_bytes < 0:
        raise ValueError(f"expert_bytes must be >= 0, got {expert_bytes}")
    loads = gpu_loads(weight_LE, new, num_gpus)
    moved = np.zeros(num_layers, np.int64)
    if current_phy2log is not None:
        old = _as_ids(current_phy2log, "current_phy2log")
        if old.shape != new.shape:
            raise ValueError(f"current_phy2log {old.shape} and phy2log {new.shape} differ")
        moved = (old != new).sum(axis=1)
    return EplbReport(
        balancedness=balancedness(loads),
        balancedness_per_node=balancedness(loads.reshape(num_layers, num_nodes, -1)),
        duplicates=count_duplicates(new, num_gpus),
        slots_moved_per_layer=moved,
        expert_bytes=int(expert_bytes),
    )
