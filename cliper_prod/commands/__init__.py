"""The ``cliper-prod`` command line: one module per command, each exposing ``command``.

``COMMANDS`` is the one list of them, in ``--help`` order. Command modules import only click
and :mod:`cliper_prod.commands.common` at the top; the work they call is imported inside the
command, so ``--help`` and the torch-free runtime install stay light. Expected problems print
one line ``error: ...`` and exit with the code of their :mod:`cliper_prod.errors` class, never a
traceback; library code logs (``logging``) and only these commands print.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
from typing import Any

import click

from cliper_prod import __version__
from cliper_prod.commands.common import warn_old_spellings
from cliper_prod.errors import (INTERRUPTED, TERMINATED, CliperError, Terminated,
                                interruption)

COMMANDS = ("train", "evaluate", "compare", "ablate_fusion", "embed", "convert_clip", "export",
            "add_items", "topk", "serve", "synthetic", "random_features", "demo")


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds the command as Ctrl-C does (its temporaries are removed on the way)."""
    raise Terminated()


class CliperGroup(click.Group):
    """Turns expected errors into one line on stderr and the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        previous = signal.signal(signal.SIGTERM, _terminate)  # `serve` installs its own
        try:
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt) as exc:
            # a library may catch Ctrl-C or SIGTERM and raise its own error from it (the ONNX
            # exporter, onnxruntime's import): the interruption is still what ends the run
            stop = interruption(exc)
            if stop is not None:
                terminated = isinstance(stop, Terminated)
                click.echo("terminated" if terminated else "interrupted", err=True)
                ctx.exit(TERMINATED if terminated else INTERRUPTED)
            if isinstance(exc, CliperError):
                click.echo(f"error: {exc}", err=True)
                ctx.exit(exc.exit_code)
            raise
        finally:
            if previous is not None:  # None: a handler not installed from Python
                signal.signal(signal.SIGTERM, previous)

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            warn_old_spellings(command, rest)
        return name, command, rest

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [self.commands[name.replace("_", "-")].name for name in COMMANDS]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (click's test runner swaps it),
    progress and results as plain lines, warnings and worse with their level."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


def configure_logging(verbose: bool) -> None:
    """The package's messages on stderr at INFO (DEBUG with -v), other libraries' from WARNING
    (the root logger's level); installed once per process."""
    logging.getLogger("cliper_prod").setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        root.addHandler(_StderrHandler())


@click.group(cls=CliperGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cliper-prod")
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail.")
def cli(verbose: bool) -> None:
    """CLIPER multi-modal recommendation: train graph backbones on MMRec-format data, evaluate
    them with full ranking, extract CLIPER features, export ONNX bundles, and serve them."""
    configure_logging(verbose)


for _name in COMMANDS:
    cli.add_command(importlib.import_module(f"{__name__}.{_name}").command)


def main() -> None:
    cli(prog_name="cliper-prod")
