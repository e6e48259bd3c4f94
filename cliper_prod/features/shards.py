"""Crash-safe progress of a long `embed`: completed shards on disk, merged at the end.

The work folder (``OUT/.embed-work/``) holds ``progress.json`` (what the run embeds: input file
and settings, so ``--resume`` never mixes two runs) and one ``shard-NNNNNN.npz`` per completed
block of batches, each written to a temporary name and renamed, so a shard either exists whole
or not at all. A run killed at any point resumes after its last shard: the input is re-read from
the line after that shard's last item, with the item ids already seen, so batch composition and
therefore every output byte match an uninterrupted run. The merge streams shards into the final
files (memory stays one shard wide) and removes the work folder last.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cliper_prod.errors import ConfigError
from cliper_prod.ids import write_ids
from cliper_prod.io import atomic_path, write_json, write_text

WORK_DIR = ".embed-work"
PROGRESS = "progress.json"


@dataclass
class Shard:
    ids: list[str] = field(default_factory=list)  # embedded items, row order
    read_ids: list[str] = field(default_factory=list)  # every item id read (for duplicates)
    errors: list[dict] = field(default_factory=list)
    truncated_items: int = 0
    last_position: int = 0  # catalog lines up to here are accounted for
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, name: str, rows: np.ndarray) -> None:
        self.arrays.setdefault(name, []).append(rows)

    def extend(self, part: "Shard") -> None:
        """Append a batch encoded elsewhere (a Ray actor) to this shard."""
        self.ids += part.ids
        self.read_ids += part.read_ids
        self.truncated_items += part.truncated_items
        for name, rows in part.arrays.items():
            self.arrays.setdefault(name, []).extend(rows)

    def meta(self) -> dict[str, Any]:
        return {"ids": self.ids, "read_ids": self.read_ids, "errors": self.errors,
                "truncated_items": self.truncated_items,
                "last_position": self.last_position}


class ShardStore:
    def __init__(self, out_dir: Path, fingerprint: dict[str, Any], resume: bool) -> None:
        self.folder = out_dir / WORK_DIR
        fingerprint = json.loads(json.dumps(fingerprint))  # as stored: tuples become lists
        if self.folder.exists():
            if not resume:
                raise ConfigError(f"{self.folder}: an interrupted embed left its shards here; "
                                  f"pass --resume to continue it, or delete the folder to "
                                  f"start over")
            recorded = json.loads((self.folder / PROGRESS).read_text())["fingerprint"]
            if recorded != fingerprint:
                changed = sorted(k for k in fingerprint if recorded.get(k) != fingerprint[k])
                raise ConfigError(f"{self.folder}: the interrupted run differs in {changed}; "
                                  f"resume with the same input and options, or delete the "
                                  f"folder to start over")
        else:
            self.folder.mkdir(parents=True)
            write_json(self.folder / PROGRESS, {"fingerprint": fingerprint, "shards": 0})
        self.fingerprint = fingerprint
        self.count = len(self._paths())

    def _paths(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.npz"))

    def metas(self) -> Iterator[dict[str, Any]]:
        for path in self._paths():
            with np.load(path, allow_pickle=False) as npz:
                yield json.loads(str(npz["meta"]))

    def write(self, shard: Shard) -> None:
        arrays = {name: np.concatenate(parts) for name, parts in shard.arrays.items()}
        with atomic_path(self.folder / f"shard-{self.count:06d}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, meta=np.str_(json.dumps(shard.meta())), **arrays)
        self.count += 1
        write_json(self.folder / PROGRESS, {"fingerprint": self.fingerprint,
                                            "shards": self.count,
                                            "last_position": shard.last_position})

    def merge(self, out_dir: Path, shapes: dict[str, tuple[tuple[int, ...], str]]
              ) -> dict[str, Any]:
        """Stream the shards into ``out_dir``: one .npy per array name in ``shapes`` (row shape,
        file name), ``item_ids.txt`` and ``errors.jsonl`` (shards hold theirs in catalog order);
        return the totals and the ids in row order."""
        metas = list(self.metas())
        rows = sum(len(m["ids"]) for m in metas)
        for name, (row_shape, file) in shapes.items():
            with atomic_path(out_dir / file) as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                shape=(rows, *row_shape))
                at = 0
                for path in self._paths():
                    with np.load(path, allow_pickle=False) as npz:
                        if name in npz.files:
                            part = npz[name]
                            out[at:at + len(part)] = part
                            at += len(part)
                out.flush()
                del out
        ids = [i for m in metas for i in m["ids"]]
        write_ids(out_dir / "item_ids.txt", ids)
        errors = [e for m in metas for e in m["errors"]]
        write_text(out_dir / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
        return {"embedded": rows, "ids": ids, "errors": errors,
                "truncated_items": sum(m["truncated_items"] for m in metas)}

    def remove(self) -> None:
        shutil.rmtree(self.folder)
