"""``cliper-prod add-items``: new items into a bundle without retraining (fold-in)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cliper_prod.commands.common import device_option, quiet_option
from cliper_prod.errors import ConfigError, DataError

if TYPE_CHECKING:
    import numpy as np

    from cliper_prod.runtime.bundle import Bundle


def embedded_features(bundle: Bundle, items: Path, folder: Path, *, precision: str,
                      batch_size: int, strict: bool, progress: bool) -> list[dict]:
    """Embed ``items`` with the bundle's own CLIP graphs, as `embed --bundle` would, into
    ``folder``; the item errors (the per-item policy of `embed`)."""
    from cliper_prod.features.embed import EmbedOptions, embed_catalog
    from cliper_prod.runtime.encoder import OnnxEncoder

    bundle.features  # a bundle without CLIP graphs refuses here, saying so
    encoder = OnnxEncoder(bundle, precision)
    options = EmbedOptions(views=encoder.views, fusion=encoder.fusion, tau=encoder.tau,
                           batch_size=batch_size, strict=strict)
    embed_catalog(items, encoder, folder, options, progress=progress)
    return [json.loads(line) for line in (folder / "errors.jsonl").read_text().splitlines()]


#: what an `embed` summary and a bundle's feature settings must share for the features to be
#: in the space the model was trained on (the CLIP itself is named differently by the two
#: paths, a checkpoint or a bundle, so it is not compared)
SAME_EMBEDDING = ("dim", "fusion", "tau", "views")


def read_features(folder: Path, modalities: list[str], bundle_features: dict | None
                  ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Item ids and the ``modalities``' feature rows of a folder laid out as `embed` writes it,
    checked: one non-empty id per row, finite rows with some length (a zero row has no
    neighbours), and, where both say, the CLIP settings of the bundle."""
    import numpy as np

    ids_file = folder / "item_ids.txt"
    if not ids_file.is_file():
        raise DataError(ids_file, "missing: --features takes a folder written by "
                                  "`cliper-prod embed` (item_ids.txt, image_feat.npy, "
                                  "text_feat.npy)")
    ids = ids_file.read_text(encoding="utf-8").split("\n")
    if ids[-1] == "":  # the newline ending the last line
        ids.pop()
    if "" in ids or any(i != i.strip() for i in ids):
        raise DataError(ids_file, "an empty id, or one with surrounding whitespace",
                        line=next(n for n, i in enumerate(ids, 1) if not i or i != i.strip()))
    if len(set(ids)) != len(ids):
        raise DataError(ids_file, "repeated item ids")
    summary_file = folder / "embed_summary.json"
    if bundle_features is not None and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        differ = [key for key in SAME_EMBEDDING if summary.get(key) != bundle_features.get(key)]
        if differ:
            raise DataError(summary_file, f"embedded with other {differ} than the bundle's "
                                          f"model: the features are in another space")
    features = {}
    for m in modalities:
        path = folder / f"{m}_feat.npy"
        if not path.is_file():
            raise DataError(path, f"missing: the model's item graph was built from "
                                  f"{modalities} features")
        rows = np.load(path)
        if rows.ndim != 2 or len(rows) != len(ids) or not np.isfinite(rows).all():
            raise DataError(path, f"expected {len(ids)} finite rows (one per item_ids.txt line), "
                                  f"got shape {rows.shape}")
        zero = np.flatnonzero(~np.any(rows, axis=1))
        if len(zero):
            raise DataError(path, f"item {ids[zero[0]]!r} (and {len(zero) - 1} more) has an "
                                  f"all-zero row: it has no nearest items")
        features[m] = rows
    return ids, features


@click.command("add-items")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), required=True,
              help="Bundle written by `cliper-prod export` (FREEDOM or LATTICE); it is not "
                   "changed.")
@click.option("--items", "items_path", type=click.Path(path_type=Path),
              help="The new items, a JSON Lines file or folder as `embed` reads, embedded with "
                   "the bundle's CLIP graphs.")
@click.option("--features", "features_dir", type=click.Path(path_type=Path),
              help="Or their features: a folder as `embed` writes (item_ids.txt, "
                   "image_feat.npy, text_feat.npy), in the space the model was trained on.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder of the new bundle (written atomically).")
@device_option()
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32",
              show_default=True, help="Which CLIP graphs embed --items.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--strict", is_flag=True, help="Fail (exit 3) at the first item error of --items.")
@quiet_option("No progress bar.")
def command(bundle_dir: Path, items_path: Path | None, features_dir: Path | None,
            out_dir: Path, device: str, precision: str, batch_size: int, strict: bool,
            quiet: bool) -> None:
    """Add items to a bundle without retraining: each new item is placed in the model's item
    graph by kNN over the same features the model used, its embedding is the backbone's own
    item-graph propagation, and a new verified bundle is written (see README, "Fresh
    catalogs"). Items the bundle already has are refused."""
    import shutil

    from cliper_prod.backbones.base import FoldInState
    from cliper_prod.export.bundle import extend_bundle
    from cliper_prod.runtime.bundle import Bundle
    from cliper_prod.runtime.fold_in import FoldIn

    if (items_path is None) == (features_dir is None):
        raise ConfigError("pass exactly one of --items (embedded here) or --features")
    source, out = bundle_dir.resolve(), out_dir.resolve()
    if out == source or out.is_relative_to(source) or source.is_relative_to(out):
        raise ConfigError("--out must lie outside --bundle and not hold it: the source bundle "
                          "is never changed")
    if out_dir.exists() and not (out_dir / "manifest.json").is_file():
        raise ConfigError(f"{out_dir}: exists and is not a bundle; add-items replaces only a "
                          f"bundle folder")
    bundle = Bundle(bundle_dir, device)
    manifest = bundle.manifest
    fold = FoldIn.of(bundle)
    fold.require_item_rule()
    workdir = Path(tempfile.mkdtemp(prefix="cliper-add-items-")) if items_path else None
    try:
        if items_path is not None:
            errors = embedded_features(bundle, items_path, workdir, precision=precision,
                                       batch_size=batch_size, strict=strict, progress=not quiet)
            for error in errors:
                where = f"{items_path}/{error['file']}" if "file" in error else str(items_path)
                at = f"{where}:{error['line']}" if "line" in error else \
                    f"{where}: row {error['row']}"
                click.echo(f"{at}: {error['action']}: {error['reason']}", err=True)
            features_dir = workdir
        ids, features = read_features(features_dir, fold.modalities, manifest.get("features"))
        known = set(bundle.item_ids).intersection(ids)
        if known:
            raise DataError(features_dir / "item_ids.txt",
                            f"{len(known)} item id(s) already in the bundle, e.g. "
                            f"{sorted(known)[:5]}")
        if not ids:
            raise DataError(items_path or features_dir, "no item to add")
        placed = fold.items(features)
        arrays = {name: fold.array(name) for name in fold.files} | placed.arrays
        extend_bundle(bundle_dir, manifest, item_ids=ids, items=placed.vectors,
                      fold_in=FoldInState(fold.user_rule, fold.item_rule, fold.params, arrays),
                      out=out_dir)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    click.echo(f"added {len(ids)} item(s) to {len(bundle.item_ids)} -> {out_dir}", err=True)
