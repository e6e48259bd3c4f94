"""VBPR and LATTICE against independent dense computations on tiny graphs."""

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
from cliper_prod.graph import (cosine_knn_graph, edge_matmul, fixed_propagation,
                               row_degree_normalize)
from cliper_prod.training import train_model
from tests.conftest import model_config


@pytest.fixture
def toy(toy_dataset: Path):
    return load_dataset(toy_dataset)  # 30 users, 20 items, 16-d image and 8-d text features


def naive_bpr(u: np.ndarray, p: np.ndarray, n: np.ndarray) -> float:
    x = (u * p).sum(1) - (u * n).sum(1)
    return float(np.mean(np.log1p(np.exp(-x))))


def dense_knn(feat: np.ndarray, k: int) -> np.ndarray:
    """Top-k cosine similarities of each row kept at their place, zeros elsewhere."""
    normed = feat / np.linalg.norm(feat, axis=1, keepdims=True)
    sim = normed @ normed.T
    a = np.zeros_like(sim)
    for i in range(len(sim)):
        top = np.argsort(-sim[i])[:k]
        a[i, top] = sim[i, top]
    return a


def row_sym_norm(a: np.ndarray) -> np.ndarray:
    r = a.sum(1) ** -0.5
    return r[:, None] * a * r[None, :]


def to_dense(edge_index: torch.Tensor, weight: torch.Tensor, n: int) -> np.ndarray:
    return fixed_propagation(edge_index, weight, n).to_dense().double().numpy()


def test_cosine_knn_graph_matches_dense_topk_values_and_gradients() -> None:
    torch.manual_seed(0)
    feat = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(12, 12, dtype=torch.float64)
    edge_index, weight = cosine_knn_graph(feat, 4)
    dense = torch.zeros(12, 12, dtype=torch.float64).index_put(tuple(edge_index), weight)
    np.testing.assert_allclose(dense.detach().numpy(), dense_knn(feat.detach().numpy(), 4),
                               atol=1e-12)
    (grad,) = torch.autograd.grad((dense * g).sum(), feat)
    # dense reference: the similarity matrix masked to each row's top-k, differentiated as a whole
    leaf = feat.detach().requires_grad_()
    normed = leaf / leaf.norm(dim=1, keepdim=True)
    sim = normed @ normed.T
    mask = torch.from_numpy(dense_knn(feat.detach().numpy(), 4) != 0)
    (expected,) = torch.autograd.grad((sim * mask * g).sum(), leaf)
    torch.testing.assert_close(grad, expected)


def test_row_degree_normalisation_and_edge_matmul_match_dense_math() -> None:
    torch.manual_seed(1)
    edge_index = torch.randint(0, 6, (2, 20))  # asymmetric, with duplicate edges
    weight = torch.rand(20, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    a = np.zeros((6, 6))
    np.add.at(a, (edge_index[0].numpy(), edge_index[1].numpy()), weight.detach().numpy())
    d = a.sum(1)
    inv = np.where(d > 0, d, np.inf) ** -0.5
    normed = row_degree_normalize(edge_index, weight, 6)
    np.testing.assert_allclose(to_dense(edge_index, normed, 6), inv[:, None] * a * inv[None, :],
                               rtol=1e-12)
    out = edge_matmul(edge_index, weight, x)
    np.testing.assert_allclose(out.detach().numpy(), a @ x.detach().numpy(), rtol=1e-12)
    g = torch.randn(6, 3, dtype=torch.float64)
    grad_w, grad_x = torch.autograd.grad((out * g).sum(), (weight, x))
    gx = g.numpy() @ x.detach().numpy().T  # d(sum g * A x)/dA_ij = (g x^T)_ij
    np.testing.assert_allclose(grad_w.numpy(), gx[edge_index[0], edge_index[1]], rtol=1e-12)
    np.testing.assert_allclose(grad_x.numpy(), a.T @ g.numpy(), rtol=1e-12)


# ---------------------------------------------------------------- VBPR

def test_vbpr_tables_are_id_embeddings_and_projected_text_then_image(toy) -> None:
    torch.manual_seed(0)
    model = create_model("vbpr", toy, model_config("vbpr", embedding_size=6))
    users, items = model.embedding_tables()
    assert users.shape == (toy.n_users, 12) and items.shape == (toy.n_items, 12)
    w, b = (t.detach().numpy() for t in model.item_linear.parameters())
    assert not b.any()  # MMRec: Xavier-normal weight, zero bias
    x = np.concatenate([toy.features["text"], toy.features["image"]], 1)  # MMRec's order
    expected = np.concatenate([model.item_embedding.weight.detach().numpy(), x @ w.T + b], 1)
    np.testing.assert_allclose(items.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(users.numpy(), model.user_embedding.weight.detach().numpy())
    bound = np.sqrt(6 / (toy.n_users + 12))  # Xavier-uniform
    assert np.abs(users.numpy()).max() <= bound and np.abs(users.numpy()).max() > bound / 2


def test_vbpr_loss_value_and_gradients(toy) -> None:
    torch.manual_seed(0)
    model = create_model("vbpr", toy, model_config("vbpr", reg_weight=0.5))
    users, pos = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 1, 5])
    neg = torch.tensor([5, 4, 0, 7])  # items repeat within and across pos and neg
    u, i = (t.detach().numpy() for t in model.embedding_tables())
    u, p, n = u[users], i[pos], i[neg]
    reg = (np.linalg.norm(u) + np.linalg.norm(p) + np.linalg.norm(n)) / 4  # EmbLoss: not squared
    loss = model.loss(users, pos, neg)
    assert loss.item() == pytest.approx(naive_bpr(u, p, n) + 0.5 * reg, rel=1e-5)
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert names == ["user_embedding.weight", "item_embedding.weight", "item_linear.weight",
                     "item_linear.bias"]  # the raw features are frozen inputs
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- LATTICE

