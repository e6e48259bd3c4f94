"""Training loop: determinism, selection on validation only, checkpoint round trip, CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cliper_prod.training as training
from cliper_prod.commands import cli
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import load_dataset

FAST = {"train": {"epochs": 6, "patience": 2, "batch_size": 64, "topk": [5, 10],
                  "valid_metric": "recall@10", "learning_rate": 0.01}}


def ranks_split(task, pairs: np.ndarray) -> bool:
    """Whether an evaluation task's answers are exactly the given (user, item) pairs."""
    users = np.repeat(np.arange(len(task.pos_indptr) - 1), np.diff(task.pos_indptr))
    got = sorted(zip(users.tolist(), task.pos_items.tolist()))
    return got == sorted(map(tuple, pairs.tolist()))


def fast_config(backbone: str, **train) -> dict:
    cfg = load_config(backbone, overrides=FAST)
    cfg["train"].update(train)
    return cfg


@pytest.mark.parametrize("backbone", ["freedom", "lightgcn"])
def test_same_seed_same_result_other_seed_differs(toy_dataset: Path, backbone: str) -> None:
    data = load_dataset(toy_dataset)
    a = training.train_model(backbone, data, fast_config(backbone), progress=False)
    b = training.train_model(backbone, data, fast_config(backbone), progress=False)
    c = training.train_model(backbone, data, fast_config(backbone, seed=1), progress=False)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.test == b.test
    assert [h["loss"] for h in a.history] != [h["loss"] for h in c.history]


def test_selection_and_stopping_use_validation_only(toy_dataset: Path, monkeypatch) -> None:
    data = load_dataset(toy_dataset)
    seen_tasks = []
    real = training.evaluate_model

    def spy(model, task, settings):
        seen_tasks.append(task)
        return real(model, task, settings)

    monkeypatch.setattr(training, "evaluate_model", spy)
    cfg = fast_config("freedom", epochs=40, patience=3)
    result = training.train_model("freedom", data, cfg, progress=False)
    # every evaluation but the last ranked the valid split; test was ranked exactly once, at the end
    assert all(ranks_split(t, data.splits["valid"]) for t in seen_tasks[:-1])
    assert ranks_split(seen_tasks[-1], data.splits["test"])
    assert len(seen_tasks) == len(result.history) + 1
    values = [h["valid"]["recall@10"] for h in result.history]
    assert result.best_epoch == int(np.argmax(values))  # first epoch reaching the maximum
    if len(result.history) < 40:  # stopped early: patience+1 epochs without improvement
        assert len(result.history) - 1 - result.best_epoch == 4


