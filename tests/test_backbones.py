"""Graphs and backbones against naive dense computations on tiny graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cliper_prod.backbones import create_model
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.graph import (Propagation, bipartite_edge_index, degree_sensitive_prune,
                               knn_normalized_adjacency, mixed_item_graph, normalized_adjacency)
from tests.conftest import model_config

USERS = torch.tensor([0, 0, 1, 1, 1, 2, 3])
ITEMS = torch.tensor([0, 2, 0, 1, 3, 3, 2])
N_USERS, N_ITEMS = 4, 4


def dense_bipartite(users, items) -> np.ndarray:
    a = np.zeros((N_USERS + N_ITEMS,) * 2)
    for u, i in zip(users.tolist(), items.tolist()):
        a[u, N_USERS + i] = a[N_USERS + i, u] = 1.0
    return a


def sym_norm(a: np.ndarray) -> np.ndarray:
    d = a.sum(1)
    inv = np.where(d > 0, d, np.inf) ** -0.5
    return inv[:, None] * a * inv[None, :]


def test_propagation_forward_and_gradient_match_dense_matmul() -> None:
    torch.manual_seed(0)
    a = torch.rand(5, 5) * (torch.rand(5, 5) > 0.5)  # not symmetric
    prop = Propagation(a.to_sparse_csr(), symmetric=False)
    x = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(5, 3)
    out = prop(x)
    (out * g).sum().backward()
    torch.testing.assert_close(out, a @ x)
    torch.testing.assert_close(x.grad, a.T @ g)


def test_user_item_graph_is_symmetric_normalised() -> None:
    adj = normalized_adjacency(bipartite_edge_index(USERS, ITEMS, N_USERS), N_USERS + N_ITEMS)
    np.testing.assert_allclose(adj.to_dense().numpy(), sym_norm(dense_bipartite(USERS, ITEMS)),
                               rtol=1e-6)


def naive_knn_graph(feat: np.ndarray, k: int) -> np.ndarray:
    normed = feat / np.linalg.norm(feat, axis=1, keepdims=True)
    sim = normed @ normed.T
    a = np.zeros_like(sim)
    for i in range(len(sim)):
        a[i, np.argsort(-sim[i])[:k]] = 1.0
    r = a.sum(1) ** -0.5  # MMRec normalises both sides with the row degree
    return r[:, None] * a * r[None, :]


def test_knn_item_graph_matches_dense_reference() -> None:
    feat = np.random.default_rng(0).standard_normal((9, 5)).astype(np.float32)
    got = knn_normalized_adjacency(torch.from_numpy(feat), k=3).to_dense().numpy()
    expected = naive_knn_graph(feat, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.allclose(np.diag(got), 1 / 3)  # each item is its own nearest neighbour


def test_modalities_are_mixed_by_image_weight() -> None:
    rng = np.random.default_rng(1)
    img, txt = rng.standard_normal((8, 6)), rng.standard_normal((8, 3))
    graphs = {m: knn_normalized_adjacency(torch.tensor(f, dtype=torch.float32), 2)
              for m, f in (("image", img), ("text", txt))}
    got = mixed_item_graph(graphs, 0.1).to_dense().numpy()
    np.testing.assert_allclose(got, 0.1 * naive_knn_graph(img, 2) + 0.9 * naive_knn_graph(txt, 2),
                               rtol=1e-5)


def test_pruned_graph_keeps_a_renormalised_subset() -> None:
    adj = degree_sensitive_prune(USERS, ITEMS, N_USERS, N_ITEMS, keep_ratio=0.5,
                                 generator=torch.Generator().manual_seed(0))
    dense = adj.to_dense().numpy()
    kept = (dense > 0).astype(float)
    assert kept.sum() == 2 * 3  # int(7 * 0.5) undirected edges
    assert np.all(kept <= dense_bipartite(USERS, ITEMS))  # a subset of the training edges
    np.testing.assert_allclose(dense, sym_norm(kept), rtol=1e-6)


def test_pruning_samples_edges_by_inverse_sqrt_degree() -> None:
    du = np.bincount(USERS.numpy(), minlength=N_USERS)
    di = np.bincount(ITEMS.numpy(), minlength=N_ITEMS)
    w = 1 / np.sqrt(du[USERS.numpy()] * di[ITEMS.numpy()])
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(len(USERS))
    trials = 3000
    for _ in range(trials):  # keep one edge: it is drawn with probability w / sum(w)
        dense = degree_sensitive_prune(USERS, ITEMS, N_USERS, N_ITEMS, 1 / 7 + 1e-9,
                                       gen).to_dense().numpy()
        counts += [dense[u, N_USERS + i] > 0 for u, i in zip(USERS.tolist(), ITEMS.tolist())]
    np.testing.assert_allclose(counts / trials, w / w.sum(), atol=0.025)


@pytest.fixture
def toy(toy_dataset: Path):
    return load_dataset(toy_dataset)


def test_lightgcn_propagation_equals_dense_math(toy) -> None:
    torch.manual_seed(0)
    model = create_model("lightgcn", toy, model_config("lightgcn", n_layers=3))
    users, items = model.embedding_tables()
    a = np.zeros((toy.n_users + toy.n_items,) * 2)
    for u, i in toy.train:
        a[u, toy.n_users + i] = a[toy.n_users + i, u] = 1
    norm = sym_norm(a)
    e0 = torch.cat([model.user_embedding.weight, model.item_embedding.weight]).detach().double()
    layers = [e0.numpy()]
    for _ in range(3):
        layers.append(norm @ layers[-1])
    expected = np.mean(layers, axis=0)
    np.testing.assert_allclose(users.numpy(), expected[:toy.n_users], atol=1e-5)
    np.testing.assert_allclose(items.numpy(), expected[toy.n_users:], atol=1e-5)


def test_freedom_embeddings_equal_dense_math(toy) -> None:
    torch.manual_seed(0)
    model = create_model("freedom", toy, model_config("freedom", knn_k=3, n_ui_layers=2))
    users, items = model.embedding_tables()
    a = np.zeros((toy.n_users + toy.n_items,) * 2)
    for u, i in toy.train:
        a[u, toy.n_users + i] = a[toy.n_users + i, u] = 1
    norm = sym_norm(a)
    item_graph = (0.1 * naive_knn_graph(toy.features["image"], 3)
                  + 0.9 * naive_knn_graph(toy.features["text"], 3))
    iid = model.item_embedding.weight.detach().double().numpy()
    e0 = np.concatenate([model.user_embedding.weight.detach().double().numpy(), iid])
    e1 = norm @ e0
    mean = (e0 + e1 + norm @ e1) / 3
    np.testing.assert_allclose(users.numpy(), mean[:toy.n_users], atol=1e-5)
    np.testing.assert_allclose(items.numpy(), mean[toy.n_users:] + item_graph @ iid, atol=1e-5)


def naive_bpr(u, p, n) -> float:
    x = (u * p).sum(1) - (u * n).sum(1)
    return float(np.mean(np.log1p(np.exp(-x))))


@pytest.mark.parametrize("reg_weight", [0.0, 1e-2])
def test_freedom_loss_value_and_gradients(toy, reg_weight: float) -> None:
    torch.manual_seed(0)
    model = create_model("freedom", toy, model_config("freedom", knn_k=3, dropout=0.0,
                                                      reg_weight=reg_weight))
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    loss = model.loss(users, pos, neg)
    u, i = (t.detach().numpy() for t in model.propagate())
    expected = naive_bpr(u[users], i[pos], i[neg])
    for modality in ("image", "text") if reg_weight else ():
        proj = model.projections[modality]
        f = proj(model.features[modality]).detach().numpy()
        expected += reg_weight * naive_bpr(u[users], f[pos], f[neg])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for name, param in model.named_parameters():
        if name.endswith("bias"):  # a projection bias cancels in u.(Wp+b) - u.(Wn+b)
            assert param.grad is not None and param.grad.abs().max() < 1e-6, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    if not reg_weight:  # zero-weighted modality terms hold no parameters at all
        assert [n for n, _ in model.named_parameters()] == ["user_embedding.weight",
                                                            "item_embedding.weight"]


def test_lightgcn_loss_includes_embedding_regulariser(toy) -> None:
    torch.manual_seed(0)
    model = create_model("lightgcn", toy, model_config("lightgcn", reg_weight=0.5))
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 3])
    u, i = (t.detach().numpy() for t in model.propagate())
    ue, ie = model.user_embedding.weight.detach().numpy(), model.item_embedding.weight.detach().numpy()
    reg = (np.linalg.norm(ue[[0, 1]]) + np.linalg.norm(ie[[0, 1]]) + np.linalg.norm(ie[[2, 3]])) / 2
    expected = naive_bpr(u[[0, 1]], i[[0, 1]], i[[2, 3]]) + 0.5 * reg
    assert model.loss(users, pos, neg).item() == pytest.approx(expected, rel=1e-5)
