"""Worker process lifetime: die with the launcher, stop cleanly on SIGTERM/SIGUSR1, quiet Ctrl-C.

A worker (one rank of a job) calls `init_worker()` first. Then:

- If its parent (our launcher, or torchrun's agent) dies, however it dies, SIGKILL included,
  the kernel kills the worker too (Linux `PR_SET_PDEATHSIG`). torchrun does not do this: its
  agent starts workers in their own sessions and only stops them when it exits normally.
- SIGTERM (Slurm preemption, `scancel`) and SIGUSR1 (`sbatch --signal=USR1@120`) only set a
  flag; the training loop calls `StopRequest.check()` at every step end, which all-reduces the
  flag so that all ranks stop after the same step, save a checkpoint and exit 0.
- SIGINT (Ctrl-C) ends the worker at once, without a traceback; the launcher prints one line.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
LAUNCHER_PID_VAR = "MDP_LAUNCHER_PID"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def die_with_parent(expected_parent: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits; False if unsupported.

    If `expected_parent` is given and is no longer the parent (it died before the request was
    made), exit at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the launcher is already gone
    return True


class StopRequest:
    """The stop signal received by this process, agreed on by all ranks at step ends."""

    def __init__(self):
        self.signum = 0

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.signum = signum

    def check(self, device) -> str | None:
        """Collective: the name of the signal any rank received, or None (all ranks agree)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        return signal.Signals(signum).name if signum else None


STOP = StopRequest()


def init_worker() -> None:
    """Signal set-up of a worker process (see the module docstring)."""
    launcher = os.environ.get(LAUNCHER_PID_VAR)
    die_with_parent(int(launcher) if launcher else None)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    STOP.install()
