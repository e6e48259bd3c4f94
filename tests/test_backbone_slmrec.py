"""SLMRec against independent dense math on the 30-user, 20-item toy folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cliper_prod.backbones import create_model
from cliper_prod.checkpoint import load_model
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.errors import ConfigError
from cliper_prod.training import train_model
from tests.conftest import model_config

BATCH_USERS = torch.tensor([0, 0, 3, 5, 3, 7])  # repeated users and items, as real batches have
BATCH_POS = torch.tensor([1, 2, 2, 7, 4, 19])


@pytest.fixture
def toy(toy_dataset: Path):
    return load_dataset(toy_dataset)


def make(data, seed: int = 0, **model):
    torch.manual_seed(seed)
    return create_model("slmrec", data, model_config("slmrec", **model))


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def linear(layer, x: np.ndarray) -> np.ndarray:
    return x @ np_(layer.weight).T + np_(layer.bias)


def reference(model, data) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Final user and item tables, and each view's propagated item block, computed the way
    MMRec's SLMRec does: one LightGCN pass per view, concatenated, then a linear head."""
    n_u, n_i = data.n_users, data.n_items
    a = np.zeros((n_u + n_i,) * 2)
    for u, i in data.train:
        a[u, n_u + i] = a[n_u + i, u] = 1.0
    d = a.sum(1)
    norm = a / np.sqrt(np.outer(d, d) + 1e-12)
    unit = {m: f / np.linalg.norm(f, axis=1, keepdims=True) for m, f in data.features.items()}
    views = {"id": np_(model.item_embedding.weight),
             "image": linear(model.dense["image"], unit["image"]),
             "text": linear(model.dense["text"], unit["text"])}
    users, items = [], {}
    for name, view in views.items():
        layers = [np.concatenate([np_(model.user_embedding.weight), view])]
        for _ in range(model.config.n_layers):
            layers.append(norm @ layers[-1])
        mean = np.mean(layers, axis=0)
        users.append(mean[:n_u])
        items[name] = mean[n_u:]
    user_table = linear(model.user_head, np.concatenate(users, 1))
    item_table = linear(model.item_head, np.concatenate(list(items.values()), 1))
    return user_table, item_table, items


def naive_info_nce(a: np.ndarray, b: np.ndarray, temp: float) -> float:
    total = 0.0
    for row in range(len(a)):
        logits = np.array([a[row] @ b[col] for col in range(len(b))]) / temp
        total += np.log(np.exp(logits).sum()) - logits[row]
    return total / len(a)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_tables_equal_per_view_dense_propagation(toy) -> None:
    model = make(toy)
    users, items = model.embedding_tables()
    ref_users, ref_items, _ = reference(model, toy)
    assert users.shape == (toy.n_users, 64) and items.shape == (toy.n_items, 64)
    np.testing.assert_allclose(users.numpy(), ref_users, atol=1e-5)
    np.testing.assert_allclose(items.numpy(), ref_items, atol=1e-5)


def test_main_loss_is_in_batch_info_nce_of_cosines(toy) -> None:
    model = make(toy, ssl_alpha=0.0, temp=0.3)
    ref_users, ref_items, _ = reference(model, toy)
    expected = naive_info_nce(unit_rows(ref_users[BATCH_USERS]), unit_rows(ref_items[BATCH_POS]),
                              0.3)
    neg = torch.zeros_like(BATCH_POS)
    got = model.loss(BATCH_USERS, BATCH_POS, neg)
    np.testing.assert_allclose(got.item(), expected, rtol=1e-5)
    assert model.loss(BATCH_USERS, BATCH_POS, neg + 3).item() == got.item()  # negatives unused


def test_fac_loss_chains_id_through_image_to_text(toy) -> None:
    main = make(toy, ssl_alpha=0.0).loss(BATCH_USERS, BATCH_POS, BATCH_POS).item()
    model = make(toy, ssl_alpha=0.7, ssl_temp=0.5)
    _, _, views = reference(model, toy)
    ids, image, text = (views[v][BATCH_POS] for v in ("id", "image", "text"))
    iv = linear(model.id_to_iv, ids)
    ivat = linear(model.iva_to_ivat, linear(model.iv_to_iva, iv))
    fac = (naive_info_nce(iv, linear(model.image_to_iv, image), 0.5)
           + naive_info_nce(ivat, linear(model.text_to_ivat, text), 0.5))
    got = model.loss(BATCH_USERS, BATCH_POS, BATCH_POS).item()
    np.testing.assert_allclose(got, main + 0.7 * fac, rtol=1e-5)


def test_reg_has_no_effect_as_in_mmrec(toy) -> None:
    losses = {make(toy, reg=r).loss(BATCH_USERS, BATCH_POS, BATCH_POS).item() for r in (0, 0.1)}
    assert len(losses) == 1


@pytest.mark.parametrize("views", [None, 2])
def test_every_parameter_gets_a_gradient(toy, views) -> None:
    if views:  # CLIPER's MLP fusion: text holds 2 concatenated 4-d views
        toy = dataclasses.replace(toy, text_views=views)
    model = make(toy)
    assert (model.text_fusion is not None) == bool(views)
    model.loss(BATCH_USERS, BATCH_POS, BATCH_POS).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_needs_both_modalities(toy) -> None:
    with pytest.raises(ConfigError, match="text_feat"):
        make(dataclasses.replace(toy, features={"image": toy.features["image"]}))


def test_training_exports_the_tables_mmrec_ranks_with(toy_dataset: Path, tmp_path: Path) -> None:
    data = load_dataset(toy_dataset)
    config = load_config("slmrec", overrides={"train": {
        "epochs": 2, "batch_size": 64, "topk": [5, 10], "valid_metric": "recall@10"}})
    result = train_model("slmrec", data, config, tmp_path / "ckpt", progress=False)
    assert len(result.history) == 2 and all(np.isfinite(h["loss"]) for h in result.history)
    model, _, _ = load_model(tmp_path / "ckpt")
    ref_users, ref_items, _ = reference(model, data)
    users = np.load(tmp_path / "ckpt" / "user_embeddings.npy")
    items = np.load(tmp_path / "ckpt" / "item_embeddings.npy")
    np.testing.assert_allclose(users, ref_users, atol=1e-5)
    np.testing.assert_allclose(items, ref_items, atol=1e-5)
    # MMRec's full sort: sigmoid of the dot product, training items masked, top 10
    mmrec = 1 / (1 + np.exp(-ref_users @ ref_items.T))
    served = users.astype(np.float64) @ items.T
    for scores in (mmrec, served):
        scores[data.train[:, 0], data.train[:, 1]] = -1e10
    np.testing.assert_array_equal(np.argsort(-served, 1, kind="stable")[:, :10],
                                  np.argsort(-mmrec, 1, kind="stable")[:, :10])
