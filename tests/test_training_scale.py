"""Training at scale: the large-batch learning-rate schedule, validation on a user sample, and
the memory-lean propagation (same gradients, same training, across a resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cliper_prod.training as training
from cliper_prod.commands import cli
from cliper_prod.config import TrainSettings, build, load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.evaluation import evaluate_ranking
from cliper_prod.backbones import create_model
from cliper_prod import graph
from cliper_prod.graph import Propagation, fixed_propagation, light_propagate

FAST = {"train": {"epochs": 5, "patience": 10, "batch_size": 64, "topk": [5, 10],
                  "valid_metric": "recall@10", "learning_rate": 0.01}}


def settings(**train) -> TrainSettings:
    return build(TrainSettings, {**load_config("lightgcn")["train"], **train}, "train")


def test_learning_rate_factor_per_step_against_hand_computed_values() -> None:
    # batch 8192 = 4 x 2048: sqrt scaling x2; warm-up over 4 steps; 3 steps per epoch; the
    # rate halves every 2 epochs (x 0.5 ** (epoch / 2))
    factor = training.learning_rate_factor(
        settings(lr_scaling="sqrt", lr_warmup_steps=4, lr_decay=0.5, lr_decay_epochs=2),
        batch=8192, epoch_steps=3)
    expected = [2 * 0.25, 2 * 0.5, 2 * 0.75,  # epoch 0, warming up
                2 * 0.70710678, 2 * 0.70710678, 2 * 0.70710678,  # epoch 1: 0.5 ** 0.5
                2 * 0.5]  # epoch 2
    assert [factor(s) for s in range(7)] == pytest.approx(expected, rel=1e-8)
    linear = training.learning_rate_factor(settings(lr_scaling="linear"), 8192, 3)
    assert [linear(s) for s in (0, 5, 100)] == [4.0, 4.0, 4.0]
    default = training.learning_rate_factor(settings(), 2048, 59)  # exactly today's: 1.0
    assert all(default(s) == 1.0 for s in range(0, 5000, 7))


def test_the_trainer_steps_the_schedule_after_every_optimiser_step(toy_dataset: Path) -> None:
    data = load_dataset(toy_dataset)
    config = load_config("lightgcn", overrides={"train": {
        **FAST["train"], "epochs": 2, "steps_per_epoch": 3, "lr_scaling": "sqrt",
        "lr_warmup_steps": 4}})
    trainer = training.Trainer("lightgcn", data, config, progress=False)
    rates = []
    loss = trainer.model.loss
    trainer.model.loss = lambda *a: (rates.append(trainer.optimizer.param_groups[0]["lr"]),
                                     loss(*a))[1]
    trainer.train_epoch(0)
    trainer.train_epoch(1)
    batch = math.ceil(len(data.train) / 3)
    full = 0.01 * math.sqrt(batch / 64)
    assert rates == pytest.approx([full * 0.25, full * 0.5, full * 0.75, full, full, full])


def test_a_user_sample_is_drawn_once_from_the_seed(toy_dataset: Path) -> None:
    data = load_dataset(toy_dataset)
    task = training.ranking_tasks(data)["valid"]
    a, b, other = task.sample(10, 999), task.sample(10, 999), task.sample(10, 1)
    assert np.array_equal(a.users, b.users) and not np.array_equal(a.users, other.users)
    assert len(a.users) == 10 and set(a.users) <= set(task.users)
    assert np.array_equal(a.users, np.sort(a.users))
    assert task.sample(0, 999) is task and task.sample(len(task.users), 999) is task


def test_epochs_validate_on_the_sample_and_the_selected_one_on_every_user(
        toy_dataset: Path, monkeypatch) -> None:
    data = load_dataset(toy_dataset)
    ranked = []
    real = training.evaluate_model

    def spy(model, task, train_settings):
        ranked.append(task.users.copy())
        return real(model, task, train_settings)

    monkeypatch.setattr(training, "evaluate_model", spy)
    config = load_config("lightgcn", overrides={"train": {**FAST["train"], "eval_users": 12}})
    first = training.fit("lightgcn", data, config, progress=False)
    epochs = ranked[:-1]
    assert len(epochs) == 5 and all(np.array_equal(u, epochs[0]) for u in epochs)
    assert len(epochs[0]) == 12
    all_users = np.unique(data.splits["valid"][:, 0])
    assert np.array_equal(ranked[-1], all_users)  # the selected epoch, on every valid user
    # independent reference: the returned model's tables ranked over all valid users
    users, items = first.model.embedding_tables()
    assert first.valid == evaluate_ranking(users, items, training.ranking_tasks(data)["valid"],
                                           (5, 10))
    second = training.fit("lightgcn", data, config, progress=False)
    assert [h["valid"] for h in second.history] == [h["valid"] for h in first.history]
    assert second.valid == first.valid


@pytest.mark.parametrize("n_layers", [1, 3])
def test_lean_and_plain_propagation_give_the_float64_reference_gradients(n_layers: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 9
    dense = torch.rand(n, n, generator=gen, dtype=torch.float64)
    dense[dense < 0.6] = 0  # a sparse, asymmetric graph: the backward pass needs A^T
    edges = dense.nonzero().T
    adj = fixed_propagation(edges, dense[edges[0], edges[1]], n)
    ego = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    # d/d ego of sum(weight * mean_l A^l ego) = mean_l (A^T)^l weight, by dense float64 powers
    reference = sum(torch.linalg.matrix_power(dense.T, k) @ weight
                    for k in range(n_layers + 1)) / (n_layers + 1)
    for lean in (False, True):
        x = ego.clone().requires_grad_(True)
        (light_propagate(adj, x, n_layers, lean) * weight).sum().backward()
        assert torch.allclose(x.grad, reference, rtol=1e-12, atol=1e-12), lean


@pytest.mark.parametrize("backbone", ["lightgcn", "freedom"])
def test_memory_lean_training_matches_plain_on_the_synthetic_catalog_across_a_resume(
        tmp_path: Path, monkeypatch, backbone: str) -> None:
    runner = CliRunner()
    catalog = tmp_path / "catalog"
    assert runner.invoke(cli, ["synthetic", str(catalog), "--users", "120", "--items", "80"]
                         ).exit_code == 0
    common = ["train", "--backbone", backbone, "--data", str(catalog), "--quiet",
              "--set", "train.epochs=4", "--set", "train.batch_size=256",
              "--set", "train.topk=[5, 10]", "--set", "train.valid_metric=\"recall@10\""]
    plain = runner.invoke(cli, [*common, "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    lean_args = [*common, "--out", str(tmp_path / "lean"), "--set", "train.memory_lean=true"]
    real = training.save_torch

    def save_then_stop(path: Path, state: dict) -> None:
        real(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training, "save_torch", save_then_stop)
        killed = runner.invoke(cli, lean_args)
    assert killed.exit_code != 0 and (tmp_path / "lean" / training.STATE_DIR).exists()
    resumed = runner.invoke(cli, [*lean_args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    want, got = (json.loads((tmp_path / d / "metrics.json").read_text())
                 for d in ("plain", "lean"))
    assert got["config"]["train"]["memory_lean"] and not want["config"]["train"]["memory_lean"]
    assert got["best_epoch"] == want["best_epoch"]
    # the same arithmetic summed in another order: equal up to float32 rounding
    assert got["test"] == pytest.approx(want["test"], abs=1e-6)
    assert got["valid"] == pytest.approx(want["valid"], abs=1e-6)


def _float64(model) -> None:
    """The model's parameters and fixed graphs in float64, a graph shared by two attributes
    converted once."""
    model.double()
    done: dict[int, Propagation] = {}
    for name, value in list(vars(model).items()):
        if isinstance(value, Propagation):
            if id(value) not in done:
                symmetric = value.adj_t is value.adj
                value.adj = value.adj.to(torch.float64)
                value.adj_t = value.adj if symmetric else value.adj_t.to(torch.float64)
                done[id(value)] = value


@pytest.mark.parametrize("backbone, model", [
    ("lightgcn", {"n_layers": 3, "reg_weight": 0.5}),
    ("freedom", {}),  # dropout 0.8: a pruned training graph
    ("freedom", {"reg_weight": 0.1, "n_mm_layers": 2}),  # the modality terms, trained features
    ("freedom", {"n_mm_layers": 0, "dropout": 0.0}),
])
def test_chunked_backward_gives_the_whole_batch_gradients_in_float64(
        toy_dataset: Path, backbone: str, model: dict, monkeypatch) -> None:
    monkeypatch.setattr(graph, "BLOCK_ROWS", 6)  # products by blocks of rows, as at scale
    data = load_dataset(toy_dataset)
    torch.manual_seed(0)
    net = create_model(backbone, data, {**load_config(backbone)["model"], **model})
    net.pre_epoch(torch.Generator().manual_seed(0))
    _float64(net)
    train = torch.from_numpy(data.train)
    users, pos = train[:, 0], train[:, 1]  # repeated users and items: gradients add up
    neg = torch.randint(0, data.n_items, (len(users),), generator=torch.Generator().manual_seed(1))
    whole = net.loss(users, pos, neg)
    whole.backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    net.lean_propagation = True  # as a memory-lean run trains: the running sum, in place
    value = training.chunked_backward(net, users, pos, neg, chunk=7)  # several chunks
    assert value == pytest.approx(whole.item(), rel=1e-12)
    for name, param in net.named_parameters():
        assert torch.allclose(param.grad, want[name], rtol=1e-10, atol=1e-14), name
    assert len(users) > 3 * 7


def test_a_memory_lean_run_of_a_backbone_without_features_loads_none(toy_dataset: Path) -> None:
    assert training.lean_loading("lightgcn", True) == {"feature_files": {}}
    assert training.lean_loading("lightgcn", False) == training.lean_loading("freedom", True) == {}
    assert load_dataset(toy_dataset, **training.lean_loading("lightgcn", True)).features == {}
    assert set(load_dataset(toy_dataset).features) == {"image", "text"}


def test_a_blocked_product_gives_the_products_values_and_gradient(monkeypatch) -> None:
    monkeypatch.setattr(graph, "BLOCK_ROWS", 4)
    gen = torch.Generator().manual_seed(3)
    dense = torch.rand(11, 11, generator=gen, dtype=torch.float64)
    dense[dense < 0.5] = 0
    dense[5:9] = 0  # a block of empty rows
    edges = dense.nonzero().T
    adj = fixed_propagation(edges, dense[edges[0], edges[1]], 11)
    x = torch.randn(11, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    out = adj(x, blocked=True)
    assert torch.allclose(out, dense @ x, rtol=1e-14, atol=1e-14)
    assert torch.equal(out, adj(x))  # row by row the same arithmetic
    (out * weight).sum().backward()
    assert torch.allclose(x.grad, dense.T @ weight, rtol=1e-14, atol=1e-14)


def test_weighted_sampling_beyond_multinomials_limit_draws_from_the_same_distribution() -> None:
    """FREEDOM's pruning at 5M users samples among 74M edges, past torch.multinomial's 2^24
    categories: the exponential-key path (forced here with a tiny limit) keeps distinct
    indices with the inclusion frequencies multinomial's draws have, deterministically per
    seed."""
    from cliper_prod.graph import weighted_sample

    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 6.0])

    def inclusion(limit: int, seed: int) -> torch.Tensor:
        generator, counts = torch.Generator().manual_seed(seed), torch.zeros(len(weights))
        for _ in range(4000):
            kept = weighted_sample(weights, 3, generator, multinomial_max=limit)
            assert len(set(kept.tolist())) == 3
            counts[kept] += 1
        return counts / 4000

    by_keys, by_multinomial = inclusion(2, 0), inclusion(100, 1)
    assert (by_keys - by_multinomial).abs().max() < 0.04, (by_keys, by_multinomial)
    assert by_keys[5] > by_keys[2] > by_keys[0] > by_keys[4]  # heavier edges kept more often
    assert torch.equal(inclusion(2, 0), by_keys)
