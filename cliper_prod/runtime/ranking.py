"""Ranking with a bundle's top-K graph: user ids (or histories) -> graph queries -> rankings
with training (or history) items and ``exclude`` left out.

One code path for every way in: ``cliper-prod topk`` (:mod:`.rank_files`), the Python API
(:class:`~.recommender.Recommender`) and the HTTP service. A request it cannot answer raises
:class:`QueryError`, which each caller maps to its own channel (an ``error:`` line and exit
code, a 400, a Python exception); the one rule for ``k`` is :meth:`TopKRanker.check_k`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cliper_prod.bundle_format import TOPK_GRAPH
from cliper_prod.histories import history_pairs
from cliper_prod.messages import preview_ids, shorten
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.fold_in import FoldIn
from cliper_prod.runtime.topk_forms import TopKGraph


Pairs = tuple[np.ndarray, np.ndarray]  # (position in a batch, item row), int64 each
NO_PAIRS: Pairs = (np.empty(0, np.int64), np.empty(0, np.int64))


class QueryError(ValueError):
    """A query the bundle cannot answer as asked: unknown or repeated ids, ``k`` out of range,
    an unusable history."""


class KOutOfRange(QueryError):
    """``k`` (plus the excluded items) is more than the top-K graph ranks per user."""

    def __init__(self, k: int, max_k: int, excluded: int = 0) -> None:
        self.k, self.max_k, self.excluded = k, max_k, excluded
        super().__init__(
            f"k ({k}) plus excluded items ({excluded}) exceeds the {max_k} items the bundle "
            f"ranks per user" if excluded and 1 <= k <= max_k else
            f"k={k}: the bundle ranks at most {max_k} items per user")


class UnsupportedQuery(QueryError):
    """A kind of query this bundle cannot answer at all (no fold-in state for histories)."""


def rankings(user_ids: Sequence[str | None], top_items: np.ndarray, top_scores: np.ndarray,
             k: int, item_ids: np.ndarray, exclude: set[int] = frozenset()) -> list[dict]:
    """{"user_id", "items", "scores"} per user from the graph's padded top rows: padding
    (score -inf) and ``exclude`` rows dropped, then the first ``k`` kept."""
    out = []
    for user, idx, scores in zip(user_ids, top_items, top_scores):
        kept = np.isfinite(scores)
        if exclude:
            kept &= ~np.isin(idx, list(exclude))
        idx, scores = idx[kept][:k], scores[kept][:k]
        out.append({"user_id": user, "items": item_ids[idx].tolist(), "scores": scores.tolist()})
    return out


@dataclass(frozen=True)
class HistoryQueries:
    """Users given by their histories, folded in and ready to rank: query vectors, the
    (position, item) pairs to leave out (each history), and each history's unknown ids."""

    queries: np.ndarray
    positions: np.ndarray
    items: np.ndarray
    unknown: list[list[str]]


