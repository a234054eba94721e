"""File operations every command shares: reading text lines, atomic writes, stale temp files.

Reading. `decode_lines` / `read_lines` split UTF-8 text on "\\n" only (a trailing "\\r"
is removed from each line; other Unicode line breaks stay inside their line), so N
lines in a file are N lines here whatever they contain.

Writing. `AtomicFile` writes `<name>.tmp-<pid>` next to the target (os.replace is
atomic only within one file system), fsyncs it and renames it over the target, then
fsyncs the directory so the rename itself survives a crash: readers see the old file
or the complete new one, never half of one. That is for regular files, also one reached
through a symlink (the target is replaced; the link stays). Anything else that exists
(a FIFO, a terminal, /dev/null, /dev/stdout) is written in place. `replace_dir` does
the same for a whole directory. Temporary names end in `-<pid>`, so `remove_stale` can
clear away those of processes that were killed, and only those.

`-` as a path is standard input to `read_lines`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import sys
import weakref
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from mt.errors import DataError, MTError

BOM = "\ufeff"


# --------------------------------------------------------------------------- reading


def decode_lines(data: bytes, where: str, errors: str = "strict", hint: str = "") -> list[str]:
    """UTF-8 bytes -> lines, split on "\\n" only, a trailing "\\r" removed from each.

    `where` names the input in error messages (a file name or "stdin"); `hint`
    is appended to the message of an undecodable byte (e.g. which option helps).
    """
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_no = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{where}: line {line_no} is not valid UTF-8 (byte 0x{data[e.start]:02x} at byte "
            f"{e.start - line_start + 1} of the line){hint}"
        ) from None
    text = text.removeprefix(BOM)  # editors on Windows like to start UTF-8 files with one
    if not text:
        return []
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


STDIO = "-"  # as a path: standard input (read_lines) or output (the commands' --output)


def read_stdin() -> bytes:
    """All of standard input; a closed one (`<&-`) raises DataError."""
    if sys.stdin is None:  # Python's stand-in for a descriptor 0 that was closed at start-up
        raise DataError("no standard input (it is closed): name an input file instead")
    return sys.stdin.buffer.read()


def read_lines(path: str | Path, errors: str = "strict", hint: str = "") -> list[str]:
    """The lines of a UTF-8 text file (see `decode_lines`), or of standard input for `-`;
    unreadable files raise DataError."""
    if str(path) == STDIO:
        return decode_lines(read_stdin(), "stdin", errors, hint)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"input file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_lines(data, str(path), errors, hint)


# --------------------------------------------------------------------------- temporary names


def temp_path(path: Path, tag: str = "tmp", hidden: bool = False) -> Path:
    """`<name>.<tag>-<pid>` beside `path` (`.<name>...` when hidden): this process's own."""
    return path.with_name(f"{'.' if hidden else ''}{path.name}.{tag}-{os.getpid()}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale(directory: Path, pattern: str) -> None:
    """Remove the files and directories matching `pattern` in `directory` whose name ends in
    `-<pid>` of a process that no longer runs: leftovers of runs that were killed."""
    for p in directory.glob(pattern):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- writing


def _fsync_dir(directory: Path) -> None:
    # Some file systems refuse fsync on a directory; the file is complete either way.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _via_proc(path: Path) -> bool:
    """Whether `path` leads through /proc, as /dev/stdout, /dev/fd/N and /proc/self/fd/N do:
    links to a file this process has open (a redirected stdout, say), which must be written
    there and then, not replaced by a new file of the name the link gives."""
    p = Path(os.path.realpath(path.parent)) / path.name
    for _ in range(40):  # the kernel's own limit on the links it follows
        if p.parts[1:2] == ("proc",):
            return True
        try:
            link = os.readlink(p)
        except OSError:  # not a link (or not there): the end of the chain
            return False
        q = Path(os.path.normpath(p.parent / link))
        p = Path(os.path.realpath(q.parent)) / q.name
    return False


class AtomicFile:
    """A file that appears at `path` complete or not at all.

    The temporary file is created on construction, so an unwritable path fails before
    any (long) work is done; write to `.file`, then `commit` fsyncs it and renames it
    over `path`. Leaving the `with` block without a commit (an error, Ctrl-C) removes
    the temporary file and leaves an existing `path` untouched, and so does dropping the
    object before the block began: Ctrl-C or SIGTERM (mt.cli raises it as an exception) may
    land between the file's creation and the `with`, where no __exit__ would run. I/O
    failures raise `error` (an MTError class): "cannot <action> <path>: <reason>".

    Through a symlink, the link's target is what is replaced (the temporary file goes in
    the target's directory), and the link stays a link. A path that exists and is not a
    regular file (a FIFO, a character device, a socket) or leads through /proc is opened
    and written in place (`direct`): renaming a file over it would replace the device
    or the pipe, whose reader would wait forever. It is opened for appending, which for
    a pipe or a device is plain writing, and which keeps what a redirected stdout
    (`>> log`, or a header written before) already holds.
    """

    def __init__(
        self, path: str | Path, action: str = "write output", error: type[MTError] = MTError
    ) -> None:
        self.path, self.action, self.error = Path(path), action, error
        if self.path.is_dir():
            raise error(f"cannot {action} {self.path}: it is a directory")
        try:
            mode = self.path.stat().st_mode  # of the link's target, for a link
        except FileNotFoundError:  # a new file (also a dangling link's target), or no directory
            mode = stat.S_IFREG
        except OSError as e:  # e.g. a loop of links
            raise self._failed(e) from None
        self.direct = not stat.S_ISREG(mode) or _via_proc(self.path)
        self.target = self.path if self.direct else Path(os.path.realpath(self.path))
        self.tmp = self.path if self.direct else temp_path(self.target)
        self._open = False
        # Before the file exists: whenever this object goes, an uncommitted temporary file goes too.
        self._remove_tmp = weakref.finalize(self, _remove, None if self.direct else self.tmp)
        try:
            self.file: BinaryIO = open(self.tmp, "ab" if self.direct else "wb")  # closed by commit or discard
        except OSError as e:
            raise self._failed(e) from None
        self._open = True

    def _failed(self, e: OSError | RuntimeError) -> MTError:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        return self.error(f"cannot {self.action} {self.path}: {reason}")

    def commit(self, data: bytes | None = None) -> None:
        """Write `data` (if given) after what was written, and put the file in place."""
        try:
            with self.file as f:
                if data is not None:
                    f.write(data)
                f.flush()
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # pipes and devices refuse fsync
                    os.fsync(f.fileno())
            if not self.direct:
                os.replace(self.tmp, self.target)
            self._open = False
            self._remove_tmp.detach()
        except OSError as e:
            self.discard()
            raise self._failed(e) from e
        if not self.direct:
            _fsync_dir(self.target.parent)

    def discard(self) -> None:
        self._open = False
        # Closing flushes what is buffered, which fails again on a full disk; the file is closed
        # all the same, and what it held is being thrown away.
        with contextlib.suppress(OSError):
            self.file.close()
        self._remove_tmp()

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._open:  # not committed: an error, Ctrl-C, or the caller forgot
            self.discard()


def file_above(path: Path) -> Path | None:
    """The nearest existing parent of `path` when it is not a directory (a file where a directory
    must be, which mkdir reports as "File exists" or "Not a directory"); None otherwise."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _remove(tmp: Path | None) -> None:
    """Remove an AtomicFile's temporary file; None for a path written in place, the user's."""
    if tmp is not None:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see AtomicFile)."""
    with AtomicFile(path) as out:
        out.commit(text.encode("utf-8"))


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the complete directory `tmp` in the place of `out` (which may not exist).

    Two renames, so a crash between them leaves no `out` (and the old one beside it,
    removed later by `remove_stale`), never a mixture of old and new files.
    """
    old = temp_path(out, "old", hidden=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- one user per directory


class DirectoryLock:
    """An exclusive lock on a directory for one `mt` run, which dies with its holder.

    `flock` on `lock` (default `<directory>/.lock`; beside the directory for one that is
    replaced whole): the kernel releases it when the process ends, however it ends (SIGKILL
    included), so a killed run never leaves a stale lock. The holder writes its PID and
    command into the file, so a second run can say who holds it. `what` names the
    directory's role in the error (e.g. "train.out_dir").
    """

    def __init__(self, directory: Path, what: str, lock: Path | None = None) -> None:
        self.directory, self.what = Path(directory), what
        self.lock = lock or self.directory / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        path = self.lock
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise MTError(f"{self.what}: cannot write to {self.directory}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise MTError(
                    f"{self.what}: {self.directory} is in use by {holder}; wait for it to finish, "
                    f"or use another directory"
                ) from None
            # The holder before us removes the file as it lets go: if it did so between our open
            # and our lock, we hold a lock on a file nobody else will look at. Try again.
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} ({' '.join(['mt', *sys.argv[1:]])[:300]})\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (closing the descriptor does)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                self.lock.unlink()
            os.close(fd)

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
