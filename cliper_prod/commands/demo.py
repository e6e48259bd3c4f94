"""``cliper-prod demo``: the main job end to end on the built-in synthetic catalog."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.commands.common import quiet_option


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("runs/demo"),
              metavar="DIR",
              show_default=True, help="Where the catalog and checkpoints go.")
@click.option("--epochs", type=click.IntRange(min=1),
              help="Cap on training epochs [default: models/freedom.toml's, with early stopping].")
@quiet_option()
def command(workdir: Path, epochs: int | None, quiet: bool) -> None:
    """The main job on the built-in default: synthetic catalog -> CLIPER features -> train
    FREEDOM -> export the bundle -> features and top-K on ONNX Runtime.

    Needs no downloads. The CLIP is built from a config with random weights, so the accuracy
    shows the pipeline works, not multi-modal quality.
    """
    from cliper_prod.pipeline import run_demo

    run_demo(workdir, progress=not quiet, max_epochs=epochs)
