"""``cliper-prod topk``: top-K items for each user of a file, from a bundle on ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cliper_prod.commands.common import (DEFAULT_BUNDLE, backbone_option, provider_option,
                                         quiet_option, strict_option)
from cliper_prod.errors import BundleError, ConfigError


@click.command("topk")
@click.option("--users", "users_file", type=click.Path(path_type=Path), metavar="FILE",
              help="One user id per line (the dataset's ids); # comments, blank lines allowed.")
@click.option("--histories", "histories_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Or users absent from training, one JSON line each: {\"user_id\": label, "
                   "\"history\": [item ids]}, folded in by the backbone's user rule.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), metavar="DIR",
              default=DEFAULT_BUNDLE, show_default=True,
              help="Bundle written by `cliper-prod export`.")
@click.option("-k", "k", type=click.IntRange(min=1), default=20, show_default=True,
              help="Items per user (at most the bundle's max-k).")
@click.option("--out", "out_file", type=click.Path(path_type=Path), metavar="FILE",
              help="JSON Lines output file [default: stdout].")
@strict_option(True, "stop at the first unknown, duplicate or malformed line; nothing is "
                     "written.", "skip such lines (each reported on stderr) and go on.",
               old_names=("--skip-unknown",))
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Users ranked per ONNX Runtime call.")
@provider_option()
@backbone_option(help="Refuse a bundle of another backbone (a guard for deployment scripts).")
@quiet_option("No progress (bar or log lines).")
def command(users_file: Path | None, histories_file: Path | None, bundle_dir: Path, k: int,
            out_file: Path | None, strict: bool, batch_size: int, provider: str,
            backbone: str | None, quiet: bool) -> None:
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
    options = {"k": k, "skip_unknown": not strict, "batch_size": batch_size,
               "progress": not quiet}
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
