"""User-facing errors.

Anything a user can fix (a config key, a path, a frame count) raises a `FastcogError` whose
message says what to change. The CLI prints it as one line and exits non-zero; anything
else is a bug and keeps its traceback.
"""


class FastcogError(Exception):
    """An error the user can fix; the message says how."""


class ConfigError(FastcogError):
    """A bad config key or value."""


class DataError(FastcogError):
    """A missing, mismatched or undecodable data file."""


class ModelError(FastcogError):
    """A missing or malformed model folder."""
