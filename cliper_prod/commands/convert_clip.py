"""``cliper-prod convert-clip``: an OpenAI-format CLIP / Long-CLIP .pt -> a transformers folder."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.commands.common import argument_or_option


@click.command("convert-clip")
@click.argument("checkpoint_argument", metavar="[CHECKPOINT]", required=False,
                type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              metavar="FILE",
              help="The OpenAI-format .pt file (or give it as the first argument, CHECKPOINT).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="New transformers CLIP folder.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, metavar="DIR",
              help="A CLIP folder whose tokenizer files are copied (same BPE).")
def command(checkpoint_argument: Path | None, checkpoint: Path | None, out_dir: Path,
            tokenizer_dir: Path) -> None:
    """Convert an OpenAI-format CLIP or Long-CLIP .pt checkpoint into a transformers folder
    usable with `embed --clip`."""
    from cliper_prod.features.convert_clip import convert_checkpoint
    from cliper_prod.io import check_output

    checkpoint = argument_or_option(checkpoint_argument, checkpoint, "CHECKPOINT",
                                    "--checkpoint")
    check_output(out_dir, "folder")
    click.echo(convert_checkpoint(checkpoint, out_dir, tokenizer_dir))