def dense_user_item(data) -> np.ndarray:
    """MMRec's LATTICE user-item matrix: D^-1 (A + I)."""
    n = data.n_users + data.n_items
    a = np.eye(n)
    for u, i in data.train:
        a[u, data.n_users + i] = a[data.n_users + i, u] = 1.0
    return a / a.sum(1, keepdims=True)


def dense_item_graph(model, data, k: int, lam: float) -> np.ndarray:
    """LATTICE's item graph from the model's current weights, densely as MMRec builds it."""
    w = torch.softmax(model.modal_weight.detach().double(), 0).numpy()  # (image, text)
    learned, frozen = 0.0, 0.0
    for weight, modality in zip(w, ("image", "text")):
        proj = model.projections[modality]
        raw = model.features[modality].detach().numpy().astype(np.float64)
        x = raw @ proj.weight.detach().double().numpy().T + proj.bias.detach().double().numpy()
        learned = learned + weight * dense_knn(x, k)
        frozen = frozen + weight * row_sym_norm(dense_knn(data.features[modality], k))
    return (1 - lam) * row_sym_norm(learned) + lam * frozen


def lattice_reference(model, data, graph: np.ndarray, n_layers: int, n_ui_layers: int):
    ue = model.user_embedding.weight.detach().double().numpy()
    ie = model.item_embedding.weight.detach().double().numpy()
    h = ie
    for _ in range(n_layers):
        h = graph @ h
    adj = dense_user_item(data)
    layers = [np.concatenate([ue, ie])]
    for _ in range(n_ui_layers):
        layers.append(adj @ layers[-1])
    mean = np.mean(layers, axis=0)
    return mean[:data.n_users], mean[data.n_users:] + h / np.linalg.norm(h, axis=1, keepdims=True)


LATTICE_SMALL = {"knn_k": 4, "lambda_coeff": 0.7, "n_layers": 2, "n_ui_layers": 2}


def lattice(data, **model):
    torch.manual_seed(0)
    m = create_model("lattice", data, model_config("lattice", **{**LATTICE_SMALL, **model}))
    with torch.no_grad():
        m.modal_weight.copy_(torch.tensor([0.8, -0.3]))  # unequal: the mixing order matters
    return m


def test_lattice_frozen_graphs_are_normalised_weighted_knn(toy) -> None:
    model = lattice(toy)
    for modality in ("image", "text"):
        got = to_dense(*model.frozen_graphs[modality], toy.n_items)
        np.testing.assert_allclose(got, row_sym_norm(dense_knn(toy.features[modality], 4)),
                                   rtol=1e-5, atol=1e-7)


