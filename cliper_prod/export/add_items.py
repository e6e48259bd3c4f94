"""New items into a bundle without retraining: the library side of ``cliper-prod add-items``.

Each new item is embedded with the bundle's own CLIP graphs (or its features are read from an
``embed`` folder), placed in the model's item graph by the backbone's fold-in rule
(:mod:`cliper_prod.runtime.fold_in`), and a new verified bundle is written by
:func:`~cliper_prod.export.bundle_writer.extend_bundle`; the source bundle is never changed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cliper_prod.backbones.base import FoldInState
from cliper_prod.bundle_format import MANIFEST
from cliper_prod.errors import ConfigError, DataError
from cliper_prod.export.bundle_writer import extend_bundle
from cliper_prod.features.embed import EmbedOptions, embed_catalog
from cliper_prod.features.feature_folder import read_feature_folder
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.encoder import OnnxEncoder
from cliper_prod.runtime.fold_in import FoldIn


@dataclass(frozen=True)
class AddedItems:
    """What :func:`add_items` did: items added to the bundle's items before."""

    added: int
    before: int


def check_out(source: Path, out: Path) -> None:
    """``out`` must lie outside the source bundle, not hold it, and be new or a bundle."""
    source, resolved = source.resolve(), out.resolve()
    if resolved == source or resolved.is_relative_to(source) or source.is_relative_to(resolved):
        raise ConfigError("--out must lie outside --bundle and not hold it: the source bundle "
                          "is never changed")
    if out.exists() and not (out / MANIFEST).is_file():
        raise ConfigError(f"{out}: exists and is not a bundle; add-items replaces only a "
                          f"bundle folder")


def embed_items(bundle: Bundle, items: Path, folder: Path, *, precision: str, batch_size: int,
                strict: bool, progress: bool) -> list[dict]:
    """Embed ``items`` with the bundle's own CLIP graphs, as `embed --bundle` would, into
    ``folder``; the item errors."""
    bundle.features  # a bundle without CLIP graphs refuses here, saying so
    encoder = OnnxEncoder(bundle, precision)
    options = EmbedOptions(views=encoder.views, fusion=encoder.fusion, tau=encoder.tau,
                           batch_size=batch_size, strict=strict)
    embed_catalog(items, encoder, folder, options, progress=progress)
    return [json.loads(line) for line in (folder / "errors.jsonl").read_text().splitlines()]


def add_items(bundle_dir: Path, out: Path, *, items: Path | None = None,
              features: Path | None = None, provider: str = "auto", precision: str = "fp32",
              batch_size: int = 64, strict: bool = False, progress: bool = True,
              on_item_error: Callable[[dict], None] = lambda record: None) -> AddedItems:
    """Add the items of ``items`` (a catalog, embedded here) or ``features`` (an `embed`
    folder) to the bundle at ``bundle_dir`` as a new bundle at ``out``. ``on_item_error``
    hears each per-item record of embedding ``items`` (the per-item policy of ``embed``) as
    soon as the catalog is embedded."""
    if (items is None) == (features is None):
        raise ConfigError("pass exactly one of --items (embedded here) or --features")
    check_out(bundle_dir, out)
    bundle = Bundle(bundle_dir, provider)
    fold = FoldIn.of(bundle)
    fold.require_item_rule()
    workdir = Path(tempfile.mkdtemp(prefix="cliper-add-items-")) if items else None
    try:
        if items is not None:
            for record in embed_items(bundle, items, workdir, precision=precision,
                                      batch_size=batch_size, strict=strict, progress=progress):
                on_item_error(record)
            features = workdir
        ids, rows = read_feature_folder(features, fold.modalities,
                                        bundle.manifest.get("features"))
        known = set(bundle.item_ids).intersection(ids)
        if known:
            raise DataError(features / "item_ids.txt",
                            f"{len(known)} item id(s) already in the bundle, e.g. "
                            f"{sorted(known)[:5]}")
        if not ids:
            raise DataError(items or features, "no item to add")
        placed = fold.items(rows)
        arrays = {name: fold.array(name) for name in fold.files} | placed.arrays
        extend_bundle(bundle_dir, bundle.manifest, item_ids=ids, items=placed.vectors,
                      fold_in=FoldInState(fold.user_rule, fold.item_rule, fold.params, arrays),
                      out=out)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return AddedItems(len(ids), len(bundle.item_ids))
