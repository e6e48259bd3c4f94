"""--device for train, evaluate, compare and ablate-fusion: the choice, the refusal of a missing
GPU, and files that load on the CPU whatever device wrote them.

This machine has no GPU: a file "saved on cuda" is a real torch file whose storages carry the
``cuda:0`` location tag, as torch writes them from a GPU (torch.save is run with its location
tag patched); it cannot be loaded here without ``map_location``. A real GPU run is not tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cliper_prod.checkpoint as checkpoint
import cliper_prod.comparison as comparison
import cliper_prod.pipeline as pipeline
import cliper_prod.training as training
from cliper_prod.commands import cli
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.device import resolve_device
from cliper_prod.errors import EXIT_CODES, ConfigError, RuntimeSetupError

FAST = {"train": {"epochs": 3, "patience": 5, "batch_size": 64, "topk": [5, 10],
                  "valid_metric": "recall@10"}}
NO_GPU = "error: --device cuda: torch sees no CUDA device"


def command_args(command: str, data: Path, out: Path) -> list[str]:
    """A valid invocation of ``command`` that writes (only) under ``out``."""
    items = data / "items.jsonl"
    items.write_text("")
    return {"train": ["train", "--data", str(data), "--out", str(out), "--quiet"],
            "evaluate": ["evaluate", "--checkpoint", str(out)],
            "compare": ["compare", "--data", str(data), "--out", str(out), "--quiet"],
            "ablate-fusion": ["ablate-fusion", "--items", str(items), "--data", str(data),
                              "--clip", "none", "--workdir", str(out), "--quiet"]}[command]


# the library function each command hands the device to
ENTRY_POINTS = {"train": (training, "train_model"), "evaluate": (checkpoint, "load_model"),
                "compare": (comparison, "compare_backbones"),
                "ablate-fusion": (pipeline, "run_fusion_ablation")}


def save_as_if_on_cuda(monkeypatch, path: Path, obj: object) -> None:
    """``torch.save`` as a GPU process writes it: every storage tagged ``cuda:0``."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)
    if not torch.cuda.is_available():  # the tag is real: torch refuses it without map_location
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)


@pytest.mark.parametrize("available, name, expected", [
    (False, "auto", "cpu"), (True, "auto", "cuda"), (False, "cpu", "cpu"), (True, "cpu", "cpu"),
    (True, "cuda", "cuda")])
def test_resolve_device(monkeypatch, available: bool, name: str, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device(name) == torch.device(expected)


def test_cuda_without_a_gpu_is_a_runtime_setup_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeSetupError, match="run with --device cpu") as info:
        resolve_device("cuda")
    assert info.value.exit_code == 9 and 9 in EXIT_CODES


@pytest.mark.parametrize("command", list(ENTRY_POINTS))
@pytest.mark.parametrize("available, flag, expected", [
    (False, None, "cpu"), (True, None, "cuda"), (True, "cpu", "cpu"), (True, "cuda", "cuda")])
def test_each_command_hands_the_chosen_device_on(toy_dataset: Path, tmp_path: Path,
                                                 monkeypatch, command: str, available: bool,
                                                 flag: str | None, expected: str) -> None:
    """The default is auto; the library call gets the resolved torch.device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    seen = {}

    def spy(*args, device, **kwargs):
        seen["device"] = device
        raise ConfigError("spied")
    monkeypatch.setattr(*ENTRY_POINTS[command], spy)
    args = command_args(command, toy_dataset, tmp_path / "out")
    res = CliRunner().invoke(cli, args + (["--device", flag] if flag else []))
    assert "error: spied" in res.stderr, res.output
    assert seen["device"] == torch.device(expected)


@pytest.mark.parametrize("command", list(ENTRY_POINTS))
def test_cuda_asked_for_without_a_gpu_exits_9_and_writes_nothing(toy_dataset: Path,
                                                                 tmp_path: Path, monkeypatch,
                                                                 command: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, command_args(command, toy_dataset, out) + ["--device", "cuda"])
    assert res.exit_code == 9, res.output
    assert res.stderr.strip().splitlines() == [
        f"{NO_GPU} (no GPU, no driver, or a CPU-only torch build); run with --device cpu"]
    assert res.stdout == "" and not out.exists()


def test_a_checkpoint_saved_on_cuda_evaluates_and_loads_on_the_cpu(toy_dataset: Path,
                                                                   tmp_path: Path,
                                                                   monkeypatch) -> None:
    out = tmp_path / "ckpt"
    settings = [f"--set=train.{k}={json.dumps(v)}" for k, v in FAST["train"].items()]
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--backbone", "dualgnn", "--data", str(toy_dataset),
                              "--out", str(out), "--quiet", "--device", "cpu", *settings])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cpu"
    payload = torch.load(out / "model.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())
    save_as_if_on_cuda(monkeypatch, out / "model.pt", payload)

    res = runner.invoke(cli, ["evaluate", "--checkpoint", str(out), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == pytest.approx(metrics["test"])
    # the exporter's call: the default device is the CPU, the tables those that were saved
    model, _, _ = checkpoint.load_model(out)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    users, items = model.embedding_tables()
    assert np.array_equal(users.numpy(), np.load(out / "user_embeddings.npy"))
    assert np.array_equal(items.numpy(), np.load(out / "item_embeddings.npy"))


def test_a_train_state_saved_on_cuda_loads_on_the_cpu(toy_dataset: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    """map_location: a state file with cuda-tagged storages resumes (exactly) on the CPU."""
    data = load_dataset(toy_dataset)
    config = load_config("freedom", overrides={**FAST, "model": {"dropout": 0.5}})
    state_path = tmp_path / "state.pt"

    def save_then_stop(path: Path, state: dict) -> None:
        save_as_if_on_cuda(monkeypatch, path, state)
        if state["epoch"] == 0:
            raise KeyboardInterrupt
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(training, "save_torch", save_then_stop)
        training.fit("freedom", data, config, progress=False, state_path=state_path)
    whole = training.fit("freedom", data, config, progress=False)
    resumed = training.fit("freedom", data, config, progress=False, state_path=state_path)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_a_state_of_another_device_refuses_to_resume(toy_dataset: Path, tmp_path: Path) -> None:
    """Its generators cannot continue on another kind of device: say which one to use."""
    data = load_dataset(toy_dataset)
    config = load_config("lightgcn", overrides=FAST)
    state_path = tmp_path / "state.pt"
    trainer = training.Trainer("lightgcn", data, config, progress=False)
    trainer.save(state_path, training.TrainState())
    saved = torch.load(state_path, weights_only=True)
    assert saved["device"] == "cpu" and saved["cuda_rng"] == []
    torch.save({**saved, "device": "cuda"}, state_path)
    with pytest.raises(ConfigError, match="trained on cuda; resume it with --device cuda"):
        training.fit("lightgcn", data, config, progress=False, state_path=state_path)


def test_embed_with_clip_on_cuda_without_a_gpu_exits_9(exported: dict, tmp_path: Path,
                                                       monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(cli, ["embed", str(exported["policy_items"]), "--clip",
                                   str(exported["clip"]), "--out", str(tmp_path / "o"),
                                   "--device", "cuda", "--quiet"])
    assert res.exit_code == 9 and res.stderr.startswith(NO_GPU), res.output
    assert not (tmp_path / "o").exists()