class TopKRanker:
    """User ids (or histories) -> queries of the top-K graph -> rankings with training (or
    history) items excluded."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.graph = TopKGraph(bundle)  # the CPU or GPU form per provider and batch size
        self.max_k = int(bundle.manifest["graphs"][TOPK_GRAPH]["k"])
        self.item_ids = np.asarray(bundle.item_ids, dtype=object)
        self.item_index = {i: n for n, i in enumerate(bundle.item_ids)}
        self.user_index = {u: n for n, u in enumerate(bundle.user_ids)}
        tables = {name: bundle.folder / file for name, file in bundle.manifest["tables"].items()}
        self.queries = np.load(tables["users"], mmap_mode="r")  # paged in as users are ranked
        self.indptr = np.load(tables["history_indptr"], mmap_mode="r")
        self.history = np.load(tables["history_items"], mmap_mode="r")

    def check_k(self, k: int, excluded: int = 0) -> None:
        """The one rule for ``k``: the graph must rank ``k`` items plus the ``excluded`` ones
        it may return and drop."""
        if not 1 <= k <= self.max_k or k + excluded > self.max_k:
            raise KOutOfRange(k, self.max_k, excluded)

    def rows(self, user_ids: list[str]) -> np.ndarray:
        unknown = [u for u in user_ids if u not in self.user_index]
        if unknown:
            raise QueryError(f"unknown user id(s) {preview_ids(unknown)}")
        if len(set(user_ids)) != len(user_ids):
            raise QueryError("repeated user ids in one request")
        return np.fromiter((self.user_index[u] for u in user_ids), np.int64, len(user_ids))

    def exclusions(self, item_ids: Sequence[str], k: int) -> set[int]:
        """Rows of items to leave out; the graph must rank ``k`` of them plus ``k`` others."""
        unknown = [i for i in item_ids if i not in self.item_index]
        if unknown:
            raise QueryError(f"exclude: unknown item id(s) {preview_ids(unknown)}")
        rows = {self.item_index[i] for i in item_ids}
        self.check_k(k, len(rows))
        return rows

    def prepare(self, user_ids: list[str], k: int, exclude: Sequence[str] = ()
                ) -> tuple[np.ndarray, set[int]]:
        """The graph rows of ``user_ids`` and the rows to leave out, every check of a request
        made before any graph runs."""
        self.check_k(k)
        return self.rows(user_ids), self.exclusions(exclude, k)

    def rank(self, rows: np.ndarray, extra: Pairs = NO_PAIRS, filter_seen: bool = True
             ) -> tuple[np.ndarray, np.ndarray]:
        """The graph's padded top rows of the users ``rows``, their training items (unless
        not ``filter_seen``) and the ``extra`` (position, item) pairs excluded (the unit the
        service batches across requests)."""
        positions, items = self.pairs(rows, extra, filter_seen)
        return self.graph(queries=self.queries[rows], exclude_rows=positions,
                          exclude_items=items)

    def pairs(self, rows: np.ndarray, extra: Pairs = NO_PAIRS, filter_seen: bool = True
              ) -> Pairs:
        """(position in ``rows``, item row) pairs to mask: the users' training items when
        ``filter_seen``, then ``extra``."""
        if not filter_seen:
            return extra
        positions, seen = history_pairs(self.indptr, self.history, rows)
        if not len(extra[0]):
            return positions, seen
        return np.concatenate([positions, extra[0]]), np.concatenate([seen, extra[1]])

    def answer(self, user_ids: list[str], top: tuple[np.ndarray, np.ndarray], k: int,
               exclude: set[int]) -> list[dict]:
        return rankings(user_ids, top[0], top[1], k, self.item_ids, exclude)

    @cached_property
    def fold_in(self) -> FoldIn:
        return FoldIn.of(self.bundle)

    def require_user_rule(self) -> None:
        """Refuse histories on a bundle whose backbone cannot fold in a user."""
        problem = self.fold_in.user_rule_problem()
        if problem:
            raise UnsupportedQuery(f"this bundle {problem}")

    def fold(self, histories: Sequence[Sequence[str]]) -> HistoryQueries:
        """Fold in one user per history of item ids (unknown ids are reported, never guessed;
        a history needs one known item)."""
        rows, unknown = [], []
        for n, history in enumerate(histories):
            known, missing = self.history_rows(history)
            problem = self.history_problem(known, missing)
            if problem:
                raise QueryError(f"history {n + 1}: {problem}")
            rows.append(known)
            unknown.append(missing)
        queries = self.fold_in.users(rows)
        positions = np.repeat(np.arange(len(rows), dtype=np.int64), [len(r) for r in rows])
        return HistoryQueries(queries, positions, np.concatenate(rows), unknown)

    def prepare_histories(self, histories: Sequence[Sequence[str]], k: int,
                          exclude: Sequence[str] = ()) -> tuple[HistoryQueries, set[int]]:
        """:meth:`fold` with the request checked as :meth:`prepare` checks it."""
        self.require_user_rule()
        self.check_k(k)
        if not histories:
            raise QueryError("no history to rank")
        excluded = self.exclusions(exclude, k)
        return self.fold(histories), excluded

    def history_rows(self, history: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """The item rows of a history's known ids (each once) and its unknown ids (each once)."""
        known = dict.fromkeys(self.item_index[i] for i in history if i in self.item_index)
        missing = dict.fromkeys(i for i in history if i not in self.item_index)
        return np.fromiter(known, np.int64, len(known)), list(missing)

    def history_problem(self, known: np.ndarray, missing: list[str]) -> str | None:
        """Why a history cannot fold in a user (no known id; only items without
        interactions), or None."""
        if not len(known):
            return "no known item id" + (f" (unknown: {preview_ids(missing)})" if missing
                                         else " (empty)")
        if not self.fold_in.informative(known):
            return ("only items without interactions (added by add-items), which fold in "
                    "nothing")
        return None

    def rank_histories(self, prepared: HistoryQueries) -> tuple[np.ndarray, np.ndarray]:
        """The graph's padded top rows of folded-in users, their histories excluded."""
        return self.graph(queries=prepared.queries, exclude_rows=prepared.positions,
                          exclude_items=prepared.items)

    def answer_histories(self, labels: Sequence[str | None], prepared: HistoryQueries, k: int,
                         exclude: set[int]) -> list[dict]:
        """Rankings of folded-in users, each with its ``unknown_items`` when it had some."""
        out = rankings(labels, *self.rank_histories(prepared), k, self.item_ids, exclude)
        for record, missing in zip(out, prepared.unknown):
            if missing:
                record["unknown_items"] = [shorten(i) for i in missing]
        return out
