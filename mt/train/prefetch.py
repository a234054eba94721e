"""Work done ahead on a background thread: the trainer's next batches, collated (and pinned)
while the device computes the current update.

The items and their order are those of the wrapped iterator, whatever the timing: a
prefetched run is the same run. Collating is numpy and page-locked copies, which release
the GIL for the parts that take time, so one thread is enough to stay ahead of a GPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")

_END = object()


class Prefetcher(Generic[T, U]):
    """Iterate `make(item)` for each item of `items`, computed up to `depth` items ahead.

    threaded=False computes each when it is asked for, on the caller's thread: the same
    items, for a CPU whose cores are all busy with the training itself (a thread of our own
    would take one from torch's threads mid-operation and stall them all).

    An exception raised by `items` or `make` is raised again by `next()` in the consumer, at
    the item where it happened. `close()` stops the thread (it is a daemon thread as well, so
    that a process that ends without closing never waits for it).
    """

    def __init__(
        self, items: Iterator[T], make: Callable[[T], U], depth: int = 2, threaded: bool = True
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._items, self._make = items, make
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="mt-prefetch", daemon=True)
            self._thread.start()

    def _put(self, entry: object) -> bool:
        """Queue `entry`, waiting for room; False once close() was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((item, self._make(item))):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)
            return
        self._put(_END)

    def __iter__(self) -> Prefetcher[T, U]:
        return self

    def __next__(self) -> tuple[T, U]:
        """The next (item, make(item))."""
        if self._thread is None:
            item = next(self._items)
            return item, self._make(item)
        entry = self._queue.get()
        if entry is _END:
            raise StopIteration
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
