"""The one exception type the project raises for problems a user can fix.

The CLI catches `MTError` and prints its message without a traceback; anything
else is a bug and keeps its traceback. Also how to find a full disk behind another
library's exception (torch's zip writer and `datasets` wrap the OSError).
"""

from __future__ import annotations

import errno

# The errors of a full disk (or a full quota).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def exception_chain(e: BaseException) -> list[BaseException]:
    """An exception and those it was raised from or during, outermost first."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    return chain


def disk_full(e: BaseException) -> OSError | None:
    """The OSError of a full disk behind `e` (itself, its cause or what it was raised during)."""
    return next(
        (x for x in exception_chain(e) if isinstance(x, OSError) and x.errno in DISK_FULL), None
    )


class MTError(Exception):
    """A user-facing error: bad config, bad input file, missing data, bad checkpoint."""


class ConfigError(MTError):
    """A config file or command-line override is invalid."""


class DataError(MTError):
    """An input corpus or prepared cache is invalid."""


class CheckpointError(MTError):
    """A checkpoint file is missing, truncated or not one of ours."""


class ExportError(MTError):
    """A model cannot be exported in the format asked for, or a directory is not an export of ours."""
