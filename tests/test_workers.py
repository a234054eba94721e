"""mt.workers: how a forked worker starts, and where workers are forked at all."""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.synchronize import Event
from queue import Queue

import pytest

from mt.workers import FORKS, WorkerPool, can_fork_workers, fork_context, start_worker

pytestmark = pytest.mark.skipif(not FORKS, reason="workers are forked on Linux only")


def _work(parent: int, started: Event) -> None:
    start_worker(parent)
    started.set()
    time.sleep(60)


def test_a_worker_ignores_ctrl_c_and_ends_at_sigterm():
    # Ctrl-C reaches the whole process group: the parent stops the run and ends its pool, whose
    # SIGTERM (Pool.terminate) must end a worker at once.
    context = fork_context()
    started = context.Event()
    worker = context.Process(target=_work, args=(os.getpid(), started))
    worker.start()
    try:
        assert started.wait(30)
        os.kill(worker.pid, signal.SIGINT)
        worker.join(0.5)
        assert worker.is_alive()
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(10)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        worker.kill()
        worker.join()


def _report(queue: Queue) -> None:
    queue.put(can_fork_workers())


def test_workers_are_not_forked_from_a_daemonic_process():
    assert can_fork_workers()
    context = fork_context()
    queue = context.Queue()
    daemon = context.Process(target=_report, args=(queue,), daemon=True)  # as the server's decoder
    daemon.start()
    try:
        assert queue.get(timeout=30) is False
    finally:
        daemon.join(10)


def _square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x


def _nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_worker_pool_answers_through_futures_and_its_shutdown_does_not_wait():
    pool = WorkerPool(2, start_worker, (os.getpid(),))
    try:
        assert [f.result(timeout=30) for f in [pool.submit(_square, x) for x in range(5)]] == [0, 1, 4, 9, 16]
        with pytest.raises(ValueError, match="negative: -3"):
            pool.submit(_square, -3).result(timeout=30)
        busy = pool.submit(_nap, 60)
        time.sleep(0.5)  # it runs
    finally:
        t = time.monotonic()
        pool.shutdown(wait=True)
    assert time.monotonic() - t < 10 and not busy.done()  # ended, not waited for
