"""Progress of long work, one implementation for every command: a bar on a terminal, periodic
log lines elsewhere.

A bar redraws many times a second; written to a log file or a pipe those redraws are noise
(every epoch's bar in a ``make demo`` log). So on a terminal (stderr a tty) the work draws a
tqdm bar, with its total and ETA where the total is known; off a terminal it logs one line every
``CLIPER_PROGRESS_INTERVAL`` seconds (default 30) with the count, the total where known, the rate
and the ETA, through :mod:`logging` (logger ``cliper_prod.progress``, INFO), so a job's log shows
that it moves without a bar's redraws. A heartbeat thread writes the lines even while the count
stands still (one long graph export, one slow batch). ``enabled=False`` (a command's
``-q/--quiet``) silences both.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar, Union

from tqdm import tqdm

from cliper_prod.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)

#: seconds between two progress lines off a terminal (set it low to see lines in a test)
INTERVAL_ENV = "CLIPER_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def bars_enabled(requested: bool) -> bool:
    """True when bars were requested and stderr (where tqdm draws) is a terminal."""
    return requested and sys.stderr.isatty()


def log_interval() -> float:
    """``CLIPER_PROGRESS_INTERVAL`` in seconds (> 0), or the default."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def _clock(seconds: float) -> str:
    """``seconds`` as H:MM:SS or M:SS."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LogProgress:
    """The off-terminal form of a bar: the subset of tqdm's interface this package uses
    (iteration, ``update``, ``set_postfix``, ``close``), reported as periodic log lines."""

    def __init__(self, iterable: Iterable[T] | None = None, *, desc: str = "progress",
                 total: float | None = None, unit: str = "it", initial: float = 0,
                 interval: float, **_: Any) -> None:
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.initial = total, initial, initial
        self.postfix = ""
        self.start = time.monotonic()
        self.logged = 0
        self._stop = threading.Event()
        threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._stop, interval),
                         daemon=True, name=f"progress-{desc}").start()

    def line(self, final: bool = False) -> str:
        """``desc: n/total unit (p%), rate unit/s, elapsed, ETA`` (the parts that are known)."""
        elapsed = time.monotonic() - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n:g}/{self.total:g} {self.unit}" if self.total else \
            f"{self.n:g} {self.unit}"
        if self.total:
            count += f" ({100 * self.n / self.total:.0f}%)"
        parts = [count, f"{rate:.3g} {self.unit}/s", f"elapsed {_clock(elapsed)}"]
        if not final and self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: {', '.join(parts)}" + (" (done)" if final else "")

    def _log(self, final: bool = False) -> None:
        log.info(self.line(final))
        self.logged += 1

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None, "LogProgress: no iterable to iterate"
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Stop the heartbeat; a job that logged progress ends with a last line."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.logged:
            self._log(final=True)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: what :func:`progress_bar` returns
Progress = Union[tqdm, LogProgress]


def _heartbeat(progress: weakref.ref[LogProgress], stop: threading.Event, interval: float
               ) -> None:
    """Log ``progress`` every ``interval`` seconds until it is closed, or dropped unclosed (work
    that raised before its ``close``): the thread holds it weakly so as not to outlive it."""
    while not stop.wait(interval):
        current = progress()
        if current is None:
            return
        current._log()
        del current


def progress_bar(iterable: Iterable[T] | None = None, *, enabled: bool, **kwargs: Any
                 ) -> Progress:
    """Progress of one piece of work (tqdm's keywords: desc, total, unit, initial, ...): a tqdm
    bar on a terminal, :class:`LogProgress` lines off it, nothing unless ``enabled``."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(iterable, interval=log_interval(), **kwargs)
    return tqdm(iterable, disable=not bars_enabled(enabled), file=sys.stderr, **kwargs)
