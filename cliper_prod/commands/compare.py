"""``cliper-prod compare``: vanilla vs CLIPER features for each backbone, the paper's Table 2."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.backbones import BACKBONE_NAMES
from cliper_prod.commands.common import device_option, parse_list, parse_overrides, quiet_option
from cliper_prod.errors import ConfigError

PAPER_BACKBONES = "lattice,mmgcn,dualgnn,slmrec,freedom"  # the paper's Table 2


@click.command("compare")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="MMRec-format dataset folder.")
@click.option("--features-vanilla", type=click.Path(path_type=Path), metavar="DIR",
              help="Folder of the vanilla features [default: the data folder's *_feat.npy].")
@click.option("--features-cliper", type=click.Path(path_type=Path), metavar="DIR",
              help="Folder written by `cliper-prod embed` [default: DATA/cliper].")
@click.option("--backbones", default=PAPER_BACKBONES, show_default=True,
              help="Comma-separated backbones to train.")
@click.option("--seeds", default="999,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a setting of every backbone, e.g. --set train.epochs=50.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), metavar="DIR",
              default=Path("runs") / "compare", show_default=True,
              help="Report folder (compare.md, compare.json, compare.png).")
@device_option("Where every run trains and ranks; auto: the GPU when torch sees one.")
@quiet_option()
def command(data_dir: Path, features_vanilla: Path | None, features_cliper: Path | None,
            backbones: str, seeds: str, overrides: tuple[str, ...], out_dir: Path,
            device: str, quiet: bool) -> None:
    """Train each backbone on vanilla and on CLIPER features over several seeds; write the
    paper's Table 2 layout (compare.md, compare.json) and a bar chart (compare.png)."""
    from cliper_prod.comparison import compare_backbones, table, write_report
    from cliper_prod.device import resolve_device
    from cliper_prod.io import check_output

    check_output(out_dir, "folder")
    torch_device = resolve_device(device)
    names = parse_list(backbones, "--backbones", BACKBONE_NAMES)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: comma-separated integers") from None
    if not seed_list:
        raise ConfigError("--seeds: give at least one seed")
    features = {"vanilla": features_vanilla,
                "cliper": features_cliper or data_dir / "cliper"}
    result = compare_backbones(data_dir, features, backbones=names, seeds=seed_list,
                               overrides=parse_overrides(overrides), progress=not quiet,
                               device=torch_device)
    write_report(result, out_dir)
    click.echo(table(result))
    click.echo(f"-> {out_dir}/compare.md, compare.json, compare.png", err=True)
