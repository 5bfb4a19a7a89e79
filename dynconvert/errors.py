"""The one error type users see: a one-line message that names the problem and what to do."""


class DynError(Exception):
    """A user-facing failure. The CLI prints ``error: <message>`` and exits non-zero, no traceback."""

    exit_code = 2


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), short enough for a one-line error."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
