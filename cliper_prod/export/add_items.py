"""New items into a bundle without retraining: the library side of ``cliper-prod add-items``.

Each new item is embedded with the bundle's own CLIP graphs (or its features are read from an
``embed`` folder), placed in the model's item graph by the backbone's fold-in rule
(:mod:`cliper_prod.runtime.fold_in`) and, where the bundle has one, moved by the cold-start
student (:mod:`cliper_prod.runtime.cold_student`), and a new verified bundle is written by
:func:`~cliper_prod.export.extended_bundle.extend_bundle` (with torch or without: embedding runs
the bundle's ONNX graphs, placing is numpy); the source bundle is never changed.
An item that cannot be added is that item's record, naming the user's own file and line (row),
as in ``embed``; the others are added (see :func:`add_items`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliper_prod.bundle_format import TOPK_GRAPH
from cliper_prod.errors import ConfigError, DataError
from cliper_prod.export.extended_bundle import check_writable, extend_bundle
from cliper_prod.features.catalog import Catalog, read_catalog
from cliper_prod.features.embed import EmbedOptions, check_catalog, embed_catalog
from cliper_prod.features.feature_folder import IDS_FILE, ItemProblem, read_feature_folder
from cliper_prod.features.items import Item
from cliper_prod.fold_in_state import FoldInState
from cliper_prod.io import TEMP_SUFFIX, check_output, temp_prefix, write_text
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.cold_student import STUDENT, ContentStudent, choose_placement
from cliper_prod.runtime.encoder import OnnxEncoder
from cliper_prod.runtime.fold_in import FoldIn, PlacedItems


@dataclass(frozen=True)
class AddedItems:
    """What :func:`add_items` did: items added to the bundle's items before, and one record
    per item not added or added with a note (as the errors file holds them)."""

    added: int
    before: int
    errors: list[dict]
    placement: str


def errors_file_for(out: Path) -> Path:
    """Where the per-item records go by default: ``<out>.errors.jsonl`` beside the new
    bundle (never inside it: the bundle holds what it serves)."""
    return out.with_name(f"{out.name}.errors.jsonl")


def check_out(source: Path, out: Path) -> None:
    """``out`` must lie outside the source bundle, not hold it, and pass the output-path
    policy for a bundle (:func:`~cliper_prod.io.check_output`)."""
    source, resolved = source.resolve(), out.resolve()
    if resolved == source or resolved.is_relative_to(source) or source.is_relative_to(resolved):
        raise ConfigError("--out must lie outside --bundle and not hold it: the source bundle "
                          "is never changed")
    check_output(out, "bundle")


def embed_items(bundle: Bundle, items: Path, folder: Path, *, precision: str, batch_size: int,
                strict: bool, progress: bool) -> list[dict]:
    """Embed ``items`` with the bundle's own CLIP graphs, as `embed --bundle` would, into
    ``folder``; the item errors, each naming the user's file (``items`` or its shard)."""
    bundle.features  # a bundle without CLIP graphs refuses here, saying so
    encoder = OnnxEncoder(bundle, precision)
    options = EmbedOptions(views=encoder.views, fusion=encoder.fusion, tau=encoder.tau,
                           batch_size=batch_size, strict=strict)
    embed_catalog(items, encoder, folder, options, progress=progress)
    records = [json.loads(line) for line in (folder / "errors.jsonl").read_text().split("\n")
               if line]
    return [{"file": str(items / r.pop("file") if "file" in r else items), **r}
            for r in records]


def _catalog_places(items: Path, ids: set[str]) -> dict[str, dict]:
    """Where each of ``ids`` is in the catalog ``items``: ``file`` and ``line`` (or ``row``),
    read again without images (the embedded folder knows ids, not lines)."""
    catalog = Catalog.at(items)
    places = {}
    for record in read_catalog(catalog, images=False):
        if isinstance(record, Item) and record.item_id in ids:
            file = items / record.file if record.file is not None else items
            places[record.item_id] = {"file": str(file), record.unit: record.line}
    return places


def _problem_records(problems: list[ItemProblem], items: Path | None, features: Path | None
                     ) -> list[dict]:
    """errors-file records of the items a feature folder cannot add, naming the user's file:
    the catalog's line (row) for --items, the folder's file and line (row) for --features."""
    places = _catalog_places(items, {p.item_id for p in problems}) if items and problems \
        else {}
    records = []
    for p in problems:
        where = places.get(p.item_id) if items else \
            {"file": str(features / p.file),
             ("line" if p.file == IDS_FILE else "row"): p.row + 1}
        records.append({**(where or {"file": str(items)}), "item_id": p.item_id,
                        "action": "skipped", "reason": p.reason})
    return records


