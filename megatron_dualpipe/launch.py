"""Start the worker processes on one machine, or join a job started by torchrun/Slurm."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

_JOB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def in_launched_job() -> bool:
    """True when torchrun (or our own launcher) already set this process's rank."""
    return all(v in os.environ for v in _JOB_VARS)


def adopt_slurm_env() -> None:
    """Map `srun`-per-task variables onto torchrun's, when torchrun is not used."""
    if in_launched_job() or "SLURM_PROCID" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(argv: list[str], nproc: int) -> int:
    """Run `python -m megatron_dualpipe <argv>` in `nproc` processes; returns the exit code.

    If one worker fails, the others are stopped and its exit code is returned.
    """
    port = os.environ.get("MASTER_PORT") or str(free_port())
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_dualpipe", *argv], env=env))
    code = 0
    try:
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc != 0 and code == 0:
                    code = rc
                    for other in procs:
                        other.send_signal(signal.SIGTERM)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        return 130
    return code
