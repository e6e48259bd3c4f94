"""Item records from JSON Lines or Parquet: one item per line or row, parsed and checked one at
a time.

Fields: ``item_id`` (string, required), ``title``, ``brand``, ``description`` (strings),
``categories`` (a string, a list of strings, or a list of lists as in Amazon metadata) and
``image`` (a path; relative paths resolve against the folder of the file that holds the
record). Unknown keys are ignored. A bad record yields an :class:`ItemError` instead of an item,
so one bad item never stops a batch. Lines are read by :func:`loads_strict`, the JSON reader the
HTTP service uses for request bodies too; a Parquet row becomes the same dict and goes through
the same checks (:func:`parse_record`; the Parquet side is
:mod:`cliper_prod.features.parquet_catalog`).

A record knows its shard and line (row) there, for error reports, and its catalog-wide
position, which orders outputs (catalogs of several files: :mod:`cliper_prod.features.catalog`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generator, Iterator, NoReturn

from cliper_prod.errors import DataError
from cliper_prod.ids import id_problem
from cliper_prod.messages import shorten

TEXT_FIELDS = ("title", "brand", "categories", "description")
FIELDS = ("item_id", *TEXT_FIELDS, "image")  # what a record is read from (Parquet columns too)


@dataclass(frozen=True)
class ItemLimits:
    """Bounds that keep one hostile line from exhausting memory or time."""

    max_line_bytes: int = 8 << 20  # a longer line is skipped without being held in memory
    max_text_chars: int = 20_000  # a longer field is cut (tokenisation cuts far earlier anyway)


@dataclass(frozen=True)
class Item:
    item_id: str
    fields: dict[str, str]  # non-empty, whitespace-normalised text of each present field
    image: Path | None
    line: int
    notes: tuple[str, ...] = ()  # what was changed on the way in (a field cut to the limit)
    offset: int = 0  # byte offset of the line: a distributed reader re-reads batches from here
    file: str | None = None  # shard of a catalog folder, relative to it; None: a single file
    base: int = 0  # lines (rows) in the catalog's earlier shards
    image_name: str | None = None  # ``image`` as the line gives it, how error messages name it
    image_bytes: bytes | None = None  # the encoded image itself (from a Parquet catalog)
    unit: str = "line"  # what ``line`` counts: "line" (JSONL) or "row" (Parquet), errors.jsonl key

    @property
    def position(self) -> int:
        """Catalog-wide line number: the shards' lines counted in order."""
        return self.base + self.line


@dataclass(frozen=True)
class ItemError:
    line: int
    item_id: str | None
    reason: str
    file: str | None = None
    base: int = 0
    unit: str = "line"

    @property
    def position(self) -> int:
        return self.base + self.line


READ_BUFFER = 1 << 20  # bytes read from a JSONL catalog at a time (read_items)


class _Bad(Exception):
    pass


class StrictJSONError(ValueError):
    """Text that is not strict JSON (RFC 8259); the message says why, never echoing the text."""


def _refuse_constant(name: str) -> NoReturn:
    raise StrictJSONError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise StrictJSONError(f"number {shorten(text, 40)} is beyond the range of a float")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 300:
        raise StrictJSONError(f"integer of {len(text):,} digits")
    return int(text)


# one decoder for every call (json.loads with hooks builds a new one each time)
_STRICT = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_bounded_int)


