"""``cliper-prod add-items``: new items into a bundle without retraining (fold-in)."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.commands.common import provider_option, quiet_option, strict_option


@click.command("add-items")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), required=True,
              metavar="DIR",
              help="Bundle written by `cliper-prod export` (FREEDOM or LATTICE, or any backbone "
                   "exported with --cold-student); it is not changed.")
@click.option("--items", "items_path", type=click.Path(path_type=Path), metavar="PATH",
              help="The new items, a JSON Lines file or folder as `embed` reads, embedded with "
                   "the bundle's CLIP graphs.")
@click.option("--features", "features_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Or their features: a folder as `embed` writes (item_ids.txt, "
                   "image_feat.npy, text_feat.npy), in the space the model was trained on.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="Folder of the new bundle (written atomically).")
@click.option("--errors", "errors_file", type=click.Path(path_type=Path), metavar="FILE",
              help="JSON Lines record of each item not added (file, line or row, item_id, "
                   "action, reason) [default: OUT.errors.jsonl beside OUT].")
@provider_option()
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="Which CLIP graphs embed --items.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Items encoded per model call (--items).")
@click.option("--placement", type=click.Choice(["student", "fold-in"]),
              help="How new items are placed: the bundle's cold-start student (on top of the "
                   "fold-in where the backbone has an item rule) or the fold-in rule alone "
                   "[default: student when the bundle has one, else fold-in].")
@strict_option(False, "fail (exit 3) at the first item that cannot be added; nothing is "
                      "written.", "list each item not added in the errors file and add the rest.")
@quiet_option("No progress (bar or log lines).")
def command(bundle_dir: Path, items_path: Path | None, features_dir: Path | None,
            out_dir: Path, errors_file: Path | None, provider: str, precision: str,
            batch_size: int, strict: bool, placement: str | None, quiet: bool) -> None:
    """Add items to a bundle without retraining: each new item is placed in the model's item
    graph by kNN over the same features the model used, its embedding is the backbone's own
    item-graph propagation (plus the cold-start student's offset when the bundle has one, so
    that new items compete with trained ones), and a new verified bundle is written (see
    README, "Fresh catalogs"). An item that cannot be added (one the bundle already has, a
    bad record or row) is listed in the errors file and the rest are added, as `embed` does;
    --strict refuses the batch instead."""
    from cliper_prod.export.add_items import add_items, errors_file_for
    from cliper_prod.io import no_empty_folders_on_failure

    def report(error: dict) -> None:
        at = f"{error['file']}:{error['line']}" if "line" in error else \
            f"{error['file']}: row {error['row']}" if "row" in error else error["file"]
        click.echo(f"{at}: {error['action']}: {error['reason']}", err=True)

    with no_empty_folders_on_failure(out_dir.parent):
        added = add_items(bundle_dir, out_dir, items=items_path, features=features_dir,
                          errors_file=errors_file, provider=provider, precision=precision,
                          batch_size=batch_size, strict=strict, progress=not quiet,
                          on_item_error=report, placement=placement)
    listed = f"; {len(added.errors)} item error(s) in {errors_file or errors_file_for(out_dir)}" \
        if added.errors else ""
    click.echo(f"added {added.added} item(s) to {added.before} ({added.placement}) -> "
               f"{out_dir}{listed}", err=True)
