"""``cliper-prod random-features``: standard-normal stand-in features for a dataset without any."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("random-features")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="MMRec-format folder whose .inter defines the items.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="New folder: links to the .inter and id maps plus the generated features.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
def command(data_dir: Path, out_dir: Path, seed: int) -> None:
    """Add standard-normal stand-in features (4096-d image, 384-d text) to a dataset without any.

    They carry no item semantics: for comparing implementations side by side only.
    """
    from cliper_prod.data.random_features import with_random_features
    from cliper_prod.io import check_output

    check_output(out_dir, "folder")
    click.echo(with_random_features(data_dir, out_dir, seed))
