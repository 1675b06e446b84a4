"""Errors that the command line turns into one-line messages and exit codes."""

from __future__ import annotations


class StreamerError(Exception):
    """An expected failure: shown as one line, no traceback."""

    exit_code = 1


class UsageError(StreamerError):
    """Bad input from the user (arguments, configuration, dates, CSV): exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file that is malformed or inconsistent."""

    def __init__(self, source: str, key: str, value: object, expected: str) -> None:
        self.source = source
        self.key = key
        self.value = value
        self.expected = expected
        shown = "(missing)" if value is _MISSING_VALUE else repr(value)
        super().__init__(f"{source}: {key} = {shown}: expected {expected}")


class LedgerLockedError(StreamerError):
    """Another service already writes this ledger."""


_MISSING_VALUE = object()
MISSING_VALUE = _MISSING_VALUE
