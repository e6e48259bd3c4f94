"""Progress bars for long work: drawn only when asked for and when stderr is a terminal.

A bar redraws many times a second; written to a log file or a pipe those redraws are noise
(every epoch's bar in a ``make demo`` log), so off a terminal the bars stay silent. Messages
go through :mod:`logging`, never through the bar.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def bars_enabled(requested: bool) -> bool:
    """True when bars were requested and stderr (where tqdm draws) is a terminal."""
    return requested and sys.stderr.isatty()


def progress_bar(iterable: Iterable[T] | None = None, *, enabled: bool, **kwargs: Any
                 ) -> tqdm:
    """A tqdm bar on stderr, silent unless ``enabled`` and stderr is a terminal."""
    return tqdm(iterable, disable=not bars_enabled(enabled), file=sys.stderr, **kwargs)
