"""The one codec of every file of ids the package writes or reads: a bundle's ``item_ids.txt``
and ``user_ids.txt``, the ``item_ids.txt`` of an ``embed`` folder (``add-items --features``,
``train --features cliper``) and ``add-items``' own work folders.

A file of ids is UTF-8 text, one id per line, each line ended by ``"\\n"``. Python's
``str.splitlines`` and other line readers also break lines at ``\\r``, ``\\x0b``, ``\\x0c``,
``\\x1c``-``\\x1e``, ``\\x85``, U+2028 and U+2029, so an id holding any of these would turn into
two ids for one row in some reader and silently shift every later id onto another item's row.
Such ids are refused where they come in (:func:`id_problem`: a catalog record's error, an
MMRec mapping's bad line), never written (:func:`write_ids`), and a file read back must hold
exactly as many ids as the table it is paired with has rows (:func:`read_ids`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cliper_prod.errors import DataError
from cliper_prod.io import write_text

#: every character a line reader may break a line at (``str.splitlines``' set)
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an id in a file of ids (empty, padded, or holding a line
    break), or None."""
    if not value or value != value.strip():
        return "an empty id, or one with surrounding whitespace"
    breaks = sorted({f"U+{ord(c):04X}" for c in value if c in LINE_BREAKS})
    if breaks:
        return f"the id holds a line-breaking character ({', '.join(breaks)})"
    return None


def write_ids(path: str | os.PathLike[str], ids: Sequence[object]) -> None:
    """Write ``ids`` one per line, atomically; an id :func:`id_problem` refuses is a bug of
    the caller (ids are checked where they enter), raised as a ValueError."""
    text = [str(i) for i in ids]
    for n, value in enumerate(text, 1):
        problem = id_problem(value)
        if problem:
            raise ValueError(f"{path}: id {n} {value!r}: {problem}")
    write_text(path, "".join(f"{i}\n" for i in text))


def read_id_lines(path: Path, rows: int | None = None) -> list[str]:
    """The lines of a file of ids, each id unchecked (a caller may make a bad one that item's
    error), the file checked: UTF-8 and (``rows`` given) as many lines as
    the rows of the table paired with them. Problems are a
    :class:`~cliper_prod.errors.DataError` naming the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(path, f"cannot be read ({exc.strerror})") from None
    ids = text.split("\n")
    if ids[-1] == "":  # the line ending of the last line (which may lack it)
        ids.pop()
    if rows is not None and len(ids) != rows:
        raise DataError(path, f"{len(ids)} ids for {rows} rows of the table they name: ids and "
                              f"rows must pair one to one")
    return ids


def read_ids(path: Path, rows: int | None = None) -> list[str]:
    """The ids of ``path`` as :func:`read_id_lines` reads them, every one checked: none that
    :func:`id_problem` refuses, none repeated (a DataError naming the line)."""
    ids = read_id_lines(path, rows)
    seen: set[str] = set()
    for n, value in enumerate(ids, 1):
        problem = id_problem(value) or ("repeated id" if value in seen else None)
        if problem:
            raise DataError(path, f"{value[:60]!r}: {problem}", line=n)
        seen.add(value)
    return ids
