"""How loud the cold-start student speaks: one factor on its output, fitted at export.

New items compete with trained ones for each user's top K, and the number of slots they win is
steeply sensitive to the level of their scores: on the synthetic catalog a 2% larger student
output gave new items about 30% more of the top 20, and two students trained alike but for
their seed placed trained items at 1.22x and 1.67x the slots their served vectors hold. The
score-alignment loss sets that level only to within such a margin. So after training, the
student's output is scaled by the factor c at which trained items, each placed by the student
(fold-in vector + c * output) while every other item keeps its served vector, win as many of
the users' top-K slots in all as their served vectors hold (a sample of users and items; each
user's training items excluded): a new item then gets about the slots that trained items of
its kind get. The factor is folded into the output layer, so the stored form and the runtime
are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 1 << 24  # score entries held at once while ranking the served items


@dataclass(frozen=True)
class Calibration:
    """The fitted factor and what it was fitted on (recorded in the manifest)."""

    scale: float
    target_share: float  # the sampled items' share of the top-K slots with their served vectors
    share_before: float  # ... each placed alone by the uncalibrated student
    share_after: float  # ... each placed alone by the calibrated student
    k: int
    users: int
    items: int


def _top_scores(users: Tensor, items: Tensor, seen: Tensor, k: int) -> Tensor:
    """[U, k] each user's k best scores, best first, training items (``seen``: rows of
    (user row, item)) excluded."""
    best = torch.full((len(users), k), -torch.inf, dtype=users.dtype)
    step = max(1, BLOCK // max(1, len(users)))
    for start in range(0, len(items), step):
        stop = min(start + step, len(items))
        scores = users @ items[start:stop].T
        inside = (seen[:, 1] >= start) & (seen[:, 1] < stop)
        scores[seen[inside, 0], seen[inside, 1] - start] = -torch.inf
        best = torch.cat([best, scores], 1).topk(k, dim=1).values
    return best


def fit_calibration(users: Tensor, served: Tensor, pairs: Tensor, base: Tensor, offsets: Tensor,
                    sample: Tensor, picked: Tensor, k: int) -> Calibration:
    """The factor c for the student's ``offsets`` of the ``sample`` items (their ``base``
    fold-in vectors beside), fitted on the ``picked`` users' top ``k`` (``pairs``: the
    training interactions, excluded from every ranking). An item placed alone wins user u's
    slot when it beats the k-th best of the other items: u's k-th best served score, or the
    (k+1)-th when the item itself is in u's top k."""
    row = torch.full((len(users),), -1, dtype=torch.long)
    row[picked] = torch.arange(len(picked))
    seen = torch.stack([row[pairs[:, 0]], pairs[:, 1]], 1)
    seen = seen[seen[:, 0] >= 0]
    who = users[picked]
    top = _top_scores(who, served, seen, k + 1)
    column = torch.full((len(served),), -1, dtype=torch.long)
    column[sample] = torch.arange(len(sample))
    mine = seen[column[seen[:, 1]] >= 0]
    trained = torch.zeros((len(picked), len(sample)), dtype=torch.bool)
    trained[mine[:, 0], column[mine[:, 1]]] = True
    own = who @ served[sample].T
    holds = (own >= top[:, k - 1:k]) & ~trained
    bar = torch.where(holds, top[:, k:k + 1], top[:, k - 1:k])
    fixed, moving = who @ base[sample].T, who @ offsets.T

    def slots(c: float) -> int:
        return int(((fixed + c * moving > bar) & ~trained).sum())

    target = int(holds.sum())
    low, high = 0.0, 1.0
    while slots(high) < target and high < 1024:
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if slots(middle) < target else (low, middle)
    scale = (low + high) / 2
    cells = len(picked) * k
    return Calibration(scale, target / cells, slots(1.0) / cells, slots(scale) / cells, k,
                       len(picked), len(sample))
