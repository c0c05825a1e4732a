"""How a value from a request is quoted back in an error or a log line: at most 80 characters, plus its length.

A 1 MB form field must not come back as a 1 MB error answer and a 1 MB log line per request. ``repr`` is
applied to the shown part, so newlines and control characters cannot forge log lines.
"""

from __future__ import annotations

from typing import Any

ECHO_LIMIT = 80
"""Characters of a request value shown in an error or a log line."""


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` when its text is at most ``limit`` characters, else ``'<first limit>...' (N chars)``.

    The text is the value itself for strings and its ``repr`` for anything else; ``N`` is its length.
    """
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    shown = repr(text[:limit])
    return f"{shown[:-1]}...{shown[-1]} ({len(text)} chars)"
