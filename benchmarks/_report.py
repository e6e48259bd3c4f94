"""Shared pieces of the benchmark scripts: the ending (print the table, keep JSON and
Markdown), a free port, peak memory, the CPU's name."""

from __future__ import annotations

import platform
import socket
from pathlib import Path

from cliper_prod.io import write_json, write_text


def report(out: Path, result: dict, table: str) -> None:
    """Print ``table`` and write ``out``.json (all figures) and ``out``.md (the table)."""
    print(table)
    write_json(out.with_suffix(".json"), result)
    write_text(out.with_suffix(".md"), table + "\n")


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM), GiB. Not getrusage: after fork + exec, its
    ru_maxrss still counts the forked copy of the parent, so a child of a large process would
    report the parent's size."""
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return round(kib / 2**20, 2)


#: ``cliper-prod`` run in a child that prints its own peak (VmHWM, kB) on stderr at exit
MEASURED_CLI = ["-c", "import atexit, sys; atexit.register(lambda: print('PEAK_RSS_KB', next("
                "line.split()[1] for line in open('/proc/self/status') if "
                "line.startswith('VmHWM:')), file=sys.stderr)); "
                "from cliper_prod.commands import cli; cli(prog_name='cliper-prod')"]


def child_peak_rss_gib(stderr: str) -> float:
    """The figure a :data:`MEASURED_CLI` child printed."""
    return round(int(stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 2**20, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    """The CPU's name as Linux reports it (``platform.processor()`` is empty there)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name")), platform.machine())
    except OSError:  # not Linux
        return platform.processor() or platform.machine()
