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
