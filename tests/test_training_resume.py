"""Per-epoch training state: the early-stopping update, the saved dict, kill-and-resume."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

import cliper_prod.training as training
from cliper_prod.config import TrainSettings, build, load_config
from cliper_prod.data.mmrec import InteractionData, load_dataset
from cliper_prod.errors import ConfigError

SMALL = {"train": {"epochs": 4, "patience": 10, "batch_size": 64, "topk": [5, 10],
                   "valid_metric": "recall@10", "lr_decay": 0.5, "lr_decay_epochs": 1}}


def record(epoch: int, value: float) -> dict:
    return {"epoch": epoch, "loss": 1.0, "train_s": 0.0, "eval_s": 0.0,
            "valid": {"recall@10": value}}


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in history]


def killed_run(monkeypatch, backbone: str, dataset: Path, state_path: Path, epoch: int
               ) -> tuple[InteractionData, dict]:
    """Run ``fit`` on ``dataset`` with the SMALL config and a state file, as if killed right
    after saving ``epoch``'s state; the data and config, for the run that resumes."""
    data = load_dataset(dataset)
    config = load_config(backbone, overrides=SMALL)
    real = training.save_torch

    def save_then_stop(path: Path, state: dict) -> None:
        real(path, state)
        if state["epoch"] == epoch:
            raise KeyboardInterrupt
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(training, "save_torch", save_then_stop)
        training.fit(backbone, data, config, progress=False, state_path=state_path)
    return data, config


def jitter_before_each_epoch(monkeypatch) -> None:
    """Make every epoch draw from torch's global generator too, as a dropout layer would."""
    real = training.Trainer.train_epoch

    def train_epoch(self: training.Trainer, epoch: int) -> float:
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.add_(torch.randn_like(parameter), alpha=1e-3)
        return real(self, epoch)
    monkeypatch.setattr(training.Trainer, "train_epoch", train_epoch)


def test_end_epoch_keeps_the_first_best_and_stops_after_patience() -> None:
    settings = build(TrainSettings, {**load_config("freedom")["train"], "epochs": 10,
                                     "patience": 1, "valid_metric": "recall@10"}, "train")
    model = torch.nn.Linear(2, 1)
    state = training.TrainState()
    improved = [state.end_epoch(record(e, v), model, settings)
                for e, v in enumerate([0.1, 0.3, 0.3])]
    assert improved == [True, True, False]
    assert (state.best_epoch, state.best_value, state.stale, state.epoch) == (1, 0.3, 1, 2)
    assert not state.finished
    assert torch.equal(state.best_state["weight"], model.weight)
    assert state.best_state["weight"] is not model.weight  # a copy, not the live weights
    assert not state.end_epoch(record(3, 0.2), model, settings)
    assert state.finished and len(state.history) == 4


def test_train_state_round_trips_through_the_saved_dict() -> None:
    state = training.TrainState([record(0, 0.5)], 0.5, 0, {"w": torch.ones(2)}, 0, 0, False)
    saved = state.to_saved()
    assert set(saved) == {"history", "best_value", "best_epoch", "best_state", "stale",
                          "epoch", "finished"}
    assert training.TrainState.from_saved({**saved, "model": {}, "config": {}}) == state
    fresh = training.TrainState()
    assert (fresh.epoch, fresh.best_value, fresh.history) == (-1, -math.inf, [])


@pytest.mark.parametrize("backbone", ["freedom", "dualgnn"])
def test_killed_fit_resumes_to_the_uninterrupted_result(toy_dataset: Path, tmp_path: Path,
                                                        monkeypatch, caplog, backbone: str
                                                        ) -> None:
    """Every generator (sampler, graph, torch's), the optimiser and the scheduler resume."""
    jitter_before_each_epoch(monkeypatch)
    state_path = tmp_path / "state.pt"
    data, config = killed_run(monkeypatch, backbone, toy_dataset, state_path, 1)
    whole = training.fit(backbone, data, config, progress=False)
    caplog.set_level(logging.INFO, logger="cliper_prod.training")
    resumed = training.fit(backbone, data, config, progress=True, state_path=state_path)
    assert caplog.messages[0] == f"resuming after epoch 1 ({state_path})"
    assert without_times(resumed.history) == without_times(whole.history)
    assert resumed.best_epoch == whole.best_epoch and resumed.valid == whole.valid
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_a_finished_state_resumes_without_training(toy_dataset: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    state_path = tmp_path / "state.pt"
    # killed after the last epoch, before the outputs are written
    data, config = killed_run(monkeypatch, "freedom", toy_dataset, state_path, 3)
    monkeypatch.setattr(training.Trainer, "train_epoch", lambda *a: pytest.fail("trained"))
    resumed = training.fit("freedom", data, config, progress=False, state_path=state_path)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]


def test_a_state_of_other_settings_refuses_to_resume(toy_dataset: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    state_path = tmp_path / "state.pt"
    data, _ = killed_run(monkeypatch, "freedom", toy_dataset, state_path, 0)
    other = load_config("freedom", overrides={**SMALL, "model": {"reg_weight": 0.5}})
    with pytest.raises(ConfigError, match="the interrupted run had other settings; resume with "
                                          "the same options, or delete"):
        training.fit("freedom", data, other, progress=False, state_path=state_path)
