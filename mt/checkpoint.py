"""Checkpoint files: atomic saving, safe loading, RNG state capture, pruning.

A checkpoint is a dict saved with `torch.save` and loaded with `weights_only=True`, so
loading a file never runs code from it. That restricts what a state may contain to
plain data: tensors, dict/OrderedDict, list, tuple, str, int, float, bool, None, bytes,
complex, torch.Size/dtype/device. Bytes are accepted by torch's weights-only loader,
so e.g. a SentencePiece model proto can be stored as raw `bytes`. NumPy arrays and
scalars are not plain data (np.float64 even passes isinstance(x, float)), so
`save_checkpoint` checks the state first and names the offending key.

`save_checkpoint` adds two keys, `"format": "mt-checkpoint"` and `"version"`, by which
`load_checkpoint` recognises our files.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mt.errors import CheckpointError, disk_full
from mt.files import AtomicFile

FORMAT = "mt-checkpoint"
VERSION = 1

# Exact types (not subclasses: numpy scalars and namedtuples subclass these but are
# rejected by the weights-only unpickler).
_CONTAINERS = (dict, OrderedDict, list, tuple)
_LEAVES = (
    str,
    int,
    float,
    bool,
    type(None),
    bytes,
    bytearray,
    complex,
    torch.Size,
    torch.dtype,
    torch.device,
)


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor) or type(obj) in _LEAVES:
        return
    if type(obj) not in _CONTAINERS:
        raise TypeError(
            f"checkpoint state {where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
            f"torch.load(weights_only=True) cannot read; convert it to a tensor or plain Python data"
        )
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
    else:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (mt.files.AtomicFile): readers see the old file
    or the complete new one.

    I/O failures (unwritable or missing directory, disk full) raise CheckpointError; the
    temp file is removed and an existing checkpoint at `path` is left untouched. A state
    holding non-plain data raises TypeError (a bug).
    """
    path = Path(path)
    if state.get("format", FORMAT) != FORMAT:
        raise ValueError(f"the 'format' key is reserved for {FORMAT!r}, got {state['format']!r}")
    # A loaded checkpoint already has format/version keys: re-saving it (e.g. after
    # averaging) stamps it with the current version.
    body = {k: v for k, v in state.items() if k not in ("format", "version")}
    full = {"format": FORMAT, "version": VERSION, **body}
    _check_plain(full, "state")

    try:
        with AtomicFile(path, "save checkpoint", CheckpointError) as out:
            torch.save(full, out.file)
            out.commit()
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot save checkpoint {path}: {_write_failure(e)}") from e


def _write_failure(e: OSError | RuntimeError) -> str:
    """Why a checkpoint could not be written, in the system's words. torch's zip writer turns
    the OSError of our file's write into "enforce fail at inline_container.cc ... unexpected
    pos", raised during it: the errno is found on the exception chain."""
    full = disk_full(e)
    if full is not None and full.errno is not None:  # disk_full found one of DISK_FULL's errnos
        return os.strerror(full.errno)  # "No space left on device", "Disk quota exceeded"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _refused(message: str) -> str:
    """What torch's weights-only unpickler refused, in a few words, without its advice."""
    name = re.search(r"GLOBAL ([\w.]+[\w])", message)
    if name:
        return f"it refers to {name.group(1)}"
    opcode = re.search(r"Unsupported operand (\d+)", message)
    if opcode:
        return f"it uses pickle opcode {opcode.group(1)}"
    return "it holds objects other than tensors and plain Python data"


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(
        f"cannot read checkpoint {path}: truncated, corrupt, or not a plain-data PyTorch file "
        f"({type(e).__name__}: {first_line})"
    )


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; anything else raises CheckpointError."""
    path = Path(path)
    if path.is_dir():
        inside = [path / name for name in ("checkpoint_best.pt", "checkpoint_last.pt")]
        found = [str(p) for p in inside if p.is_file()]
        raise CheckpointError(
            f"checkpoint {path} is a directory; pass a checkpoint file"
            + (f", e.g. {found[0]}" if found else "")
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e):
            raise _unreadable(path, e) from e
        # torch's message advises loading with weights_only=False, which runs any code the
        # file holds: not advice to pass on for a file that is not what it should be.
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a plain-data PyTorch file ({_refused(str(e))}); "
            f"mt never unpickles code, so it cannot load this file"
        ) from e
    except Exception as e:  # torch reports bad files as RuntimeError, UnpicklingError, KeyError, ...
        raise _unreadable(path, e) from e
    if (
        not isinstance(state, dict)
        or state.get("format") != FORMAT
        or not isinstance(state.get("version"), int)
    ):
        raise CheckpointError(f"{path} is a PyTorch file but not an mt checkpoint (no 'format': '{FORMAT}')")
    if state["version"] > VERSION:
        raise CheckpointError(
            f"{path} is checkpoint version {state['version']}; this code reads up to version {VERSION}"
        )
    return state


# --------------------------------------------------------------------------- RNG state


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The Python, NumPy (global) and torch CPU generator states, and that of `device` when it
    is a GPU (only that one: each rank owns one GPU, and a CPU run never initialises CUDA),
    as plain data."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple), "the global NumPy generator is MT19937: legacy=True gives a tuple"
    _, keys, pos, has_gauss, cached = numpy_state
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` captured, the GPU generator's on `device` (if a GPU).

    Generator states must be CPU byte tensors, so states loaded with map_location="cuda"
    are moved back first. Checkpoints of older versions hold a list of every visible GPU's
    state: the one at the device's index is taken.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and device is not None and device.type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):
            cuda = cuda[device.index or 0] if len(cuda) > (device.index or 0) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu(), device)


# --------------------------------------------------------------------------- step checkpoints

_STEP_NAME = re.compile(r"checkpoint_step(\d+)\.pt")


def step_checkpoint_path(out_dir: Path | str, step: int) -> Path:
    return Path(out_dir) / f"checkpoint_step{step}.pt"


def step_checkpoints(out_dir: Path | str) -> list[tuple[int, Path]]:
    """(step, path) of the `checkpoint_step{N}.pt` files in out_dir, oldest step first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = _STEP_NAME.fullmatch(p.name)  # fullmatch: skips `.tmp-<pid>` files mid-save
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def keep_last(out_dir: Path | str, k: int) -> list[Path]:
    """Delete all but the k highest-step `checkpoint_step{N}.pt` files; return the deleted paths.

    k = 0 deletes them all. Other files (checkpoint_best.pt, checkpoint_last.pt, ...) are
    never touched.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    found = step_checkpoints(out_dir)
    doomed = [p for _, p in found[: max(len(found) - k, 0)]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
