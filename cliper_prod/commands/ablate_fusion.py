"""``cliper-prod ablate-fusion``: the backbone trained on features of each fusion mode."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.commands.common import device_option, parse_list, quiet_option
from cliper_prod.fusion_modes import EXTRACTION_FUSIONS, FUSION_NAMES


@click.command("ablate-fusion")
@click.option("--items", type=click.Path(path_type=Path, exists=True), required=True,
              metavar="FILE",
              help="Items JSONL of the dataset's items.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="MMRec-format folder (its i_id_mapping.csv names the items).")
@click.option("--clip", "clip_source", required=True, metavar="DIR|HUB_ID",
              help="CLIP checkpoint folder or hub id.")
@click.option("--random-init", is_flag=True,
              help="Build the CLIP from its config with RANDOM weights (plumbing only).")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("runs/ablate-fusion"),
              show_default=True, metavar="DIR",
              help="Where each mode's features and checkpoint and ablation.json go.")
@click.option("--modes", default=",".join(EXTRACTION_FUSIONS), show_default=True,
              help=f"Comma-separated fusion modes, of {', '.join(FUSION_NAMES)}.")
@click.option("--backbone", type=click.Choice(["freedom"]), default="freedom", show_default=True,
              help="Recommender trained on each mode's features.")
@click.option("--epochs", type=click.IntRange(min=1), help="Cap on training epochs.")
@click.option("--reg-weight", type=click.FloatRange(min=0), default=None,
              help="FREEDOM's modality-loss weight for every mode (mlp needs > 0).")
@device_option("Where CLIP embeds and the backbone trains and ranks; auto: the GPU when torch "
               "sees one.")
@quiet_option()
def command(items: Path, data_dir: Path, clip_source: str, random_init: bool, workdir: Path,
            modes: str, backbone: str, epochs: int | None, reg_weight: float | None,
            device: str, quiet: bool) -> None:
    """Train the backbone on features of each fusion mode and print a table (selected on
    validation, test at that epoch)."""
    from cliper_prod.device import resolve_device
    from cliper_prod.io import write_json
    from cliper_prod.pipeline import run_fusion_ablation

    torch_device = resolve_device(device)
    chosen = tuple(parse_list(modes, "--modes", FUSION_NAMES))
    overrides: dict = {"model": {"reg_weight": reg_weight}} if reg_weight is not None else {}
    if epochs is not None:
        overrides["train"] = {"epochs": epochs}
    rows = run_fusion_ablation(items, data_dir, clip_source, workdir, modes=chosen,
                               backbone=backbone, overrides=overrides, random_init=random_init,
                               progress=not quiet, device=torch_device)
    write_json(workdir / "ablation.json", rows)
    click.echo("| fusion | best epoch | valid R@20 | test R@20 | test N@20 | test R@50 |")
    click.echo("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        click.echo(f"| {r['fusion']} | {r['best_epoch']} | {r['valid']['recall@20']:.4f} | "
                   f"{r['test']['recall@20']:.4f} | {r['test']['ndcg@20']:.4f} | "
                   f"{r['test']['recall@50']:.4f} |")
    click.echo("note: with a random-weight CLIP these rows only prove the plumbing; use a "
               "pretrained checkpoint for a real ablation." if random_init else
               "note: differences between single runs within a few percent are seed noise.")
