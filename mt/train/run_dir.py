"""A run's directory (train.out_dir): one run at a time, and writable before anything is built."""

from __future__ import annotations

import os
from pathlib import Path

from mt.errors import MTError
from mt.files import DirectoryLock, remove_stale
from mt.train.distributed import Dist


def claim_out_dir(out: Path, dist: Dist) -> DirectoryLock | None:
    """Rank 0 locks the run directory and checks that it can write there; temporary files
    of runs killed mid-save (never checkpoints) are cleared away. Returns the lock (None on
    other ranks)."""
    lock = None
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MTError(f"train.out_dir: cannot write to {out}: {e.strerror or e}") from None
        lock = DirectoryLock(out, "train.out_dir")
        lock.acquire()
        try:
            remove_stale(out, "*.pt.tmp-*")
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            lock.release()
            raise MTError(f"train.out_dir: cannot write to {out}: {e.strerror or e}") from None
    dist.barrier()
    return lock