def test_lattice_embeddings_equal_dense_math(toy) -> None:
    model = lattice(toy)
    users, items = model.embedding_tables()
    assert users.shape == (toy.n_users, 64) and items.shape == (toy.n_items, 64)
    graph = dense_item_graph(model, toy, 4, 0.7)
    exp_users, exp_items = lattice_reference(model, toy, graph, 2, 2)
    np.testing.assert_allclose(users.numpy(), exp_users, atol=1e-5)
    np.testing.assert_allclose(items.numpy(), exp_items, atol=1e-5)


def test_lattice_rebuilds_item_graph_at_first_batch_of_each_epoch_only(toy) -> None:
    model = lattice(toy, reg_weight=0.1)
    batch = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    graph_modules = ("features.", "projections.", "modal_weight")
    opt = torch.optim.SGD(model.parameters(), lr=5.0)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(*batch)
        loss.backward()
        opt.step()
        return loss

    def expected_loss(graph: np.ndarray) -> float:
        u, i = lattice_reference(model, toy, graph, 2, 2)
        u, p, n = u[batch[0]], i[batch[1]], i[batch[2]]
        reg = ((u ** 2).sum() + (p ** 2).sum() + (n ** 2).sum()) / 2 / 3
        return naive_bpr(u, p, n) + 0.1 * reg

    first_graph = dense_item_graph(model, toy, 4, 0.7)
    expected = expected_loss(first_graph)
    assert step().item() == pytest.approx(expected, rel=1e-5)
    for name, param in model.named_parameters():  # the rebuild batch trains everything
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    new_graph = dense_item_graph(model, toy, 4, 0.7)
    assert not np.allclose(new_graph, first_graph, atol=1e-3)
    # later batches of the epoch reuse the first graph, detached
    expected = expected_loss(first_graph)
    assert step().item() == pytest.approx(expected, rel=1e-5)
    for name, param in model.named_parameters():
        assert (param.grad is None) == name.startswith(graph_modules), name
    # a new epoch rebuilds it from the current weights
    model.pre_epoch(torch.Generator())
    expected = expected_loss(dense_item_graph(model, toy, 4, 0.7))
    assert step().item() == pytest.approx(expected, rel=1e-5)
    assert model.features["image"].grad is not None


@pytest.mark.parametrize("backbone", ["vbpr", "lattice"])
def test_mlp_fusion_layer_is_trained(toy, backbone: str) -> None:
    data = dataclasses.replace(toy, text_views=2)  # 8-d text = two 4-d views
    torch.manual_seed(0)
    model = create_model(backbone, data, model_config(backbone, **(
        {"knn_k": 4} if backbone == "lattice" else {})))
    model.loss(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 3])).backward()
    assert model.text_fusion is not None
    assert model.text_fusion.layer.weight.grad.abs().sum() > 0
    assert model.embedding_tables()[1].shape[0] == data.n_items


@pytest.mark.parametrize("backbone", ["vbpr", "lattice"])
def test_training_runs_and_exported_tables_score_like_propagate(toy_dataset: Path, tmp_path: Path,
                                                                backbone: str) -> None:
    data = load_dataset(toy_dataset)
    config = load_config(backbone, overrides={
        "model": {"knn_k": 4} if backbone == "lattice" else {},
        "train": {"epochs": 2, "batch_size": 64, "topk": [5, 10], "valid_metric": "recall@10",
                  "learning_rate": 0.01}})
    result = train_model(backbone, data, config, out_dir=tmp_path / "run", progress=False)
    assert len(result.history) == 2 and all(np.isfinite(h["loss"]) for h in result.history)
    users = np.load(tmp_path / "run" / "user_embeddings.npy")
    items = np.load(tmp_path / "run" / "item_embeddings.npy")
    model, _, _ = load_model(tmp_path / "run")
    with torch.no_grad():
        u, i = model.propagate()
    np.testing.assert_allclose(users @ items.T, (u @ i.T).numpy(), rtol=1e-5, atol=1e-6)
    # training moved the weights away from a fresh model's
    torch.manual_seed(config["train"]["seed"])
    fresh = create_model(backbone, data, config["model"])
    assert not torch.allclose(fresh.embedding_tables()[1], i, atol=1e-3)
