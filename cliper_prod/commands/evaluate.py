"""``cliper-prod evaluate``: full-ranking metrics of a trained checkpoint on one split."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cliper_prod.commands.common import device_option, format_metrics


@click.command("evaluate")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="Folder written by `cliper-prod train`.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Dataset folder [default: the one the model was trained on].")
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True,
              help="The split ranked.")
@click.option("--mask-valid-in-test", is_flag=True,
              help="Also hide validation items when ranking for test.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@device_option("Where the model and the ranking run, whatever device trained it; auto: the "
               "GPU when torch sees one.")
def command(checkpoint: Path, data_dir: Path | None, split: str, mask_valid_in_test: bool,
            as_json: bool, device: str) -> None:
    """Full-ranking Recall/NDCG/Precision/MAP of a trained model on one split."""
    from cliper_prod.checkpoint import load_model
    from cliper_prod.config import TrainSettings, build
    from cliper_prod.device import resolve_device
    from cliper_prod.training import evaluate_model, ranking_tasks

    model, data, payload = load_model(checkpoint, data_dir, device=resolve_device(device))
    settings = build(TrainSettings, payload["config"]["train"], "train")
    metrics = evaluate_model(model, ranking_tasks(data, mask_valid_in_test)[split], settings)
    if as_json:
        click.echo(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        click.echo(f"{payload['backbone']} on {data.name}, {split}:\n"
                   + format_metrics(metrics, settings.topk))
