"""Output paths: the one policy every writing command checks its outputs by, and atomic
writes, so that a reader never sees a half-written file under its final name.

Every temporary file or folder is a sibling of the output it becomes, named
``.<output name>.<process id>.<random>.tmp`` (:func:`temp_prefix`): a run removes its own on
every exit it lives through (Ctrl-C and SIGTERM included: the CLI turns SIGTERM into
:class:`~cliper_prod.errors.Terminated`), and the next run that writes the same output removes
those of runs that no longer live (killed by SIGKILL), saying so (:func:`sweep_stale`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from cliper_prod.bundle_format import MANIFEST
from cliper_prod.errors import ConfigError

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, outputs get the usual permissions
TEMP_SUFFIX = ".tmp"
#: what an output path is: a file replaced whole, a folder written into (embed, train), or a
#: folder replaced whole by a new one (a bundle: export, add-items)
OutputKind = Literal["file", "folder", "bundle"]


def temp_prefix(final: Path) -> str:
    """The name prefix of this process's temporaries for ``final`` (see the module docstring)."""
    return f".{final.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries in ``folder`` (those of the output ``name``, or any) whose
    process no longer runs (a run killed by SIGKILL), each with a warning; the paths
    removed."""
    prefix = f".{name}." if name else "."
    removed = []
    for path in folder.glob(glob.escape(prefix) + "*" + TEMP_SUFFIX):
        parts = path.name[len(prefix):-len(TEMP_SUFFIX)].split(".")
        # after the output's name comes its writer's pid; with the name unknown, the first
        # all-digit part after the name's first (a name part mistaken for it is only kept)
        pids = [int(p) for p in (parts[:1] if name else parts[1:]) if p.isdigit()]
        if not pids or pids[0] == os.getpid() or _alive(pids[0]):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.warning("%s: removed, left by an interrupted run (process %d)", path, pids[0])
        removed.append(path)
    return removed


def check_output(path: Path, kind: OutputKind, option: str = "--out") -> None:
    """The one output-path policy, checked before any work (a ConfigError, exit 2, in one
    line): ``path`` may not be a symbolic link nor lie under a file; a ``file`` may not be an
    existing folder, a ``folder`` or ``bundle`` not an existing file, and a ``bundle`` (a
    folder replaced whole) not an existing folder that holds anything but a bundle. The
    temporaries killed runs left beside ``path`` (and in a ``folder`` written into) are
    removed (:func:`sweep_stale`)."""
    where = f"{option} {path}"
    if path.is_symlink():
        raise ConfigError(f"{where}: is a symbolic link; give the folder or file it should be "
                          f"written to itself")
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{where}: {parent} is a file, not a folder")
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{where}: is a folder; a file is written there")
    if kind != "file" and path.exists() and not path.is_dir():
        raise ConfigError(f"{where}: is a file; a folder is written there")
    if kind == "bundle" and path.is_dir() and any(path.iterdir()) \
            and not (path / MANIFEST).is_file():
        raise ConfigError(f"{where}: exists, holds files and is not a bundle; only a bundle "
                          f"folder is replaced")
    sweep_stale(path.parent, path.name)
    if kind == "folder" and path.is_dir():
        sweep_stale(path)


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(final), suffix=TEMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def no_empty_folders_on_failure(path: Path) -> Iterator[None]:
    """On an exception, remove the folders up to ``path`` that did not exist before and are
    still empty (a run that fails writes nothing, not even its output folder); a folder that
    was there before, or holds anything (resumable work), is never touched."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): left as it is
                break
        raise


def count_lines(path: str | os.PathLike[str]) -> int:
    """The lines of a text file (a last one without its newline counted), read in blocks
    without decoding: a progress total for a file that is streamed afterwards."""
    lines, last = 0, b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
