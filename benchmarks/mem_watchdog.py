"""Run a command and kill it (its whole process group) when the machine runs short of memory,
so that a large benchmark on a shared box fails alone instead of pulling the kernel's OOM
killer onto other people's processes.

    python benchmarks/mem_watchdog.py --min-available-gib 2 -- nice -n 10 python big_job.py

Polls MemAvailable in /proc/meminfo; the command's exit status is passed through, and 137 with
a line on stderr when the watchdog fired.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def mem_available_gib() -> float:
    """The kernel's estimate of memory available to new work, GiB."""
    with open("/proc/meminfo") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    return kib / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-available-gib", type=float, default=2.0)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between polls")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    proc = subprocess.Popen(command, start_new_session=True)  # its own group: kill it whole
    lowest = mem_available_gib()
    while proc.poll() is None:
        available = mem_available_gib()
        lowest = min(lowest, available)
        if available < args.min_available_gib:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"mem_watchdog: FIRED, MemAvailable {available:.2f} GiB < "
                  f"{args.min_available_gib} GiB; killed {command[0]} (pid {proc.pid})",
                  file=sys.stderr, flush=True)
            return 137
        time.sleep(args.interval)
    print(f"mem_watchdog: exit {proc.returncode}, lowest MemAvailable {lowest:.2f} GiB",
          file=sys.stderr, flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
