"""``cliper-prod synthetic``: the built-in synthetic catalog (items, images, interactions)."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.errors import ConfigError


@click.command("synthetic")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--users", type=int, default=600, show_default=True)
@click.option("--items", type=int, default=400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing catalog folder.")
def command(out_dir: Path, users: int, items: int, seed: int, overwrite: bool) -> None:
    """Generate the built-in synthetic catalog (items with text and images, users,
    interactions, split) in MMRec format."""
    from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
    from cliper_prod.io import check_output

    check_output(out_dir, "folder", "OUT_DIR")
    try:
        spec = SyntheticSpec(n_users=users, n_items=items, seed=seed)
        click.echo(generate_catalog(out_dir, spec, overwrite=overwrite))
    except (ValueError, FileExistsError) as exc:
        raise ConfigError(str(exc)) from None
