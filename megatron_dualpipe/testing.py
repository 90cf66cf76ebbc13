"""Run a function in N local gloo processes (Megatron's own test utilities assume NCCL).

    results = run_distributed(fn, world_size=4, args=(recipe_dict,))

`fn(*args)` runs in every process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set; the list of
return values (picklable) is returned in rank order. An exception in any process is
re-raised here with that process's traceback.
"""

from __future__ import annotations

import io
import os
import traceback

import torch
import torch.multiprocessing as mp

from megatron_dualpipe.launch import free_port


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        # Serialized to bytes: tensors in the result must outlive this process.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 600.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get()
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
