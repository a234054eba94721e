"""mt.files: what AtomicFile replaces and what it writes in place (links, FIFOs, devices, /proc),
and `-` as standard input."""

from __future__ import annotations

import io
import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from mt.errors import DataError
from mt.files import AtomicFile, read_lines, write_atomic

# --------------------------------------------------------------------------- interrupted


def test_an_atomic_file_dropped_before_its_with_block_removes_its_temporary_file(tmp_path):
    # What SIGTERM (an exception, see mt.cli) or Ctrl-C does when it lands between the creation
    # of the temporary file and the `with`: no __exit__ runs, the object is dropped.
    out = tmp_path / "out.txt"
    out.write_text("precious\n")
    pending = AtomicFile(out)
    pending.file.write(b"partial")
    assert len(os.listdir(tmp_path)) == 2
    del pending
    assert os.listdir(tmp_path) == ["out.txt"] and out.read_text() == "precious\n"

    committed = AtomicFile(out)
    committed.commit(b"new\n")
    del committed
    assert os.listdir(tmp_path) == ["out.txt"] and out.read_text() == "new\n"


# --------------------------------------------------------------------------- symlinks


def test_symlink_to_a_file_replaces_the_target_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.txt"
    target.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(Path("real") / "out.txt")  # relative, as links usually are

    write_atomic(link, "new\n")
    assert link.is_symlink() and os.readlink(link) == str(Path("real") / "out.txt")
    assert target.read_text() == "new\n"
    assert sorted(os.listdir(tmp_path)) == ["link.txt", "real"]
    assert os.listdir(tmp_path / "real") == ["out.txt"]  # the temporary file went there, and went

    with pytest.raises(RuntimeError), AtomicFile(link) as out:  # a failure leaves both as they were
        out.file.write(b"partial")
        raise RuntimeError
    assert link.is_symlink() and target.read_text() == "new\n"
    assert os.listdir(tmp_path / "real") == ["out.txt"]


def test_dangling_symlink_gets_its_target_created(tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "real" / "new.txt")

    write_atomic(link, "fresh\n")
    assert link.is_symlink()
    assert (tmp_path / "real" / "new.txt").read_text() == "fresh\n"


# --------------------------------------------------------------------------- written in place


def test_fifo_is_written_in_place_for_its_reader(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # A second name for the FIFO: if the writer replaced `pipe`, the reader below would wait for
    # a writer forever; opening this name lets it go, so the test fails instead of hanging.
    spare = tmp_path / "same-pipe"
    os.link(fifo, spare)
    data = os.urandom(200_000)  # more than a pipe holds: the reader must read as the writer writes
    received: list[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as f:
            received.append(f.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    with AtomicFile(fifo) as out:
        out.commit(data)
    thread.join(timeout=30)
    if thread.is_alive():
        os.close(os.open(spare, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
    assert received == [data]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe", "same-pipe"]


def _char_device(tmp_path: Path) -> Path:
    """/dev/null, or for root a twin of it in tmp_path: a writer that replaced what it writes
    would replace the machine's /dev/null, as root."""
    if os.geteuid() != 0:
        return Path("/dev/null")
    twin = tmp_path / "null"
    try:
        os.mknod(twin, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("root without the right to make device files: not risking /dev/null")
    return twin


def test_character_device_is_written_in_place(tmp_path):
    device = _char_device(tmp_path)
    write_atomic(device, "into the void\n")
    assert stat.S_ISCHR(os.lstat(device).st_mode)

    with pytest.raises(RuntimeError), AtomicFile(device):  # an unfinished write does not remove it
        raise RuntimeError
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert sorted(os.listdir(tmp_path)) == (["null"] if device.parent == tmp_path else [])


def test_a_path_through_proc_is_appended_to_the_open_file(tmp_path):
    """As /dev/stdout is, when stdout is redirected to a file (`>> log.txt`): that file is
    written, after what it holds, not replaced by a new one (which the shell's descriptor
    would not see)."""
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\n")
    inode = log.stat().st_ino
    with open(log, "ab") as f:
        write_atomic(f"/proc/self/fd/{f.fileno()}", "hello\n")
    assert log.read_bytes() == b"earlier\nhello\n"
    assert log.stat().st_ino == inode
    assert os.listdir(tmp_path) == ["log.txt"]


# --------------------------------------------------------------------------- reading


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def test_dash_reads_standard_input(monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Stdin(b"eins\r\nzwei\n"))
    assert read_lines("-") == ["eins", "zwei"]


def test_closed_standard_input_is_a_data_error(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python makes of a closed descriptor 0
    with pytest.raises(DataError, match="no standard input"):
        read_lines("-")