def test_cli_train_then_evaluate_reproduces_test_metrics(toy_dataset: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "fast.toml"
    cfg.write_text('[train]\nepochs = 5\nbatch_size = 64\ntopk = [5, 10]\n'
                   'valid_metric = "recall@10"\n')
    out = tmp_path / "ckpt"
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--backbone", "freedom", "--data", str(toy_dataset),
                              "--config", str(cfg), "--out", str(out), "--quiet",
                              "--set", "model.knn_k=3"])
    assert res.exit_code == 0, res.output
    for name in ("model.pt", "user_embeddings.npy", "item_embeddings.npy", "history.json",
                 "metrics.json", "training_curve.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))
    saved = json.loads((out / "metrics.json").read_text())
    res = runner.invoke(cli, ["evaluate", "--checkpoint", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == pytest.approx(saved["test"])
    # the saved tables rank like the model: recompute recall@10 from them with numpy alone
    users = np.load(out / "user_embeddings.npy")
    items = np.load(out / "item_embeddings.npy")
    data = load_dataset(toy_dataset)
    scores = users @ items.T
    scores[data.train[:, 0], data.train[:, 1]] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :10]
    recalls = []
    for u in np.unique(data.splits["test"][:, 0]):
        pos = set(data.splits["test"][data.splits["test"][:, 0] == u, 1].tolist())
        recalls.append(len(pos & set(top[u].tolist())) / len(pos))
    assert np.mean(recalls) == pytest.approx(saved["test"]["recall@10"], abs=1e-6)


def test_cli_errors_are_one_line_with_exit_codes(toy_dataset: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.inter").write_text("userID\titemID\tx_label\n0\tfoo\t0\n")
    cases = [
        (["train", "--data", str(bad)], 3, f"error: {bad / 'x.inter'}:2: column 'itemID'"),
        (["train", "--data", str(toy_dataset), "--set", "model.knn=3"], 2,
         "error: command line: unknown key [model] knn"),
        (["evaluate", "--checkpoint", str(tmp_path / "none")], 4, "error: "),
    ]
    runner = CliRunner()
    for args, code, message in cases:
        res = runner.invoke(cli, args)
        assert res.exit_code == code, res.output
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # the installed entry point behaves the same in a real process
    proc = subprocess.run([sys.executable, "-m", "cliper_prod", *cases[0][0]],
                          capture_output=True, text=True)
    assert proc.returncode == 3 and cases[0][2] in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["train", "evaluate", "demo", "synthetic", "random-features"])
def test_every_command_has_help(command: str) -> None:
    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output


def test_grid_selects_on_validation_and_ranks_test_once(toy_dataset: Path, monkeypatch) -> None:
    data = load_dataset(toy_dataset)
    calls = []
    real = training.evaluate_model
    monkeypatch.setattr(training, "evaluate_model",
                        lambda m, task, s: calls.append(task) or real(m, task, s))
    result = training.train_model("freedom", data, fast_config("freedom"), progress=False,
                                  grid={"model.reg_weight": [0.0, 0.01],
                                        "train.learning_rate": [0.01, 0.001]})
    assert len(result.grid) == 4
    test_calls = [t for t in calls if ranks_split(t, data.splits["test"])]
    assert len(test_calls) == 1 and calls[-1] is test_calls[0]
    assert all(ranks_split(t, data.splits["valid"]) for t in calls[:-1])
    best = max(result.grid, key=lambda g: g["valid"]["recall@10"])
    assert result.valid == best["valid"]
    chosen = best["overrides"]
    assert result.config["model"]["reg_weight"] == chosen["model"]["reg_weight"]
    assert result.config["train"]["learning_rate"] == chosen["train"]["learning_rate"]


def test_cli_grid_rejects_unknown_keys(toy_dataset: Path) -> None:
    res = CliRunner().invoke(cli, ["train", "--data", str(toy_dataset),
                                   "--grid", "model.reg=0,1"])
    assert res.exit_code == 2 and "unknown key [model] reg" in res.stderr


def test_progress_lines_go_to_the_log_only_when_asked(toy_dataset: Path, caplog, capsys) -> None:
    data = load_dataset(toy_dataset)
    cfg = fast_config("freedom", epochs=2)
    caplog.set_level(logging.INFO, logger="cliper_prod.training")
    training.train_model("freedom", data, cfg, progress=False, grid={"model.reg_weight": [0.0]})
    assert caplog.messages == []
    training.train_model("freedom", data, cfg, progress=True, grid={"model.reg_weight": [0.0]})
    first, second, point = caplog.messages
    assert first.startswith("epoch    0  loss ") and "  valid recall@10 " in first
    assert first.endswith("s)") and "  *  (" in first  # the first epoch is always a new best
    assert second.startswith("epoch    1  loss ")
    assert point.startswith("grid point {'model': {'reg_weight': 0.0}}: valid recall@10 ")
    assert capsys.readouterr().out == ""  # library code logs; only the CLI prints


def test_steps_per_epoch_fixes_the_optimiser_steps_whatever_the_data(toy_dataset: Path,
                                                                     monkeypatch) -> None:
    data = load_dataset(toy_dataset)
    steps = []
    real = training.Trainer.train_epoch

    def count(self, epoch):
        calls = []
        loss = self.model.loss
        self.model.loss = lambda *a: (calls.append(1), loss(*a))[1]  # one call per step
        try:
            return real(self, epoch)
        finally:
            del self.model.loss
            steps.append(len(calls))

    monkeypatch.setattr(training.Trainer, "train_epoch", count)
    training.train_model("lightgcn", data, fast_config("lightgcn", epochs=2, steps_per_epoch=3),
                         progress=False)
    training.train_model("lightgcn", data, fast_config("lightgcn", epochs=1), progress=False)
    assert steps[:2] == [3, 3]
    assert steps[2] == -(-len(data.train) // 64)  # batch_size 64 of FAST
