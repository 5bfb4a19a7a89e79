"""The one error type users see: a one-line message that names the problem and what to do."""


class DynError(Exception):
    """A user-facing failure. The CLI prints ``error: <message>`` and exits non-zero, no traceback."""

    exit_code = 2
