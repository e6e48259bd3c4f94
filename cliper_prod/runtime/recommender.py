"""The Python API: an exported bundle as one object that ranks users and embeds items.

It is a facade over the two jobs of the runtime, :class:`~.ranking.TopKRanker` (ranking with the
top-K graph) and :class:`~.item_embedder.ItemEmbedder` (features with the CLIP graphs), the same
code ``cliper-prod topk``, ``embed --bundle`` and the HTTP service run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from cliper_prod.errors import BundleError
from cliper_prod.runtime.array_ranking import BATCH_USERS, ArrayRanker, Ranked
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.item_embedder import ItemEmbedder
from cliper_prod.runtime.ranking import TopKRanker
from cliper_prod.runtime.sessions import OrtThreads


class Recommender:
    """A bundle written by ``cliper-prod export``, ready to answer in Python::

        rec = Recommender("runs/export/freedom")
        rec.topk(["u1", "u2"], k=10, exclude=["i7"])  # [{"user_id", "items", "scores"}, ...]
        ids, scores = rec.recommend(["u1", "u2"], 10, exclude=[["i7"], []], items=allowlist)
        ids, scores = rec.similar_items(["i7"], 10)  # cosine on the item table
        rec.topk_histories([["i1", "i9"]], k=10)  # a user the model never saw, folded in
        rec.embed([{"item_id": "x", "title": "..."}])  # {"items": [...], "errors": [...]}

    ``topk`` leaves out each user's training items and ``exclude`` (``topk_histories`` the
    history and ``exclude``); ``embed`` follows the CLI's per-item policy (bad items are listed
    in ``errors``, the others embedded), with image paths only under ``image_root``. Queries it
    cannot answer raise :class:`~.ranking.QueryError`. ``recommend`` and ``similar_items`` take
    and return arrays, in batches of ``batch_size`` users (memory bound:
    :mod:`~.array_ranking`). ``provider`` is the ONNX Runtime
    provider choice (``auto``, ``cpu``, ``cuda``); ``device`` is its old, deprecated name.
    ``precision`` picks the CLIP graphs :meth:`embed` runs (``auto``: int8 on the CPU where the
    export measured it faster, else fp32; ``fp32``, ``fp16``, ``int8``: that one, refused here
    when the bundle lacks it). ``intra_op_threads`` / ``inter_op_threads`` size every ONNX
    Runtime session's thread pools (0: ORT's default, every core); ignored when ``bundle`` is
    an opened :class:`Bundle`, which has its own.
    """

    def __init__(self, bundle: str | Path | Bundle, *, provider: str = "auto",
                 backbone: str | None = None, image_root: Path | None = None,
                 embed_batch_size: int = 64, batch_size: int = BATCH_USERS,
                 device: str | None = None, precision: str = "auto", intra_op_threads: int = 0,
                 inter_op_threads: int = 0) -> None:
        if device is not None:
            warnings.warn("Recommender(device=...) is deprecated: use provider=...",
                          DeprecationWarning, stacklevel=2)
            provider = device
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(
            Path(bundle), provider, backbone, OrtThreads(intra_op_threads, inter_op_threads))
        self.bundle.check_precision(precision)
        self.ranker = TopKRanker(self.bundle)
        self.arrays = ArrayRanker(self.ranker, batch_size)
        self.image_root, self.embed_batch_size = image_root, embed_batch_size
        self.precision = precision

    @property
    def has_features(self) -> bool:
        """Whether the bundle carries the CLIP graphs :meth:`embed` runs."""
        return self.bundle.manifest.get("features") is not None

    @cached_property
    def embedder(self) -> ItemEmbedder:
        if not self.has_features:
            raise BundleError(f"{self.bundle.folder}: no CLIP feature graphs (exported without "
                              f"--clip)")
        return ItemEmbedder(self.bundle, self.image_root, self.embed_batch_size,
                            precision=self.precision)

    def topk(self, user_ids: Sequence[str], k: int = 20, exclude: Sequence[str] = ()
             ) -> list[dict]:
        """The top ``k`` items of each user, best first, with their scores."""
        users = list(user_ids)
        rows, excluded = self.ranker.prepare(users, k, exclude)
        return self.ranker.answer(users, self.ranker.rank(rows), k, excluded)

    def recommend(self, user_ids: Sequence[str], k: int = 20, *,
                  exclude: Sequence[Sequence[str]] | None = None,
                  items: Sequence[str] | None = None, filter_seen: bool = True) -> Ranked:
        """``(ids, scores)``, ``[len(user_ids), k]`` arrays (ids an object array of str):
        each user's top ``k`` items, best first, among ``items`` (an allowlist; None: all),
        leaving out ``exclude[n]`` for user ``n`` and, with ``filter_seen``, each user's
        training items. A user with fewer than ``k`` items left is padded with id None and
        score -inf. Exact: equal to a full scoring with those masks."""
        return self.arrays.recommend(user_ids, k, exclude=exclude, items=items,
                                     filter_seen=filter_seen)

    def similar_items(self, item_ids: Sequence[str], k: int = 20) -> Ranked:
        """``(ids, scores)``, ``[len(item_ids), k]`` arrays: each item's ``k`` most similar
        items by cosine on the served item table, best first, the item itself left out."""
        return self.arrays.similar_items(item_ids, k)

    def topk_histories(self, histories: Sequence[Sequence[str]], k: int = 20,
                       exclude: Sequence[str] = ()) -> list[dict]:
        """The top ``k`` items of users absent from training, each given by a history of item
        ids: folded in by the backbone's user rule (:mod:`cliper_prod.runtime.fold_in`), the
        history and ``exclude`` left out; unknown ids are listed in ``unknown_items``."""
        prepared, excluded = self.ranker.prepare_histories(histories, k, exclude)
        return self.ranker.answer_histories([None] * len(prepared.unknown), prepared, k,
                                            excluded)

    def embed(self, items: list[dict]) -> dict:
        """CLIPER features of items in the JSONL schema (``item_id``, text fields, ``image``
        path or ``image_base64``)."""
        return self.embedder.embed(items)
