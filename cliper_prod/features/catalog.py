"""A catalog: the input of one run, one JSONL or Parquet file or a folder of ``*.jsonl`` or
``*.parquet`` shards (at any depth, in path order; one format per folder), read as if the shards
were one file: duplicates count across shards, and each record keeps its shard and line (row)
there for error reports, plus its catalog-wide position, which orders outputs.

Records of one JSONL file come from :mod:`cliper_prod.features.items`, of one Parquet file from
:mod:`cliper_prod.features.parquet_catalog`; this module lists the files and streams them in
order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cliper_prod.errors import ConfigError
from cliper_prod.features.items import Item, ItemError, ItemLimits, read_items
from cliper_prod.features.parquet_catalog import arrow, read_parquet_items
from cliper_prod.io import count_lines

FORMATS = (".jsonl", ".parquet")  # the shard suffixes a catalog folder is searched for


def is_parquet(path: Path) -> bool:
    """Whether a catalog file is read as Parquet (any other file is JSON Lines)."""
    return path.suffix == ".parquet"


@dataclass(frozen=True)
class Catalog:
    """The input of one run: ``root`` (a JSONL or Parquet file, or a folder of shards) and its
    files, listed once so that the resume fingerprint covers exactly the files the reader
    reads."""

    root: Path
    files: tuple[Path, ...]

    @classmethod
    def at(cls, path: Path) -> Catalog:
        """``path`` itself, or the ``*.jsonl`` or ``*.parquet`` files under the folder ``path``
        (hidden ones left out) sorted by their relative path. A folder holding both formats is
        refused: a stray file of the other format is more likely a mistake than a shard."""
        if path.is_file():
            catalog = cls(path, (path,))
        elif not path.is_dir():
            raise ConfigError(f"{path}: no such items file or folder")
        else:
            found = {suffix: _shards(path, suffix) for suffix in FORMATS}
            formats = [suffix for suffix, files in found.items() if files]
            if not formats:
                raise ConfigError(f"{path}: the folder holds no *.jsonl files and no *.parquet "
                                  f"files")
            if len(formats) > 1:
                raise ConfigError(f"{path}: the folder holds both *.jsonl ({len(found['.jsonl'])})"
                                  f" and *.parquet ({len(found['.parquet'])}) files; a catalog "
                                  f"folder holds one format")
            catalog = cls(path, tuple(found[formats[0]]))
        if any(is_parquet(f) for f in catalog.files):
            arrow()  # a missing pyarrow is an option error now, not a crash mid-run
        return catalog

    def record_count(self) -> int:
        """About how many records the catalog holds, for a progress total: its JSONL lines
        (blank ones included) and its Parquet rows (from the footers), without parsing."""
        return sum(_parquet_rows(f) if is_parquet(f) else count_lines(f) for f in self.files)

    def shard_name(self, file: Path) -> str | None:
        """How records name their shard: the path under the catalog folder (None for one
        file)."""
        return None if file == self.root else file.relative_to(self.root).as_posix()


def _parquet_rows(path: Path) -> int:
    return arrow()[1].ParquetFile(path).metadata.num_rows


def _shards(folder: Path, suffix: str) -> list[Path]:
    """The files named ``*suffix`` under ``folder`` (hidden ones left out), sorted by their
    relative path."""
    return sorted((p for p in folder.rglob(f"*{suffix}") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=lambda p: p.relative_to(folder).parts)


def read_catalog(catalog: Catalog, limits: ItemLimits = ItemLimits(), start_position: int = 0,
                 seen: set[str] | None = None, images: bool = True
                 ) -> Iterator[Item | ItemError]:
    """Stream a catalog (one file or a folder of shards) as one sequence of records.

    ``start_position`` and ``seen`` resume a stream: records up to that catalog-wide line are
    skipped and the ids read before it still count as duplicates. ``images=False`` leaves
    Parquet image bytes unread: a planning pass needs only what decides each record's fate.
    """
    seen = set() if seen is None else seen
    base = 0
    for file in catalog.files:
        if is_parquet(file):
            stream = read_parquet_items(file, limits, start_position - base, seen,
                                        catalog.shard_name(file), base, images)
        else:
            stream = read_items(file, limits, start_position - base, seen,
                                catalog.shard_name(file), base)
        base += yield from stream
