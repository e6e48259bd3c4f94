"""Errors the CLI turns into one-line messages and documented exit codes, never tracebacks."""

from __future__ import annotations


class CliperError(Exception):
    """Base class: a problem the user can fix; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class DataError(CliperError):
    """Input data is malformed; the message names the file, the line and the problem."""

    exit_code = 3

    def __init__(self, path: object, problem: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


class ConfigError(CliperError):
    """A configuration file or option is invalid."""

    exit_code = 2


class CheckpointError(CliperError):
    """A checkpoint folder is missing, incomplete or does not fit the data."""

    exit_code = 4
