"""Rankings for a file of user ids (or of users' histories) with a :class:`TopKRanker`: the
library side of ``cliper-prod topk``.

User file policy (documented in README): one external user id per line; blank lines and
lines starting with ``#`` are ignored; surrounding whitespace is stripped. A line holding
whitespace inside the id is malformed. Unknown ids, repeated ids and malformed lines stop the
run with the file and line (nothing is written), or, with ``skip_unknown`` (``--skip-bad``),
are skipped and reported in the returned summary. The file is streamed in batches, so its size
is bounded by disk, not memory; output lines follow the input order.

Histories file policy: one JSON object per line, ``{"user_id": "label", "history": [item ids]}``
(the output's key; the older ``"user"`` is read too, with a deprecation warning once a file);
blank lines are ignored. A malformed line, a missing label, a history that is not a list of
strings or holds no known item stops the run with the file and line (or, with
``skip_unknown``, is skipped and reported); unknown ids beside known ones are listed in the
line's ``unknown_items`` and counted in the summary.

The caller checks ``k`` (:meth:`TopKRanker.check_k`) and, for histories, the bundle's user rule
once, before a file is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO

import numpy as np

from cliper_prod.errors import DataError
from cliper_prod.features.items import StrictJSONError, loads_strict
from cliper_prod.io import atomic_path, count_lines
from cliper_prod.progress import Progress, progress_bar
from cliper_prod.runtime.ranking import TopKRanker

log = logging.getLogger(__name__)


@dataclass
class TopKSummary:
    users: int = 0
    skipped: list[dict] = field(default_factory=list)
    unknown_items: int = 0  # unknown ids in histories (listed in their output lines)

    def refuse(self, path: Path, line: int, problem: str, skip_bad: bool) -> None:
        """A bad line: the run stops naming it, or (``skip_bad``) it is recorded and skipped."""
        if not skip_bad:
            raise DataError(path, problem + "; fix the line or pass --skip-bad", line=line)
        self.skipped.append({"line": line, "reason": problem})


def read_users(path: Path, index: dict[str, int], skip_bad: bool, summary: TopKSummary
               ) -> Iterator[tuple[str, int]]:
    """(external id, row) for each valid line, in file order."""
    seen: set[int] = set()
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                problem = f"not UTF-8 (byte {exc.start})"
            else:
                if not text or text.startswith("#"):
                    continue
                row = index.get(text)
                if len(text.split()) > 1:
                    problem = f"malformed line {text[:60]!r}: one user id per line"
                elif row is None:
                    problem = f"unknown user id {text[:60]!r} (not in the bundle's user_ids.txt)"
                elif row in seen:
                    problem = f"duplicate user id {text!r}"
                else:
                    seen.add(row)
                    yield text, row
                    continue
            summary.refuse(path, line_no, problem, skip_bad)


def read_histories(path: Path, ranker: TopKRanker, skip_bad: bool, summary: TopKSummary
                   ) -> Iterator[tuple[str, list[str]]]:
    """(label, history) for each valid line of a histories file, in file order."""
    warned = False
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = loads_strict(raw)
            except StrictJSONError as exc:
                problem = f"malformed JSON ({exc})"
            else:
                if isinstance(record, dict) and "user" in record and not warned:
                    log.warning(f'{path}:{line_no}: the key "user" is deprecated and goes in the '
                                f'next release; write "user_id" (the output\'s key)')
                    warned = True
                problem = _history_problem(record, ranker)
                if problem is None:
                    yield _label(record), record["history"]
                    continue
            summary.refuse(path, line_no, problem, skip_bad)


def _history_problem(record: object, ranker: TopKRanker) -> str | None:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "user_id" in record and "user" in record:
        return "both 'user_id' and its deprecated spelling 'user'"
    label = _label(record)
    if not isinstance(label, str) or not label.strip():
        return "missing or empty 'user_id' (the label of the output line)"
    history = record.get("history")
    if not isinstance(history, list) or not all(isinstance(i, str) for i in history):
        return "'history' must be a list of item id strings"
    problem = ranker.history_problem(*ranker.history_rows(history))
    return f"history of {label[:60]!r}: {problem}" if problem else None


def _label(record: dict) -> object:
    """A histories line's label: ``user_id``, or ``user`` (its deprecated spelling)."""
    return record.get("user_id", record.get("user"))


def json_line(record: dict) -> str:
    """A ranking as one JSON line, each float32 score written as the shortest decimal that
    reads back to the same float32 (``0.8125``, not its float64 widening ``0.81250000...``)."""
    scores = np.asarray(record["scores"], dtype=np.float32)
    return json.dumps({**record, "scores": [float(str(s)) for s in scores]}) + "\n"


def _progress(path: Path, enabled: bool) -> Progress:
    """Users ranked, out of the file's lines (comments and blank lines included: about)."""
    return progress_bar(desc="topk", unit="user", enabled=enabled,
                        total=count_lines(path) if enabled else None)


def rank_users(ranker: TopKRanker, users_path: Path, out: IO[str], *, k: int = 20,
               skip_unknown: bool = False, batch_size: int = 1024, progress: bool = False
               ) -> TopKSummary:
    """Write one JSON line per user: {"user_id", "items", "scores"}, training items excluded."""
    summary = TopKSummary()
    stream = read_users(users_path, ranker.user_index, skip_unknown, summary)
    with _progress(users_path, progress) as bar:
        while batch := list(islice(stream, batch_size)):
            rows = np.fromiter((row for _, row in batch), dtype=np.int64, count=len(batch))
            for record in ranker.answer([user for user, _ in batch], ranker.rank(rows), k,
                                        set()):
                out.write(json_line(record))
            summary.users += len(batch)
            bar.update(len(batch))
    return summary


def rank_histories(ranker: TopKRanker, histories_path: Path, out: IO[str], *, k: int = 20,
                   skip_unknown: bool = False, batch_size: int = 1024, progress: bool = False
                   ) -> TopKSummary:
    """One JSON line per history: the user folded in by the backbone's rule
    ({"user_id": label, "items", "scores"[, "unknown_items"]}), the history excluded."""
    summary = TopKSummary()
    stream = read_histories(histories_path, ranker, skip_unknown, summary)
    with _progress(histories_path, progress) as bar:
        while batch := list(islice(stream, batch_size)):
            prepared = ranker.fold([h for _, h in batch])
            for record in ranker.answer_histories([user for user, _ in batch], prepared, k,
                                                  set()):
                summary.unknown_items += len(record.get("unknown_items", ()))
                out.write(json_line(record))
            summary.users += len(batch)
            bar.update(len(batch))
    return summary


Write = Callable[..., TopKSummary]  # rank_users or rank_histories


def to_file(write: Write, ranker: TopKRanker, in_path: Path, out_path: Path,
            **options: object) -> TopKSummary:
    """``write`` into ``out_path``, renamed into place only when every line is done."""
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        return write(ranker, in_path, fh, **options)
