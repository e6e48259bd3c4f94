"""``cliper-prod topk``: top-K items for each user of a file, from a bundle on ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cliper_prod.commands.common import DEFAULT_BUNDLE, backbone_option, device_option
from cliper_prod.errors import ConfigError


@click.command("topk")
@click.option("--users", "users_file", type=click.Path(path_type=Path), required=True,
              help="One user id per line (the dataset's ids); # comments, blank lines allowed.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              default=DEFAULT_BUNDLE, show_default=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--out", "out_file", type=click.Path(path_type=Path),
              help="JSON Lines output [default: stdout].")
@click.option("--skip-unknown", is_flag=True,
              help="Skip unknown, duplicate and malformed lines (reported on stderr) instead "
                   "of stopping at the first.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True)
@device_option()
@backbone_option(help="Refuse a bundle of another backbone (a guard for deployment scripts).")
def command(users_file: Path, bundle_dir: Path, k: int, out_file: Path | None,
            skip_unknown: bool, batch_size: int, device: str, backbone: str | None) -> None:
    """Top-K items for each user of a file, training items excluded, as JSON Lines
    ({"user_id", "items", "scores"}), from an exported bundle on ONNX Runtime."""
    from cliper_prod.runtime.bundle import Bundle
    from cliper_prod.runtime.topk import recommend, recommend_to_file

    if not users_file.is_file():
        raise ConfigError(f"{users_file}: users file not found")
    bundle = Bundle(bundle_dir, device, backbone)
    if out_file is None:
        summary = recommend(bundle, users_file, sys.stdout, k=k, skip_unknown=skip_unknown,
                            batch_size=batch_size)
    else:
        summary = recommend_to_file(bundle, users_file, out_file, k=k,
                                    skip_unknown=skip_unknown, batch_size=batch_size)
    for skipped in summary.skipped:
        click.echo(f"{users_file}:{skipped['line']}: skipped: {skipped['reason']}", err=True)
    click.echo(f"top-{k} for {summary.users} user(s), {len(summary.skipped)} line(s) skipped"
               + (f" -> {out_file}" if out_file else ""), err=True)
