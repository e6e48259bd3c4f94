"""Item records from Parquet: a row plays the part of a JSONL line.

Columns are named like the JSONL keys (:data:`~cliper_prod.features.items.FIELDS`; others are
never read). Each row becomes the dict its JSONL line would decode to and goes through the same
field checks (:func:`~cliper_prod.features.items.parse_record`), so a missing column reads as a
missing key and a value of the wrong type gets the reason its JSON counterpart gets. Nulls are
absent keys, as JSON nulls are.

``image`` is a path (a string column; relative paths resolve against the Parquet file's folder),
the encoded image itself (a binary column), or the ``{bytes, path}`` struct that Hugging Face
datasets writes: the bytes when present, else the path; a struct with neither is no image.
Images given as bytes are named ``<file> row <n>`` in messages, never by a path.

Rows are numbered from 1 in each file. A file that cannot be opened, or read past some row, is
one record at the first row not read ("not readable as Parquet from this row on"), and the file
counts as at least that many rows, so catalog positions stay fixed for ``--resume``.

Reading goes one row group at a time (only the catalog's columns, through a read buffer rather
than pre-buffered whole), turned into Python values :data:`ROWS_PER_READ` rows at a time: memory
follows the largest row group, never the file (pyarrow decodes a row group's column whole;
Hugging Face datasets writes 100-row groups for images). Batches start at each row group, so
where a damaged file fails depends only on the file: a resumed run fails at the same row.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Generator, Iterator

from cliper_prod.errors import ConfigError, DataError
from cliper_prod.features.items import (FIELDS, Item, ItemError, ItemLimits, parse_record,
                                        placed)
from cliper_prod.messages import shorten

ROWS_PER_READ = 256
READ_BUFFER_BYTES = 1 << 20  # read through this buffer: a third less peak memory than pre-buffering
HF_IMAGE_FIELDS = {"bytes", "path"}  # datasets.Image's storage struct

if TYPE_CHECKING:
    import pyarrow


def arrow() -> tuple[ModuleType, ModuleType]:
    """(pyarrow, pyarrow.parquet), or the ConfigError that names the extra installing them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError("Parquet input and --out-format parquet need pyarrow: "
                          "pip install 'cliper-prod[parquet]'") from None
    return pyarrow, pyarrow.parquet


def _image(value: object) -> tuple[object, bytes | None]:
    """A row's ``image`` as (what the field checks see, the encoded image or None)."""
    if isinstance(value, bytes):
        return None, value
    if isinstance(value, dict) and set(value) <= HF_IMAGE_FIELDS:
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, bytes):
            return None, data
        return (path if isinstance(path, str) and path.strip() else None), None
    return value, None


def _holds_image_bytes(kind: pyarrow.DataType) -> bool:
    """Whether an ``image`` column of this Arrow type never fails the field checks (bytes, or
    the Hugging Face struct), so that a planning pass may leave it unread."""
    pa, _ = arrow()
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or pa.types.is_fixed_size_binary(kind)
            or (pa.types.is_struct(kind) and {f.name for f in kind} <= HF_IMAGE_FIELDS))


class Unreadable(Exception):
    """A Parquet file that cannot be read from ``row`` (1-based) on; ``problem`` says why."""

    def __init__(self, row: int, problem: str) -> None:
        super().__init__(problem)
        self.row, self.problem = row, problem


