"""``cliper-prod synthetic``: the built-in synthetic catalog (items, images, interactions)."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.commands.common import argument_or_option, grammar_option
from cliper_prod.errors import ConfigError


@click.command("synthetic")
@click.argument("out_argument", metavar="[OUT]", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="New catalog folder (or give it as the first argument, OUT).")
@grammar_option("--n-users", "--users", "n_users", old_names=("--users",), type=int,
                default=600, show_default=True, help="Users to generate.")
@grammar_option("--n-items", "--items", "n_items", old_names=("--items",), type=int,
                default=400, show_default=True, help="Items to generate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing catalog folder.")
def command(out_argument: Path | None, out_dir: Path | None, n_users: int, n_items: int,
            seed: int, overwrite: bool) -> None:
    """Generate the built-in synthetic catalog (items with text and images, users,
    interactions, split) in MMRec format."""
    from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
    from cliper_prod.io import check_output

    out_dir = argument_or_option(out_argument, out_dir, "OUT", "--out")
    check_output(out_dir, "folder", "--out")
    try:
        spec = SyntheticSpec(n_users=n_users, n_items=n_items, seed=seed)
        click.echo(generate_catalog(out_dir, spec, overwrite=overwrite))
    except (ValueError, FileExistsError) as exc:
        raise ConfigError(str(exc)) from None
