"""Readiness of a serving process: its top-K session answers."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np


class ReadinessProbe:
    """Ranks one user on the loaded top-K graph: a replica is ready when its session answers.

    A success is trusted for ``max_age_s`` (health checks and load balancers ask often; one
    ranking each time would cost a graph run per probe); a failure is never cached.
    """

    def __init__(self, rank: Callable[[np.ndarray], object], max_age_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rank, self.max_age_s, self.clock = rank, max_age_s, clock
        self.last_ok = -math.inf

    def check(self) -> None:
        """Return when the graph ranked within ``max_age_s``; raise what ranking raised."""
        if self.clock() - self.last_ok < self.max_age_s:
            return
        self.rank(np.zeros(1, dtype=np.int64))
        self.last_ok = self.clock()