class ParquetRows:
    """The catalog columns of one Parquet file, row by row as dicts; every pyarrow failure is
    an :class:`Unreadable` that names the first row not read."""

    def __init__(self, path: Path, label: str, images: bool = True) -> None:
        self.pa, pq = arrow()
        self.path, self.label = path, label
        try:
            self.file = pq.ParquetFile(path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
            schema, meta = self.file.schema_arrow, self.file.metadata
        except (self.pa.ArrowException, OSError) as exc:
            raise Unreadable(1, self._problem(exc)) from None
        repeated = sorted({name for name in FIELDS if schema.names.count(name) > 1})
        if repeated:
            raise Unreadable(1, f"column(s) {repeated} appear more than once")
        self.columns = [name for name in FIELDS if name in schema.names and
                        (images or name != "image"
                         or not _holds_image_bytes(schema.field(name).type))]
        self.num_rows = meta.num_rows
        self.starts = [0]  # rows before each row group, then the total
        for group in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(group).num_rows)

    def records(self, first: int, last: int | None = None) -> Iterator[tuple[int, dict]]:
        """(row, record) for rows ``first`` to ``last`` (1-based, inclusive; None: to the end),
        reading only the row groups that hold them."""
        last = self.num_rows if last is None else last
        for group in range(len(self.starts) - 1):
            if self.starts[group] >= last:
                return
            if self.starts[group + 1] < first:
                continue
            done = self.starts[group]  # rows decoded
            try:
                for batch in self.file.iter_batches(ROWS_PER_READ, row_groups=[group],
                                                    columns=self.columns):
                    values = [batch.column(name).to_pylist() for name in self.columns]
                    for i in range(batch.num_rows):
                        row = done + i + 1
                        if row > last:
                            return
                        if row >= first:
                            yield row, {name: column[i]
                                        for name, column in zip(self.columns, values)}
                    done += batch.num_rows
            except (self.pa.ArrowException, OSError, ValueError) as exc:
                raise Unreadable(done + 1, self._problem(exc)) from None

    def _problem(self, exc: Exception) -> str:
        """pyarrow's message on one line, naming the file by its label (never a server
        path)."""
        text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
        for form in {str(self.path.resolve()), str(self.path)}:
            text = text.replace(form, self.label)
        return shorten(text)


def _parse(record: dict, row: int, path: Path, label: str, limits: ItemLimits
           ) -> Item | ItemError:
    """One row -> an item (carrying its image bytes, if any), or the reason it cannot be one."""
    image, data = _image(record.get("image"))
    parsed = parse_record({**record, "image": image}, row, path.parent, limits)
    if isinstance(parsed, Item) and data is not None:
        parsed = replace(parsed, image_bytes=data, image_name=f"{label} row {row}")
    return parsed


def read_parquet_items(path: Path, limits: ItemLimits = ItemLimits(), start_row: int = 0,
                       seen: set[str] | None = None, file: str | None = None, base: int = 0,
                       images: bool = True) -> Generator[Item | ItemError, None, int]:
    """Stream one Parquet file as :func:`~cliper_prod.features.items.read_items` streams a
    JSONL file; return the rows it accounts for (at least up to an unreadable one).

    Rows up to ``start_row`` are skipped (row groups before them are not read);
    ``images=False`` leaves an image column of bytes unread.
    """
    seen = set() if seen is None else seen
    label = file or path.name
    rows = 0
    try:
        source = ParquetRows(path, label, images)
        rows = source.num_rows
        for row, record in source.records(start_row + 1):
            yield placed(_parse(record, row, path, label, limits), seen, file=file, base=base,
                         unit="row")
    except Unreadable as exc:
        if exc.row > start_row:  # else the interrupted run reported it
            yield ItemError(exc.row, None, f"not readable as Parquet from this row on "
                                           f"({exc.problem})", file, base, "row")
        rows = max(rows, exc.row)
    return rows


def reread_parquet_rows(path: Path, rows: list[int], limits: ItemLimits = ItemLimits(),
                        file: str | None = None, base: int = 0) -> Iterator[Item]:
    """The items on ``rows`` (sorted, all valid) of one Parquet file, streamed in one pass over
    the row groups that hold them: a worker re-reads what a planning pass has already vetted.
    ``file`` and ``base`` place them in the catalog as the planning pass did."""
    wanted, label, count = set(rows), file or path.name, 0
    try:
        for row, record in ParquetRows(path, label).records(rows[0], rows[-1]):
            if row in wanted:
                item = _parse(record, row, path, label, limits)
                if not isinstance(item, Item):
                    raise DataError(path, f"row {row}: changed since it was read ({item.reason})")
                count += 1
                yield replace(item, file=file, base=base, unit="row")
    except Unreadable as exc:
        raise DataError(path, f"row {exc.row}: could not be re-read ({exc.problem}); the "
                              f"planning pass reads no image bytes, so damaged image data stops "
                              f"--ray: embed without --ray to list the rows lost in "
                              f"errors.jsonl") from None
    if count != len(rows):
        raise DataError(path, f"ended before row {rows[-1]}; the file changed during the run")
