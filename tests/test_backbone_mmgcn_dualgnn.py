"""MMGCN and DualGNN against naive numpy computations on a six-user graph, plus a short training
run whose exported tables must score like the reloaded model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cliper_prod.backbones import create_model
from cliper_prod.backbones.dualgnn import sample_user_graph
from cliper_prod.checkpoint import load_model
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import InteractionData, load_dataset
from cliper_prod.graph import co_occurrence_neighbours, mean_adjacency
from cliper_prod.training import train_model
from tests.conftest import model_config

# user 4 shares no item with anyone; user 3 has two neighbours; many ties in the co-counts
TRAIN = np.array([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 1), (2, 2), (2, 3), (3, 3),
                  (4, 5), (5, 0), (5, 3), (5, 4)])
N_USERS, N_ITEMS = 6, 6
N = N_USERS + N_ITEMS


def tiny_data(text_views: int | None = None) -> InteractionData:
    torch.manual_seed(0)
    features = {"image": torch.randn(N_ITEMS, 5).numpy(), "text": torch.randn(N_ITEMS, 4).numpy()}
    splits = {"train": TRAIN, "valid": TRAIN[:2], "test": TRAIN[:2]}
    return InteractionData("tiny", Path("."), N_USERS, N_ITEMS, splits, features,
                           text_views=text_views)


def neighbour_lists() -> dict[int, list[int]]:
    nbrs: dict[int, list[int]] = {n: [] for n in range(N)}
    for u, i in TRAIN:
        nbrs[u].append(N_USERS + i)
        nbrs[N_USERS + i].append(u)
    return nbrs


def naive_mean(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for node, nbrs in neighbour_lists().items():
        if nbrs:
            out[node] = sum(x[j] for j in nbrs) / len(nbrs)
    return out


def naive_sym_norm() -> np.ndarray:
    nbrs = neighbour_lists()
    a = np.zeros((N, N))
    for node, others in nbrs.items():
        for j in others:
            a[node, j] = 1 / math.sqrt(len(others) * len(nbrs[j]))
    return a


def lrelu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 0.01 * x)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def naive_co_occurrence(k: int) -> dict[int, list[tuple[int, int]]]:
    """Per user: (neighbour, shared items), most shared first, ties by lower id, at most k."""
    items = {u: {i for v, i in TRAIN if v == u} for u in range(N_USERS)}
    out = {}
    for u in range(N_USERS):
        shared = [(v, len(items[u] & items[v])) for v in range(N_USERS) if v != u]
        out[u] = sorted([s for s in shared if s[1] > 0], key=lambda s: (-s[1], s[0]))[:k]
    return out


def test_mean_adjacency_averages_neighbours() -> None:
    users, items = torch.from_numpy(TRAIN[:, 0]), torch.from_numpy(TRAIN[:, 1])
    edges = torch.stack([torch.cat([users, items + N_USERS]), torch.cat([items + N_USERS, users])])
    x = torch.randn(N, 3, dtype=torch.float64)
    got = mean_adjacency(edges, N)(x.float()).double().numpy()
    np.testing.assert_allclose(got, naive_mean(x.numpy()), atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_co_occurrence_neighbours_match_a_double_loop(k: int) -> None:
    nbrs, counts, n_found = co_occurrence_neighbours(
        torch.from_numpy(TRAIN[:, 0]), torch.from_numpy(TRAIN[:, 1]), N_USERS, N_ITEMS, k)
    for u, expected in naive_co_occurrence(k).items():
        assert n_found[u] == len(expected)
        assert nbrs[u, :len(expected)].tolist() == [v for v, _ in expected]
        assert counts[u, :len(expected)].tolist() == [c for _, c in expected]
        assert counts[u, len(expected):].eq(0).all()


def test_user_graph_sample_pads_short_lists_and_softmaxes_counts() -> None:
    k = 3
    found = co_occurrence_neighbours(torch.from_numpy(TRAIN[:, 0]),
                                     torch.from_numpy(TRAIN[:, 1]), N_USERS, N_ITEMS, k)
    index, weight = sample_user_graph(*found, torch.Generator().manual_seed(0))
    for u, expected in naive_co_occurrence(k).items():
        if not expected:  # no neighbour: contributes nothing
            assert weight[u].eq(0).all()
            continue
        ids = index[u].tolist()
        assert ids[:len(expected)] == [v for v, _ in expected]
        shared = dict(expected)
        assert set(ids) <= set(shared)  # padding repeats found neighbours only
        exp = [math.exp(shared[v]) for v in ids]
        np.testing.assert_allclose(weight[u].numpy(), [e / sum(exp) for e in exp], rtol=1e-6)
    assert len(naive_co_occurrence(k)[3]) == 2  # user 3 was padded
    again = sample_user_graph(*found, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], index) and torch.equal(again[1], weight)


def test_padding_draws_from_the_growing_list() -> None:
    """Two neighbours padded to four: MMRec appends a copy of a uniformly drawn slot of the list
    so far, so one neighbour fills three slots with probability 1/3 + 1/3 (1/2 if the copies
    were drawn from the two originals only)."""
    nbrs, counts, n_found = torch.tensor([[7, 9, 0, 0]]), torch.tensor([[2., 1, 0, 0]]), \
        torch.tensor([2])
    gen = torch.Generator().manual_seed(0)
    trials = 1500
    triple = 0
    for _ in range(trials):
        ids = sample_user_graph(nbrs, counts, n_found, gen)[0][0].tolist()
        triple += max(ids.count(7), ids.count(9)) == 3
    assert abs(triple / trials - 2 / 3) < 0.05


def naive_mmgcn(model, data: InteractionData, concat: bool, n_layers: int) -> np.ndarray:
    p = params(model)
    ids = p["id_embedding"]
    outs = []
    for m, feat in data.features.items():
        g = f"gcns.{m}."
        x = feat.astype(np.float64)
        if g + "project.weight" in p:
            x = x @ p[g + "project.weight"].T + p[g + "project.bias"]
        x = normalize(np.concatenate([p[g + "preference"], x]))
        for layer in range(n_layers):
            lin, gate = f"{g}linear.{layer}.", f"{g}gate.{layer}."
            h = lrelu(naive_mean(x @ p[f"{g}conv.{layer}"]))
            x_hat = lrelu(x @ p[lin + "weight"].T + p[lin + "bias"]) + ids
            if concat:
                x = lrelu(np.concatenate([h, x_hat], 1) @ p[gate + "weight"].T + p[gate + "bias"])
            else:
                x = lrelu(h @ p[gate + "weight"].T + p[gate + "bias"] + x_hat)
        outs.append(x)
    return sum(outs) / len(outs)


@pytest.mark.parametrize("concat", [True, False])
def test_mmgcn_tables_equal_dense_math(concat: bool) -> None:
    data = tiny_data()
    torch.manual_seed(1)
    model = create_model("mmgcn", data, model_config("mmgcn", embedding_size=4, n_layers=2,
                                                     image_latent_dim=3, concat=concat))
    users, items = model.embedding_tables()
    expected = naive_mmgcn(model, data, concat, 2)
    np.testing.assert_allclose(users.numpy(), expected[:N_USERS], atol=1e-5)
    np.testing.assert_allclose(items.numpy(), expected[N_USERS:], atol=1e-5)
    assert model.gcns["text"].preference.shape == (N_USERS, 4)  # raw text, no projection


def naive_bpr(u: np.ndarray, p: np.ndarray, n: np.ndarray) -> float:
    return float(np.mean(-np.log(1 / (1 + np.exp(-((u * p).sum(1) - (u * n).sum(1)))))))


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_mmgcn_loss_and_gradients(train_embeddings: bool) -> None:
    torch.manual_seed(2)
    model = create_model("mmgcn", tiny_data(), model_config(
        "mmgcn", embedding_size=4, image_latent_dim=3, reg_weight=0.5,
        train_embeddings=train_embeddings))
    users, pos, neg = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 0]), torch.tensor([4, 5, 2])
    u, i = (t.detach().double().numpy() for t in model.propagate())
    p = params(model)
    ids = p["id_embedding"]
    # MMRec's form: users repeated twice against interleaved (pos, neg) items
    rows_u, rows_i = np.repeat(users.numpy(), 2), N_USERS + np.stack([pos, neg], 1).reshape(-1)
    reg = (ids[rows_u] ** 2 + ids[rows_i] ** 2).mean() + (p["gcns.image.preference"] ** 2).mean()
    loss = model.loss(users, pos, neg)
    assert loss.item() == pytest.approx(naive_bpr(u[users], i[pos], i[neg]) + 0.5 * reg, rel=1e-5)
    loss.backward()
    names = {n for n, _ in model.named_parameters()}
    frozen = {"id_embedding", "gcns.image.preference", "gcns.text.preference"}
    assert frozen & names == (frozen if train_embeddings else set())
    assert frozen <= set(model.state_dict())  # frozen or not, saved: the scores depend on them
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def naive_dualgnn(model, data: InteractionData, fusion: str) -> tuple[np.ndarray, np.ndarray]:
    p = params(model)
    adj = naive_sym_norm()
    reps = {}
    for m, feat in data.features.items():
        e = f"encoders.{m}."
        hidden = lrelu(feat @ p[e + "mlp.0.weight"].T + p[e + "mlp.0.bias"])
        x = normalize(np.concatenate([p[e + "preference"],
                                      hidden @ p[e + "mlp.2.weight"].T + p[e + "mlp.2.bias"]]))
        reps[m] = x + adj @ x + adj @ adj @ x
    w = p["fusion_weight"]
    image, text = reps["image"][:N_USERS], reps["text"][:N_USERS]
    if fusion == "mmrec":
        image = image + text
    users = w[:, :1] * image + w[:, 1:] * text
    user_graph = np.zeros((N_USERS, N_USERS))
    for u, (nbrs, weights) in enumerate(zip(p["user_neighbours"].astype(int),
                                            p["user_neighbour_weights"])):
        for v, wt in zip(nbrs, weights):
            user_graph[u, v] += wt
    return users + user_graph @ users, reps["image"][N_USERS:] + reps["text"][N_USERS:]


@pytest.mark.parametrize("fusion", ["mmrec", "weighted"])
def test_dualgnn_tables_equal_dense_math(fusion: str) -> None:
    data = tiny_data()
    torch.manual_seed(3)
    model = create_model("dualgnn", data, model_config("dualgnn", embedding_size=4, user_knn_k=3,
                                                       user_fusion=fusion))
    model.pre_epoch(torch.Generator().manual_seed(5))
    users, items = model.embedding_tables()
    exp_users, exp_items = naive_dualgnn(model, data, fusion)
    np.testing.assert_allclose(users.numpy(), exp_users, atol=1e-5)
    np.testing.assert_allclose(items.numpy(), exp_items, atol=1e-5)


def test_dualgnn_loss_and_gradients() -> None:
    torch.manual_seed(4)
    model = create_model("dualgnn", tiny_data(text_views=2),
                         model_config("dualgnn", embedding_size=4, user_knn_k=3, reg_weight=0.5))
    users, pos, neg = torch.tensor([0, 2, 2]), torch.tensor([1, 3, 3]), torch.tensor([4, 5, 0])
    u, i = (t.detach().double().numpy() for t in model.propagate())
    p = params(model)
    x = (u[users] * i[pos]).sum(1) - (u[users] * i[neg]).sum(1)
    bpr = np.mean(-np.log2(1 / (1 + np.exp(-x))))
    reg = sum((p[f"encoders.{m}.preference"][users] ** 2).mean() for m in ("image", "text"))
    reg += (p["fusion_weight"] ** 2).mean()
    loss = model.loss(users, pos, neg)
    assert loss.item() == pytest.approx(bpr + 0.5 * reg, rel=1e-5)
    loss.backward()
    assert model.encoders["text"].preference.shape == (N_USERS, 4)
    assert model.text_fusion is not None  # two 2-d text views fused by a trained layer
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backbone", ["mmgcn", "dualgnn"])
def test_training_runs_and_exported_tables_score_like_the_model(
        toy_dataset: Path, tmp_path: Path, backbone: str) -> None:
    data = load_dataset(toy_dataset)
    config = load_config(backbone, overrides={"train": {
        "epochs": 2, "batch_size": 64, "topk": [5, 10], "valid_metric": "recall@10"}})
    result = train_model(backbone, data, config, tmp_path / "ckpt", progress=False)
    assert len(result.history) == 2 and all(np.isfinite(h["loss"]) for h in result.history)
    user_table = np.load(tmp_path / "ckpt" / "user_embeddings.npy")
    item_table = np.load(tmp_path / "ckpt" / "item_embeddings.npy")
    model, _, _ = load_model(tmp_path / "ckpt")
    users, items = model.embedding_tables()
    assert user_table.shape == (data.n_users, 64) and item_table.shape == (data.n_items, 64)
    np.testing.assert_allclose(user_table @ item_table.T, (users @ items.T).numpy(), atol=1e-5)
