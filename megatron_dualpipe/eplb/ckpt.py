"""Checkpoints with EPLB: experts in logical layout, independent of placement and redundancy.

Megatron's dist-checkpoint (``checkpoint.py``) keeps everything except the routed experts:
their model tensors (keys with ``.mlp.experts.``) and the expert optimizer (the chained
sub-optimizer over expert-parallel parameters, whose flat buffers depend on the slot count)
are left out. They go to ``<step dir>/eplb_experts/`` instead, written with ``torch.save``:

* ``layer_<id>.meta.pt`` (one writer per pipeline stage): the placement ``phy2log``, the slot
  and EP counts and the layer's load window.
* ``layer_<id>.ep_<r>.pt`` (EP rank ``r``, expert-data-parallel rank 0): for every logical
  expert whose canonical replica (lowest slot) is on ``r``, its weights and, per weight, the
  full optimizer tensors (fp32 main param where it is a separate copy, Adam moments, step).

Loading fills every physical slot from its logical expert, whatever the new placement or
number of slots: with the same slots and EP size the saved placement is restored, otherwise a
fresh plan from the saved load window is used (the static placement if it has no loads).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dualpipe.eplb.replicas import mark_duplicates
from megatron_dualpipe.eplb.topology import planner_topology
from megatron_dualpipe.errors import UserError

FOLDER = "eplb_experts"


def is_expert_key(key: str) -> bool:
    """Routed-expert entries of a model state dict (not shared experts, not the router)."""
    return ".mlp.experts." in key or key.startswith("mlp.experts.")


def expert_optimizer_indices(optimizer) -> list[int]:
    """Indices of the chained sub-optimizers that hold expert-parallel parameters."""
    from megatron_dualpipe.eplb.replicas import _model_params

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [i for i, sub in enumerate(subs)
            if any(getattr(p, "allreduce", True) is False for p in _model_params(sub))]


def without_experts(sharded: dict, state) -> dict:
    """The dist-checkpoint sharded state dict minus routed experts and their optimizer."""
    out = {}
    for key, value in sharded.items():
        if key.startswith("model"):
            value = {k: v for k, v in value.items() if not is_expert_key(k)}
        out[key] = value
    drop = set(expert_optimizer_indices(state.optimizer))
    opt = out.get("optimizer")
    if isinstance(opt, dict) and drop and len(getattr(state.optimizer, "chained_optimizers",
                                                      [])) > 1:
        out["optimizer"] = {k: v for k, v in opt.items() if k not in drop}
    return out


@torch.no_grad()
def load_model_and_optimizer(state, loaded: dict) -> None:
    """Load the non-expert part of a dist-checkpoint; expert tensors keep their current values
    until `load_experts` fills them."""
    for i, chunk in enumerate(state.model):
        current = chunk.module.state_dict()
        merged = {k: v for k, v in current.items() if is_expert_key(k)}
        merged.update(loaded[f"model{i}"])
        chunk.module.load_state_dict(merged)
    subs = getattr(state.optimizer, "chained_optimizers", None)
    if not subs or len(subs) == 1:
        state.optimizer.load_state_dict(loaded["optimizer"])
        return
    drop = set(expert_optimizer_indices(state.optimizer))
    step = None
    for idx, sub in enumerate(subs):
        if idx in drop:
            continue
        sub.load_state_dict(loaded["optimizer"][idx])
        for group in sub.optimizer.param_groups:
            step = group.get("step", step)
    if step is not None:  # what ChainedOptimizer._synchronize_steps does after a full load
        for idx in drop:
            for group in subs[idx].optimizer.param_groups:
                if group["params"]:
                    group["step"] = step


def _layer_window(window, li: int) -> dict:
    full = window.state_dict()
    return {"kind": full["kind"], "window": full["window"], "steps": full["steps"],
            "recent": [t[li].clone() for t in full["recent"]], "ema": full["ema"][li].clone()}


def _writer_flags(layer) -> tuple[bool, bool]:
    """(writes the layer's meta file, writes this EP rank's expert file)."""
    from megatron.core import parallel_state

    edp0 = parallel_state.get_expert_data_parallel_rank() == 0
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    if etp > 1:
        raise NotImplementedError("EPLB checkpoints with expert tensor parallelism")
    group = layer.router.tp_dp_cp_group
    meta = (group.rank() if group is not None else 0) == 0
    return meta, edp0


def save_experts(hook, path: Path) -> None:
    """Write every local layer's canonical experts and placement of `hook` (an `EPLBHook`;
    collective)."""
    folder = Path(path) / FOLDER
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    for li, layer in enumerate(hook.layers):
        meta_writer, expert_writer = _writer_flags(layer)
        emap = layer.router.expert_map
        canonical = emap.canonical()
        experts = {}
        for j, plist in enumerate(layer.params):
            slot = layer.global_slot(j)
            expert = int(emap.phy2log[slot])
            if int(canonical[expert]) != slot:
                continue
            weights = {name: p.detach().cpu().clone() for name, p in plist}
            optim = {name: {k: v.detach().cpu().clone() for k, v in hook.access.read(p).items()}
                     for name, p in plist}  # collective over expert-DP: every rank reads
            experts[expert] = {"weights": weights, "optim": optim}
        if expert_writer:
            torch.save(experts, folder / f"layer_{layer.layer_id:04d}.ep_{layer.ep_rank:04d}.pt")
        if meta_writer:
            torch.save({"phy2log": emap.phy2log.clone(), "num_logical": layer.num_logical,
                        "num_slots": layer.num_slots, "ep": layer.ep_size,
                        "window": _layer_window(hook.window, li)},
                       folder / f"layer_{layer.layer_id:04d}.meta.pt")


def _choose_placement(layer, meta: dict, hook) -> torch.Tensor:
    from megatron_dualpipe.eplb import rebalance_experts
    from megatron_dualpipe.eplb.mapping import static_placement

    if meta["num_slots"] == layer.num_slots and meta["ep"] == layer.ep_size:
        return meta["phy2log"].clone()
    window = meta["window"]
    loads = (torch.stack(window["recent"]).sum(0) if window["kind"] == "sliding"
             and window["recent"] else window["ema"])
    if float(loads.sum()) <= 0:
        return static_placement(layer.num_logical, layer.num_slots)
    num_groups, num_nodes = planner_topology(hook.recipe)
    phy2log, _, _ = rebalance_experts(loads.unsqueeze(0).to(torch.float64), layer.num_slots,
                                      num_groups, num_nodes, layer.ep_size, mode="fast",
                                      policy=hook.recipe.eplb.policy)
    return phy2log[0]


@torch.no_grad()
def load_experts(hook, path: Path, placement: dict | None = None) -> None:
    """Fill every physical slot from its logical expert in ``<path>/eplb_experts``.

    ``placement`` (``{layer_id: phy2log}``) overrides the placement chosen for the layers.
    """
    folder = Path(path) / FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint has no EPLB experts (saved without eplb?)")
    windows = []
    for layer in hook.layers:
        meta = torch.load(folder / f"layer_{layer.layer_id:04d}.meta.pt", weights_only=False)
        if meta["num_logical"] != layer.num_logical:
            raise UserError(f"layer {layer.layer_id}: checkpoint has {meta['num_logical']} "
                             f"logical experts, the model {layer.num_logical}")
        new = (placement or {}).get(layer.layer_id)
        layer.router.set_placement(new if new is not None else _choose_placement(layer, meta,
                                                                                   hook))
        saved = meta["phy2log"]
        saved_spr = meta["num_slots"] // meta["ep"]
        first = {}
        for slot in range(len(saved) - 1, -1, -1):
            first[int(saved[slot])] = slot
        files: dict[int, dict] = {}
        device = layer.router.weight.device
        for j, plist in enumerate(layer.params):
            expert = int(layer.phy2log[layer.global_slot(j)])
            rank = first[expert] // saved_spr
            if rank not in files:
                files[rank] = torch.load(folder / f"layer_{layer.layer_id:04d}.ep_{rank:04d}.pt",
                                         weights_only=False)
            entry = files[rank][expert]
            for name, param in plist:
                param.data.copy_(entry["weights"][name].to(device))
                tensors = {k: v.to(device) for k, v in entry["optim"][name].items()}
                if "param" not in tensors:
                    tensors["param"] = param.data.reshape(-1).float()
                hook.access.write(param, tensors)
        windows.append(meta["window"])
    mark_duplicates(hook.layers, hook.access)
    if windows:
        hook.window.load_state_dict({
            "steps": windows[0]["steps"],
            "recent": [torch.stack([w["recent"][k] for w in windows])
                       for k in range(min(len(w["recent"]) for w in windows))],
            "ema": torch.stack([w["ema"] for w in windows]),
        })
