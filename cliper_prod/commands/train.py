"""``cliper-prod train``: one backbone (or a grid of settings), early-stopped on validation."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.commands.common import (DEFAULT_CHECKPOINTS, backbone_option, device_option,
                                         format_metrics, parse_grid, parse_overrides,
                                         quiet_option)
from cliper_prod.errors import ConfigError


@click.command("train")
@backbone_option(default="freedom", show_default=True, help="Recommender to train.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="MMRec-format dataset folder (<name>.inter, optional *_feat.npy).")
@click.option("--features", type=click.Choice(["vanilla", "cliper"]), default="vanilla",
              show_default=True, help="vanilla: the data folder's *_feat.npy as given; cliper: "
                                      "the output of `cliper-prod embed` (see --features-dir).")
@click.option("--features-dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Folder written by `cliper-prod embed` [default: DATA/cliper].")
@click.option("--config", "config_file", type=click.Path(path_type=Path), metavar="FILE",
              help="TOML file overriding the backbone's defaults (models/<backbone>.toml).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one setting, e.g. --set model.dropout=0.5 (repeatable).")
@click.option("--grid", "grid_pairs", multiple=True, metavar="SECTION.KEY=V1,V2,...",
              help="Train every combination and keep the best on validation, e.g. "
                   "--grid model.reg_weight=0,1e-5,1e-4,1e-3 (repeatable). Test is ranked "
                   "once, for the selected point only.")
@click.option("--seed", type=int, help="Random seed (overrides [train] seed).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), metavar="DIR",
              help=f"Checkpoint folder [default: {DEFAULT_CHECKPOINTS}/<backbone>-<dataset>].")
@click.option("--mask-valid-in-test", is_flag=True,
              help="Also hide validation items when ranking for test (MMRec does not).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its last epoch (same options and device).")
@device_option("Where the model, its graphs and the ranking run; auto: the GPU when torch "
               "sees one.")
@quiet_option()
def command(backbone: str, data_dir: Path, features: str, features_dir: Path | None,
            config_file: Path | None, overrides: tuple[str, ...], grid_pairs: tuple[str, ...],
            seed: int | None, out_dir: Path | None, mask_valid_in_test: bool, resume: bool,
            device: str, quiet: bool) -> None:
    """Train a backbone with BPR, early-stopped on the validation split.

    Writes model.pt, user/item embedding tables, history.json, metrics.json and
    training_curve.png to the checkpoint folder.
    """
    from cliper_prod.config import load_config
    from cliper_prod.data.mmrec import load_dataset
    from cliper_prod.device import resolve_device
    from cliper_prod.io import check_output
    from cliper_prod.training import lean_loading, train_model

    if out_dir is not None:
        check_output(out_dir, "folder")
    torch_device = resolve_device(device)
    extra = parse_overrides(overrides)
    if seed is not None:
        extra.setdefault("train", {})["seed"] = seed
    config = load_config(backbone, config_file, extra)
    grid = parse_grid(grid_pairs, config)
    if features == "cliper":
        features_dir = features_dir or data_dir / "cliper"
    elif features_dir is not None:
        raise ConfigError("--features-dir needs --features cliper")
    data = load_dataset(data_dir, features_dir=features_dir,
                        **lean_loading(backbone, config["train"]["memory_lean"]))
    click.echo(data.summary(), err=True)
    if out_dir is None:
        out_dir = DEFAULT_CHECKPOINTS / f"{backbone}-{data.name}"
        check_output(out_dir, "folder")
    result = train_model(backbone, data, config, out_dir, progress=not quiet,
                         mask_valid_in_test=mask_valid_in_test, grid=grid, resume=resume,
                         device=torch_device)
    if result.grid:
        click.echo(f"selected on validation: {result.config['model']}")
    click.echo(f"best epoch {result.best_epoch} of {len(result.history)}; checkpoint: {out_dir}")
    topk = config["train"]["topk"]
    click.echo("valid:\n" + format_metrics(result.valid, topk))
    click.echo("test (at the best valid epoch):\n" + format_metrics(result.test, topk))
