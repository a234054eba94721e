"""Forked worker processes: how one starts, for every pool of them (`mt prepare`'s encoders,
the Translator's decoders on a CPU).

A worker is forked, so it has its parent's memory (a model, an encoder) without a copy or a
pickle. It must not outlive its parent, nor take part in the parent's handling of Ctrl-C and
SIGTERM: the parent stops the run and ends its pool.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.context import BaseContext

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Pools of workers fork only on Linux: macOS's system libraries are not safe to use in a forked
# child, and Windows has no fork.
FORKS = sys.platform == "linux"


def can_fork_workers() -> bool:
    """Whether this process may start a pool of forked workers: on Linux (FORKS), and not from
    a daemonic process, which multiprocessing allows no children (the server's decoder)."""
    return FORKS and not multiprocessing.current_process().daemon


def fork_context() -> BaseContext:
    return multiprocessing.get_context("fork")


def start_worker(parent_pid: int) -> None:
    """First thing in a worker process: have Linux SIGKILL it when its parent ends, however it
    ends (a SIGKILLed parent must not leave its pool waiting for work). Linux sends the signal
    when the *thread* that forked ends: a pool is made by the thread that uses it."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # it died before the prctl: no signal will come
            os.kill(os.getpid(), signal.SIGKILL)
    # Ctrl-C reaches the whole process group: the parent handles it and ends the pool, whose
    # SIGTERM must then end a worker at once, not run the handler the CLI gave the parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
