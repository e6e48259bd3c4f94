"""Every error the CLI turns into one line ``error: ...`` and a documented exit code.

One class per exit code (README's exit-code table is tested against :data:`EXIT_CODES`), so a
reader finds every way a command can fail in this one module, and a new stage reuses a code
instead of inventing one.
"""

from __future__ import annotations

import uuid


class CliperError(Exception):
    """Base class: a problem the user can fix; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(CliperError):
    """A configuration file or option is invalid, or an interrupted run's state is in the way."""

    exit_code = 2


class DataError(CliperError):
    """Input data is malformed; the message names the file, the line and the problem."""

    exit_code = 3

    def __init__(self, path: object, problem: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem

    def __reduce__(self) -> tuple:
        """Rebuilt from its parts when it crosses a process boundary (a Ray worker's error
        reaches the driver), not from a message another layer may have extended."""
        return type(self), (self.path, self.problem, self.line)


class CheckpointError(CliperError):
    """A checkpoint folder is missing, incomplete or does not fit the data."""

    exit_code = 4


class TrainingDiverged(CliperError):
    """The training loss became NaN or infinite."""

    exit_code = 5


class ModelLoadError(CliperError):
    """A CLIP checkpoint (local folder or hub id) could not be loaded."""

    exit_code = 6


class ConversionError(ModelLoadError):
    """An OpenAI-format CLIP / Long-CLIP checkpoint could not be converted."""


class BundleError(CliperError):
    """A bundle is missing, incomplete, tampered with, or of a format this version can't read."""

    exit_code = 7


class ExportError(CliperError):
    """Export could not produce a graph that matches the PyTorch model."""

    exit_code = 8


class RuntimeSetupError(CliperError):
    """ONNX Runtime is missing, or cannot run a graph on the requested device."""

    exit_code = 9


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (the CLI installs the handler) so that it unwinds
    as Ctrl-C does: temporaries removed, resumable work kept."""


def interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """``exc`` itself when it is Ctrl-C or SIGTERM, or the one it was raised from (a library
    that catches everything may turn one into its own error), or None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


INTERRUPTED = 130
TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended

#: exit code -> what it means, as README's table states it.
EXIT_CODES: dict[int, str] = {
    0: "success",
    CliperError.exit_code: "unexpected failure",
    ConfigError.exit_code: "bad option or configuration",
    DataError.exit_code: "bad input data",
    CheckpointError.exit_code: "bad checkpoint",
    TrainingDiverged.exit_code: "training diverged",
    ModelLoadError.exit_code: "a CLIP checkpoint could not be loaded",
    BundleError.exit_code: "bad bundle",
    ExportError.exit_code: "export failed",
    RuntimeSetupError.exit_code: "ONNX Runtime missing",
    INTERRUPTED: "interrupted (Ctrl-C, SIGINT)",
    TERMINATED: "terminated (SIGTERM)",
}


def incident_id() -> str:
    """The id an unexpected failure is logged under and answered with, to match the two."""
    return uuid.uuid4().hex[:16]
