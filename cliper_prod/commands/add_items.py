"""``cliper-prod add-items``: new items into a bundle without retraining (fold-in)."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.commands.common import provider_option, quiet_option


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
@provider_option()
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32",
              show_default=True, help="Which CLIP graphs embed --items.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--strict", is_flag=True, help="Fail (exit 3) at the first item error of --items.")
@quiet_option("No progress bar.")
def command(bundle_dir: Path, items_path: Path | None, features_dir: Path | None,
            out_dir: Path, provider: str, precision: str, batch_size: int, strict: bool,
            quiet: bool) -> None:
    """Add items to a bundle without retraining: each new item is placed in the model's item
    graph by kNN over the same features the model used, its embedding is the backbone's own
    item-graph propagation, and a new verified bundle is written (see README, "Fresh
    catalogs"). Items the bundle already has are refused."""
    from cliper_prod.export.add_items import add_items

    def report(error: dict) -> None:
        where = f"{items_path}/{error['file']}" if "file" in error else str(items_path)
        at = f"{where}:{error['line']}" if "line" in error else f"{where}: row {error['row']}"
        click.echo(f"{at}: {error['action']}: {error['reason']}", err=True)

    added = add_items(bundle_dir, out_dir, items=items_path, features=features_dir,
                      provider=provider, precision=precision, batch_size=batch_size,
                      strict=strict, progress=not quiet, on_item_error=report)
    click.echo(f"added {added.added} item(s) to {added.before} -> {out_dir}", err=True)
