"""The one exception type the project raises for problems a user can fix.

The CLI catches `MTError` and prints its message without a traceback; anything
else is a bug and keeps its traceback.
"""


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
