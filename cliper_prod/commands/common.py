"""What several commands share: option parsers, the metrics table, and the repeated options
that make the CLI's one grammar (README, "Command-line conventions")."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cliper_prod.backbones import BACKBONE_NAMES
from cliper_prod.bundle_format import PRECISIONS
from cliper_prod.errors import ConfigError
from cliper_prod.runtime.providers import PROVIDERS

#: Where commands write by default: everything a run makes lies under ``runs/``, apart from the
#: packaged presets (``models/``) and the bundle format's documentation (``export/``).
RUNS = Path("runs")
DEFAULT_CHECKPOINTS = RUNS / "checkpoints"
DEFAULT_EXPORTS = RUNS / "export"
DEFAULT_BUNDLE = DEFAULT_EXPORTS / "freedom"
#: ``--device`` of the torch commands (train, evaluate, compare, ablate-fusion, embed --clip)
DEVICES = ("auto", "cpu", "cuda")


def _split_assignment(pair: str, option: str) -> tuple[str, str, str]:
    key, sep, raw = pair.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or section not in ("model", "train"):
        raise ConfigError(f"{option} expects section.key=value with section model or train, "
                          f"got {pair!r}")
    return section, name, raw


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word is a string


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``model.dropout=0.5`` -> {"model": {"dropout": 0.5}}; values are parsed as TOML."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        section, name, raw = _split_assignment(pair, "--set")
        out.setdefault(section, {})[name] = _parse_value(raw)
    return out


def parse_grid(pairs: tuple[str, ...], config: dict) -> dict[str, list]:
    """``model.reg_weight=0,1e-4`` -> {"model.reg_weight": [0, 0.0001]}, keys checked."""
    grid: dict[str, list] = {}
    for pair in pairs:
        section, name, raw = _split_assignment(pair, "--grid")
        if name not in config[section]:
            raise ConfigError(f"--grid: unknown key [{section}] {name}")
        grid[f"{section}.{name}"] = [_parse_value(v) for v in raw.split(",")]
    return grid


def given_options(ctx: click.Context, names: tuple[str, ...] | list[str]) -> list[str]:
    """The flags of ``names`` (parameter names) set by the user rather than left at their
    defaults: options that would be silently ignored are refused by name."""
    return [f"--{name.replace('_', '-')}" for name in names
            if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)]


def parse_list(raw: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated list of names, each one of ``allowed``; at least one."""
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ConfigError(f"{option}: unknown {unknown}; available: {', '.join(allowed)}")
    return names


def format_metrics(metrics: dict[str, float], topk: tuple[int, ...] | list[int]) -> str:
    """Recall@K and NDCG@K as a two-line table."""
    names = ("recall", "ndcg")
    header = "        " + "".join(f"{n + '@' + str(k):>14}" for k in topk for n in names)
    row = "        " + "".join(f"{metrics[f'{n}@{k}']:>14.4f}" for k in topk for n in names)
    return header + "\n" + row


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class GrammarOption(click.Option):
    """An option whose ``old_names`` (spellings kept for one release after the CLI grammar
    changed) still parse, are marked deprecated in ``--help`` and warn on stderr when used
    (:func:`warn_old_spellings`)."""

    def __init__(self, *decls: Any, old_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*decls, **kwargs)
        self.old_names = old_names

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        names = self.opts, self.secondary_opts
        self.opts = [o for o in names[0] if o not in self.old_names]
        self.secondary_opts = [o for o in names[1] if o not in self.old_names]
        try:
            record = super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = names
        if record is None or not self.old_names:
            return record
        return record[0], f"{record[1]}  [deprecated spelling: {', '.join(self.old_names)}]"

    def new_name(self, old: str) -> str:
        """The grammar's spelling of the old name ``old``."""
        return self.secondary_opts[0] if old in self.secondary_opts else self.opts[0]


def grammar_option(*decls: str, old_names: tuple[str, ...] = (), **kwargs: Any) -> Decorator:
    """``click.option`` with old spellings kept as deprecated aliases (listed in ``decls`` and
    named again in ``old_names``)."""
    return click.option(*decls, cls=GrammarOption, old_names=old_names, **kwargs)


def warn_old_spellings(command: click.Command, args: list[str]) -> None:
    """One line on stderr for each deprecated spelling in ``args`` (up to ``--``)."""
    old = {name: param for param in command.params if isinstance(param, GrammarOption)
           for name in param.old_names}
    for arg in args:
        if arg == "--":
            break
        name = arg.partition("=")[0]
        param = old.get(name)
        if param is not None:
            click.echo(f"warning: {name} is deprecated and goes in the next release; use "
                       f"{param.new_name(name)}", err=True)


def quiet_option(what: str = "No progress bars or per-epoch lines.") -> Decorator:
    """``-q/--quiet``: off, long work reports progress (a bar on a terminal, a line every
    CLIPER_PROGRESS_INTERVAL seconds elsewhere)."""
    return click.option("-q", "--quiet", is_flag=True, help=what)


def strict_option(default: bool, strict: str, skip: str,
                  old_names: tuple[str, ...] = ()) -> Decorator:
    """``--strict/--skip-bad``: the first bad record stops the run, or bad records are skipped
    and reported; each command keeps its own default."""
    decls = ("--strict/--skip-bad",) + tuple(f" /{name}" for name in old_names)
    return grammar_option(*decls, "strict", old_names=old_names, default=default,
                          show_default=True, help=f"--strict: {strict} --skip-bad: {skip}")


def argument_or_option(argument: Path | None, option: Path | None, argument_name: str,
                       flag: str) -> Path:
    """A command's main path, given as its first argument or as ``flag`` (one of them)."""
    if (argument is None) == (option is None):
        raise ConfigError(f"pass {argument_name} (or {flag} {argument_name}), once")
    return argument if argument is not None else option  # type: ignore[return-value]


def device_option(what: str = "auto: the GPU when one is usable.") -> Decorator:
    """``--device auto|cpu|cuda`` of the torch commands, turned into a torch device by
    :func:`cliper_prod.device.resolve_device`."""
    return click.option("--device", type=click.Choice(DEVICES), default="auto",
                        show_default=True, help=what)


def provider_option() -> Decorator:
    """``--provider auto|cpu|cuda``: the ONNX Runtime execution provider of the bundle's
    sessions (:mod:`cliper_prod.runtime.providers`); ``--device`` is kept as its old spelling."""
    return grammar_option("--provider", "--device", "provider", type=click.Choice(PROVIDERS),
                          old_names=("--device",), default="auto", show_default=True,
                          help="ONNX Runtime provider; auto: CUDA when onnxruntime-gpu sees a "
                               "GPU.")


def precision_option(what: str) -> Decorator:
    """``--precision``: which exported CLIP graphs run (the same rule for every command)."""
    return click.option("--precision", type=click.Choice(["auto", *PRECISIONS]), default="auto",
                        show_default=True,
                        help=f"{what} auto: int8 on the CPU where the export measured it faster "
                             "than fp32, else fp32; a precision the bundle lacks is refused.")


def inter_op_threads_option(where: str) -> Decorator:
    """``--inter-op-threads``: ONNX Runtime's threads for independent operators."""
    return click.option("--inter-op-threads", type=click.IntRange(min=0), default=0,
                        show_default=True,
                        help=f"ONNX Runtime threads running independent operators side by side "
                             f"{where} (0: ORT's own).")


def backbone_option(**kwargs: Any) -> Decorator:
    return click.option("--backbone", type=click.Choice(BACKBONE_NAMES), **kwargs)
