"""The Python API: Recommender answers as naive numpy over the checkpoint's tables, and embeds
as `cliper-prod embed --bundle` does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cliper_prod.commands import cli
from cliper_prod.runtime.ranking import QueryError
from cliper_prod.runtime.recommender import Recommender


def naive_topk(ckpt: Path, catalog: Path, users: list[int], k: int, exclude: set[int]
               ) -> tuple[np.ndarray, np.ndarray]:
    scores = np.load(ckpt / "user_embeddings.npy").astype(np.float64)[users] @ \
        np.load(ckpt / "item_embeddings.npy").astype(np.float64).T
    for line in (catalog / "synthetic.inter").read_text().splitlines()[1:]:
        u, i, label = (int(x) for x in line.split("\t")[:3])
        if label == 0 and u in users:
            scores[users.index(u), i] = -np.inf
    scores[:, sorted(exclude)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)


def assert_naive(answer: list[dict], user_ids: list[str], order: np.ndarray,
                 scores: np.ndarray, item_ids: list[str]) -> None:
    """``answer`` ranks as :func:`naive_topk` (the order of tied scores left open)."""
    for row, got in enumerate(answer):
        assert got["user_id"] == user_ids[row]
        np.testing.assert_allclose(got["scores"], scores[row], rtol=1e-5, atol=1e-6)
        tied = np.isclose(scores[row][:, None], scores[row][None, :], rtol=1e-5).sum(1) > 1
        assert all(t or got["items"][c] == item_ids[order[row, c]]
                   for c, t in enumerate(tied))


def test_topk_equals_naive_numpy_with_training_and_excluded_items_out(exported) -> None:
    rec = Recommender(exported["bundle"], provider="cpu")
    user_ids, item_ids = rec.bundle.user_ids, rec.bundle.item_ids
    users, exclude = [3, 0, 17], {item_ids[5], item_ids[9]}
    answer = rec.topk([user_ids[u] for u in users], k=8, exclude=sorted(exclude))
    order, scores = naive_topk(exported["ckpt"], exported["catalog"], users, 8,
                               {item_ids.index(i) for i in exclude})
    assert_naive(answer, [user_ids[u] for u in users], order, scores, item_ids)
    assert not any(exclude & set(got["items"]) for got in answer)


@pytest.mark.parametrize("users, k, exclude, message", [
    (["nobody"], 5, [], "unknown user id"), (None, 5, ["no-item"], "exclude: unknown item"),
    (None, 0, [], "k=0"), (None, 10_000, [], "ranks at most")])
def test_topk_refuses_what_it_cannot_answer(exported, users, k, exclude, message) -> None:
    rec = Recommender(exported["bundle"], provider="cpu")
    with pytest.raises(QueryError, match=message):
        rec.topk(users or rec.bundle.user_ids[:1], k=k, exclude=exclude)


def test_embed_answers_as_the_cli(exported, tmp_path: Path) -> None:
    items = [json.loads(line) for line in
             (exported["catalog"] / "items.jsonl").read_text().splitlines()[:5]]
    answer = Recommender(exported["bundle"], provider="cpu",
                         image_root=exported["catalog"]).embed(items)
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps({**i, "image": str(exported["catalog"] / i["image"])})
                              + "\n" for i in items))
    res = CliRunner().invoke(cli, ["embed", str(source), "--bundle", str(exported["bundle"]),
                                   "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert [i["item_id"] for i in answer["items"]] == \
        (tmp_path / "o" / "item_ids.txt").read_text().split()
    np.testing.assert_allclose([i["text_feature"] for i in answer["items"]],
                               np.load(tmp_path / "o" / "text_feat.npy"), atol=1e-6)
    np.testing.assert_allclose([i["image_embedding"] for i in answer["items"]],
                               np.load(tmp_path / "o" / "image_feat.npy"), atol=1e-6)


def naive_masked(ckpt: Path, catalog: Path, users: list[int], exclude: list[list[int]],
                 allowed: list[int] | None, filter_seen: bool) -> np.ndarray:
    """Every user-item score (float64) with the masks of ``recommend`` as -inf."""
    scores = np.load(ckpt / "user_embeddings.npy").astype(np.float64)[users] @ \
        np.load(ckpt / "item_embeddings.npy").astype(np.float64).T
    if filter_seen:
        for line in (catalog / "synthetic.inter").read_text().splitlines()[1:]:
            u, i, label = (int(x) for x in line.split("\t")[:3])
            if label == 0 and u in users:
                scores[users.index(u), i] = -np.inf
    for n, items in enumerate(exclude):
        scores[n, items] = -np.inf
    if allowed is not None:
        scores[:, np.setdiff1d(np.arange(scores.shape[1]), allowed)] = -np.inf
    return scores


def assert_ranked(ids: np.ndarray, scores: np.ndarray, naive: np.ndarray,
                  item_ids: list[str]) -> None:
    """``(ids, scores)`` are the best columns of ``naive`` (the order of tied scores left
    open), padded with None / -inf where fewer than k are finite."""
    k = ids.shape[1]
    order = np.argsort(-naive, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(naive, order, 1)
    assert ids.shape == scores.shape == (len(naive), k) and scores.dtype == np.float32
    for row in range(len(naive)):
        finite = np.isfinite(best[row])
        assert list(ids[row][~finite]) == [None] * int((~finite).sum())
        assert np.all(np.isneginf(scores[row][~finite]))
        np.testing.assert_allclose(scores[row][finite], best[row][finite], rtol=1e-5, atol=1e-6)
        tied = np.isclose(best[row][:, None], best[row][None, :], rtol=1e-5).sum(1) > 1
        assert all(t or ids[row, c] == item_ids[order[row, c]]
                   for c, t in enumerate(tied) if finite[c])


@pytest.mark.parametrize("filter_seen", [True, False])
@pytest.mark.parametrize("allow", [False, True])
def test_recommend_equals_a_full_naive_scoring_with_its_masks(exported, filter_seen,
                                                              allow) -> None:
    """Per-user exclusions, the training items and an allowlist, in batches of 2 users (the
    allowlist keeps fewer items than k for some users: padding)."""
    rec = Recommender(exported["bundle"], provider="cpu", batch_size=2)
    user_ids, item_ids = rec.bundle.user_ids, rec.bundle.item_ids
    users = [3, 0, 17, 41, 8]
    exclude = [[5, 9], [], [1], [2, 3, 4, 5, 6, 7], [59]]
    allowed = list(range(0, 60, 5)) if allow else None  # 12 items, item 5 excluded
    ids, scores = rec.recommend([user_ids[u] for u in users], 12,
                                exclude=[[item_ids[i] for i in e] for e in exclude],
                                items=None if allowed is None else [item_ids[i] for i in allowed],
                                filter_seen=filter_seen)
    naive = naive_masked(exported["ckpt"], exported["catalog"], users, exclude, allowed,
                         filter_seen)
    assert_ranked(ids, scores, naive, item_ids)
    if allow:
        assert any(None in row for row in ids)  # the padding is exercised


def test_recommend_answers_as_topk(exported) -> None:
    rec = Recommender(exported["bundle"], provider="cpu")
    users = rec.bundle.user_ids[:7]
    ids, scores = rec.recommend(users, 10, exclude=[[]] * 7)
    for row, got in zip(zip(ids, scores), rec.topk(users, k=10)):
        assert list(row[0]) == got["items"]
        np.testing.assert_array_equal(row[1], np.float32(got["scores"]))


def test_similar_items_is_cosine_on_the_item_table_without_the_item(exported) -> None:
    rec = Recommender(exported["bundle"], provider="cpu", batch_size=2)
    item_ids = rec.bundle.item_ids
    table = np.load(exported["ckpt"] / "item_embeddings.npy").astype(np.float64)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    rows = [0, 13, 59]
    naive = unit[rows] @ unit.T
    naive[np.arange(3), rows] = -np.inf
    ids, scores = rec.similar_items([item_ids[r] for r in rows], 7)
    assert_ranked(ids, scores, naive, item_ids)


@pytest.mark.parametrize("call, message", [
    (lambda rec, u: rec.recommend(u[:2], 5, exclude=[[]]), "one sequence of item ids per user"),
    (lambda rec, u: rec.recommend(u[:2], 5, exclude=[[], ["nope"]]), "exclude of user 2"),
    (lambda rec, u: rec.recommend(u[:2], 5, items=["nope"]), "items: unknown item id"),
    (lambda rec, u: rec.recommend(u[:2], 0), "k=0"),
    (lambda rec, u: rec.similar_items(["nope"], 5), "unknown item id"),
    (lambda rec, u: rec.similar_items([rec.bundle.item_ids[0]], 60), "1 to 59")])
def test_recommend_and_similar_items_refuse_what_they_cannot_answer(exported, call,
                                                                     message) -> None:
    rec = Recommender(exported["bundle"], provider="cpu")
    with pytest.raises(QueryError, match=message):
        call(rec, rec.bundle.user_ids)
