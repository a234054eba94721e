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
from collections.abc import Callable
from concurrent.futures import Executor, Future
from multiprocessing.context import BaseContext
from typing import Any

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


class WorkerPool(Executor):
    """`workers` forked processes (a multiprocessing Pool, each started by `initializer`) behind
    the Executor interface of mt.translate.lines.decode_in_batches. `shutdown` ends them at once,
    whatever they are doing (Pool.terminate): after the last result that costs nothing, and
    after an error, Ctrl-C or SIGTERM nothing waits for the tasks in hand. Its workers are
    daemonic, so that a parent interrupted while it was still starting them ends them as it
    exits. (A concurrent.futures.ProcessPoolExecutor, whose workers are not daemonic, hung a
    SIGTERMed `mt translate` at exit now and then: its shutdown waits for them.)"""

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple) -> None:
        self._pool = fork_context().Pool(workers, initializer, initargs)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._pool.apply_async(fn, args, kwargs, future.set_result, future.set_exception)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.terminate()
        if wait:
            self._pool.join()