def loads_strict(text: str | bytes) -> object:
    """Parse JSON as RFC 8259 defines it, refusing what Python's reader lets through: NaN and
    Infinity, numbers beyond a float's range (1e400), integers over 300 digits, strings with a
    lone surrogate escape (``"\\ud800"``, not Unicode text), bytes that are not UTF-8 and nesting
    deeper than the interpreter's stack. Such values cannot be encoded in an answer or written
    to a file, so they are refused here, once, for the service and the CLI alike."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        elif not text.isascii():
            text.encode("utf-8")  # a str a caller built may hold a lone surrogate itself
        if text.startswith("\ufeff"):  # as json.loads says it (the decoder does not look)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _STRICT.decode(text)
        if "\\u" in text:  # only an escape can put a lone surrogate into the parsed value
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        raise StrictJSONError(f"{exc.msg} at line {exc.lineno} column {exc.colno}"
                              if exc.lineno > 1 else f"{exc.msg} at column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8 (byte {exc.start})") from None
    except UnicodeEncodeError:
        raise StrictJSONError("a string holds a lone surrogate escape (\\ud800-\\udfff without "
                              "its pair), which is not Unicode text") from None
    except RecursionError:
        raise StrictJSONError("nested too deeply") from None
    return value


def _clean(text: str) -> str:
    r"""Runs of whitespace as one space, none at the ends: ``re.sub(r"\s+", " ", text).strip()``
    (the same characters count as whitespace: ``str.isspace``), at a fifth of its cost."""
    return " ".join(text.split())


def _categories(value: object) -> str:
    """Flatten Amazon-style category lists, keeping the first occurrence of each name."""
    if isinstance(value, str):
        return _clean(value)
    if not isinstance(value, list):
        raise _Bad(f"'categories' must be a string or a list, got {type(value).__name__}")
    names: list[str] = []
    for entry in value:
        for name in entry if isinstance(entry, list) else [entry]:
            if not isinstance(name, str):
                raise _Bad(f"'categories' entries must be strings, got {type(name).__name__}")
            name = _clean(name)
            if name and name not in names:
                names.append(name)
    return ", ".join(names)


def parse_item(text: str, line: int, base_dir: Path, limits: ItemLimits = ItemLimits()
               ) -> Item | ItemError:
    """One JSONL line -> an item, or the reason it cannot be one."""
    try:
        record = loads_strict(text)
    except StrictJSONError as exc:
        return ItemError(line, None, f"malformed JSON ({exc})")
    return parse_record(record, line, base_dir, limits)


def parse_record(record: object, line: int, base_dir: Path, limits: ItemLimits = ItemLimits()
                 ) -> Item | ItemError:
    """A decoded record (a JSON value, or a Parquet row as a dict) -> an item, or the reason
    it cannot be one: the one place the field rules live."""
    if not isinstance(record, dict):
        return ItemError(line, None, f"expected a JSON object, got {type(record).__name__}")
    item_id = record.get("item_id")
    if not isinstance(item_id, str) or not item_id.strip():
        return ItemError(line, None, "missing or empty 'item_id' (a non-empty string)")
    item_id = item_id.strip()
    problem = id_problem(item_id)
    if problem:
        return ItemError(line, item_id, f"'item_id': {problem}")
    notes: list[str] = []
    try:
        fields = {}
        for name in TEXT_FIELDS:
            value = record.get(name)
            if value is None:
                continue
            if name == "categories":
                value = _categories(value)
            elif isinstance(value, str):
                value = _clean(value)
            else:
                raise _Bad(f"'{name}' must be a string, got {type(value).__name__}")
            if len(value) > limits.max_text_chars:
                notes.append(f"'{name}' cut from {len(value):,} to {limits.max_text_chars:,} "
                             f"characters")
                value = value[:limits.max_text_chars]
            if value:
                fields[name] = value
        image = record.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            raise _Bad("'image' must be a non-empty path string")
    except _Bad as exc:
        return ItemError(line, item_id, str(exc))
    if image is None:
        return Item(item_id, fields, None, line, tuple(notes))
    return Item(item_id, fields, base_dir / image.strip(), line, tuple(notes),
                image_name=image.strip())


def _lines(fh, limit: int) -> Iterator[tuple[bytes, bool, int]]:
    """(line, fits, byte offset) for each line; a line over ``limit`` bytes is drained, never
    held whole."""
    offset = fh.tell()  # then counted, not asked: each tell() lets go of the interpreter
    while raw := fh.readline(limit + 1):  # lock, which the decode threads then hold
        start, offset = offset, offset + len(raw)
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw, True, start
        else:
            while rest := fh.readline(1 << 20):
                offset += len(rest)
                if rest.endswith(b"\n"):
                    break
            yield b"", False, start


def placed(parsed: Item | ItemError, seen: set[str], **where: object) -> Item | ItemError:
    """``parsed`` placed in its catalog (``where``: file, base, unit), an id read before turned
    into a duplicate error (the first one is kept)."""
    parsed = replace(parsed, **where)
    if isinstance(parsed, Item):
        if parsed.item_id in seen:
            return ItemError(parsed.line, parsed.item_id, "duplicate 'item_id' (first kept)",
                             parsed.file, parsed.base, parsed.unit)
        seen.add(parsed.item_id)
    return parsed


def read_items(path: Path, limits: ItemLimits = ItemLimits(), start_line: int = 0,
               seen: set[str] | None = None, file: str | None = None, base: int = 0
               ) -> Generator[Item | ItemError, None, int]:
    """Stream one JSONL file; blank lines are skipped, duplicate ids reported after the first;
    return the number of lines.

    Lines up to ``start_line`` are skipped; ``seen`` holds the ids read before; ``file`` and
    ``base`` place the records in a catalog of several shards.
    """
    seen = set() if seen is None else seen
    line_no = 0
    # a large buffer: each refill is a read() that lets go of the interpreter lock, and the
    # decode threads then keep the driver waiting for it (8 KiB held about 20 lines)
    with open(path, "rb", buffering=READ_BUFFER) as fh:
        for line_no, (raw, fits, offset) in enumerate(_lines(fh, limits.max_line_bytes),
                                                      start=1):
            if line_no <= start_line:
                continue
            parsed = _record(raw, fits, line_no, path.parent, limits)
            if parsed is None:
                continue
            yield placed(parsed, seen, file=file, base=base,
                         **({"offset": offset} if isinstance(parsed, Item) else {}))
    return line_no


def _record(raw: bytes, fits: bool, line_no: int, base_dir: Path, limits: ItemLimits
            ) -> Item | ItemError | None:
    """One raw line -> an item, an error, or None for a blank line."""
    if not fits:
        return ItemError(line_no, None, f"line longer than {limits.max_line_bytes:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ItemError(line_no, None, f"not UTF-8 (byte {exc.start})")
    return parse_item(text, line_no, base_dir, limits) if text.strip() else None


def reread_items(path: Path, offset: int, first_line: int, lines: list[int],
                 limits: ItemLimits = ItemLimits(), file: str | None = None, base: int = 0
                 ) -> list[Item]:
    """The items on ``lines`` (sorted, all valid) of one JSONL file, reading from the byte
    ``offset`` of line ``first_line``: a worker re-reads what a sequential pass has already
    vetted. ``file`` and ``base`` place them in the catalog as the sequential pass did."""
    wanted, items = set(lines), []
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line_no, (raw, _, at) in enumerate(_lines(fh, limits.max_line_bytes),
                                               start=first_line):
            if line_no in wanted:
                item = parse_item(raw.decode("utf-8"), line_no, path.parent, limits)
                if not isinstance(item, Item):
                    raise DataError(path, f"changed since it was read ({item.reason})", line_no)
                items.append(replace(item, offset=at, file=file, base=base))
                if line_no == lines[-1]:
                    break
    if len(items) != len(lines):
        raise DataError(path, f"ended before line {lines[-1]}; the file changed during the run")
    return items
