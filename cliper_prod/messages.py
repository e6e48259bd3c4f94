"""How the package quotes things back in one-line messages: a client's ids and paths cut short,
and the first line of a library's exception.

Every ``error:`` line, per-item record and HTTP answer that echoes input goes through here, so
a 1 MB id or a ten-line traceback text never becomes a 1 MB or ten-line message.
"""

from __future__ import annotations

from collections.abc import Sequence

ECHO_CHARS = 200  # an id or a path quoted back in a message is cut to this many characters


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters (marked with an ellipsis)."""
    return text if len(text) <= limit else text[:limit] + "…"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of ``exc``'s message, cut short; its class name when the message
    is empty (libraries raise both)."""
    lines = str(exc).strip().splitlines()
    return shorten(lines[0].strip(), limit) if lines else type(exc).__name__


def preview_ids(ids: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``ids``, each quoted and cut short, and how many more there are."""
    shown = ", ".join(repr(shorten(i)) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