def place(fold: FoldIn, student: ContentStudent | None, placement: str,
          features: dict[str, np.ndarray]) -> PlacedItems:
    """The new items' vectors and the fold-in arrays that go with them: the backbone's rule,
    plus the student's offset when ``placement`` is the student (alone where the backbone has
    no item rule)."""
    if placement != STUDENT:
        return fold.items(features)
    offsets = student.offsets(features)
    if not student.residual:
        return PlacedItems(offsets, fold.padded_arrays(len(offsets)))
    placed = fold.items(features)
    return PlacedItems(placed.vectors + offsets, placed.arrays)


def _refuse_strict(record: dict) -> None:
    """--strict: the first item that cannot be added stops the run, naming its file."""
    where = f"row {record['row']}: " if "row" in record else ""
    raise DataError(record["file"], f"{where}item {record['item_id']!r}: {record['reason']} "
                                    f"(--strict)", line=record.get("line"))


def add_items(bundle_dir: Path, out: Path, *, items: Path | None = None,
              features: Path | None = None, errors_file: Path | None = None,
              provider: str = "auto", precision: str = "fp32", batch_size: int = 64,
              strict: bool = False, progress: bool = True,
              on_item_error: Callable[[dict], None] = lambda record: None,
              placement: str | None = None) -> AddedItems:
    """Add the items of ``items`` (a catalog, embedded here) or ``features`` (an `embed`
    folder) to the bundle at ``bundle_dir`` as a new bundle at ``out``.

    The per-item policy of ``embed``: an item that cannot be added (a bad record, an id
    already in the bundle or holding a line break, a row that cannot be placed) is recorded,
    naming the user's file and line (row), in ``errors_file`` (default
    :func:`errors_file_for`, written once the new bundle is, or when no item is left) and
    given to
    ``on_item_error``; the others are added. With ``strict`` the first such item fails the run
    and nothing is written. The embedding work folder is a temporary sibling of ``out``.
    ``placement`` (``student`` or ``fold-in``; default the student when the bundle has one)
    chooses how the items are placed (:func:`place`)."""
    if (items is None) == (features is None):
        raise ConfigError("pass exactly one of --items (embedded here) or --features")
    errors_file = errors_file or errors_file_for(out)
    check_out(bundle_dir, out)
    check_output(errors_file, "file", "--errors")
    check_writable()
    if items is not None:
        check_catalog(items, out)  # the work folder beside --out must not be read as a shard
    bundle = Bundle(bundle_dir, provider)
    bundle.graph(TOPK_GRAPH)  # its K checked against the manifest's, which the new one keeps
    fold = FoldIn.of(bundle)
    student = ContentStudent.of(bundle)
    placement = choose_placement(placement, student, bundle_dir)
    if placement != STUDENT or student.residual:
        fold.require_item_rule()
    modalities = list(dict.fromkeys(fold.modalities + (
        student.modalities if placement == STUDENT else [])))
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(out)}work.", suffix=TEMP_SUFFIX,
                                    dir=out.parent)) if items else None
    try:
        errors = []
        if items is not None:
            errors = embed_items(bundle, items, workdir, precision=precision,
                                 batch_size=batch_size, strict=strict, progress=progress)
        found = read_feature_folder(workdir or features, modalities,
                                    bundle.manifest.get("features"), set(bundle.item_ids))
        skipped = _problem_records(found.problems, items, features)
        if strict and skipped:
            _refuse_strict(skipped[0])
        not_added = {p.item_id for p in found.problems}  # one record each: why it is not
        errors = sorted([e for e in errors if e["item_id"] not in not_added
                         or e["action"] != "kept"] + skipped,
                        key=lambda e: (e["file"], e.get("line", e.get("row", 0))))
        for record in errors:
            on_item_error(record)
        if found.ids:
            placed = place(fold, student, placement, found.features)
            extend_bundle(bundle_dir, bundle.manifest, item_ids=found.ids,
                          items=placed.vectors, out=out, fold_in=FoldInState(
                              fold.user_rule, fold.item_rule, fold.params, placed.arrays),
                          placement=placement, student=student.state if student else None,
                          progress=progress)
        write_text(errors_file, "".join(json.dumps(e) + "\n" for e in errors))
        if not found.ids:
            raise DataError(items or features, f"no item to add ({len(errors)} item error(s), "
                                               f"listed in {errors_file})")
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return AddedItems(len(found.ids), len(bundle.item_ids), errors, placement)
