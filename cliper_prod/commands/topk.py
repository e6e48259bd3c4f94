"""``cliper-prod topk``: top-K items for each user of a file, from a bundle on ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cliper_prod.commands.common import DEFAULT_BUNDLE, backbone_option, provider_option
from cliper_prod.errors import BundleError, ConfigError


@click.command("topk")
@click.option("--users", "users_file", type=click.Path(path_type=Path),
              help="One user id per line (the dataset's ids); # comments, blank lines allowed.")
@click.option("--histories", "histories_file", type=click.Path(path_type=Path),
              help="Or users absent from training, one JSON line each: {\"user\": label, "
                   "\"history\": [item ids]}, folded in by the backbone's user rule.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              default=DEFAULT_BUNDLE, show_default=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--out", "out_file", type=click.Path(path_type=Path),
              help="JSON Lines output [default: stdout].")
@click.option("--skip-unknown", is_flag=True,
              help="Skip unknown, duplicate and malformed lines (reported on stderr) instead "
                   "of stopping at the first.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True)
@provider_option()
@backbone_option(help="Refuse a bundle of another backbone (a guard for deployment scripts).")
def command(users_file: Path | None, histories_file: Path | None, bundle_dir: Path, k: int,
            out_file: Path | None, skip_unknown: bool, batch_size: int, provider: str,
            backbone: str | None) -> None:
    """Top-K items for each user of a file, training items excluded, as JSON Lines
    ({"user_id", "items", "scores"}), from an exported bundle on ONNX Runtime. With
    --histories, for users the model never saw: each is folded in from the items of their
    history, which is excluded, and unknown item ids are listed in "unknown_items"."""
    from cliper_prod.io import check_output
    from cliper_prod.runtime import rank_files
    from cliper_prod.runtime.bundle_reader import Bundle
    from cliper_prod.runtime.ranking import KOutOfRange, TopKRanker

    if (users_file is None) == (histories_file is None):
        raise ConfigError("pass exactly one of --users or --histories")
    path = users_file or histories_file
    if not path.is_file():
        raise ConfigError(f"{path}: {'users' if users_file else 'histories'} file not found")
    if out_file is not None:
        check_output(out_file, "file")
    bundle = Bundle(bundle_dir, provider, backbone)
    ranker = TopKRanker(bundle)
    try:
        ranker.check_k(k)
    except KOutOfRange as exc:
        raise ConfigError(f"-k {k}: the bundle ranks at most {exc.max_k} items per user "
                          f"(export with a larger --max-k)") from None
    if histories_file is not None:
        problem = ranker.fold_in.user_rule_problem()
        if problem:
            raise BundleError(f"{bundle.folder}: {problem}")
    write = rank_files.rank_users if users_file is not None else rank_files.rank_histories
    options = {"k": k, "skip_unknown": skip_unknown, "batch_size": batch_size}
    if out_file is None:
        summary = write(ranker, path, sys.stdout, **options)
    else:
        summary = rank_files.to_file(write, ranker, path, out_file, **options)
    for skipped in summary.skipped:
        click.echo(f"{path}:{skipped['line']}: skipped: {skipped['reason']}", err=True)
    unknown = (f", {summary.unknown_items} unknown item id(s) listed in the output"
               if summary.unknown_items else "")
    click.echo(f"top-{k} for {summary.users} user(s), {len(summary.skipped)} line(s) skipped"
               f"{unknown}" + (f" -> {out_file}" if out_file else ""), err=True)
