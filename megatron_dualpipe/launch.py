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


def _exit_code(rc: int) -> int:
    """A worker's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - rc if rc < 0 else rc


def spawn_local(argv: list[str], nproc: int) -> int:
    """Run `python -m megatron_dualpipe <argv>` in `nproc` processes; returns the exit code.

    - Workers die with this process, however it dies (`lifetime.die_with_parent`).
    - SIGTERM and SIGUSR1 are passed on: the workers checkpoint at the next step end and exit 0.
    - Ctrl-C ends every worker at once; one line says so. The workers run in their own process
      group, so the terminal's SIGINT reaches only this process (no traceback from any rank).
    - If one worker fails, the others are killed and its exit status is returned.

    torchrun's elastic agent is not used: it starts workers in their own sessions without a
    parent-death signal, so a SIGKILLed agent leaves them training.
    """
    from megatron_dualpipe.lifetime import LAUNCHER_PID_VAR, STOP_SIGNALS

    port = os.environ.get("MASTER_PORT") or str(free_port())
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    try:
        for rank in range(nproc):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            env[LAUNCHER_PID_VAR] = str(os.getpid())
            procs.append(subprocess.Popen([sys.executable, "-m", "megatron_dualpipe", *argv],
                                          env=env, process_group=0))
        return _wait(procs)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop(procs, signal.SIGKILL, grace_s=5.0)
        print("megatron-dualpipe train: interrupted (Ctrl-C); all ranks stopped", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(procs: list[subprocess.Popen]) -> int:
    """Wait for every worker; on the first failure kill the rest and return its status."""
    running = list(procs)
    while running:
        for p in list(running):
            rc = p.poll()
            if rc is None:
                continue
            running.remove(p)
            if rc != 0:
                _stop(running, signal.SIGKILL, grace_s=5.0)
                rank = procs.index(p)
                print(f"megatron-dualpipe train: rank {rank} exited with status "
                      f"{_exit_code(rc)}; stopped the other ranks", file=sys.stderr)
                return _exit_code(rc)
        time.sleep(0.1)
    return 0


def _stop(procs: list[subprocess.Popen], signum: int, grace_s: float) -> None:
    """Send `signum` to the running workers; SIGKILL those still running after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
