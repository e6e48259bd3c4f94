"""What every registered backbone must do, driven by the registry: a preset, a config dataclass
that reads it, and train -> export -> a served top-K equal to a naive one over its tables."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cliper_prod.backbones import BACKBONE_NAMES, model_class
from cliper_prod.commands import cli
from cliper_prod.config import TRAIN_PRESET, load_config
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.fold_in import ITEM_ROWS, USER_RULES
from cliper_prod.runtime.ranking import TopKRanker


def naive_topk(ckpt: Path, catalog: Path, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Top-``k`` items and scores of every user from the checkpoint's tables, training items
    excluded, and each user's training items."""
    users = np.load(ckpt / "user_embeddings.npy").astype(np.float64)
    items = np.load(ckpt / "item_embeddings.npy").astype(np.float64)
    scores = users @ items.T
    train: dict[int, set[int]] = {}
    for line in (catalog / "synthetic.inter").read_text().splitlines()[1:]:
        u, i, label = (int(x) for x in line.split("\t")[:3])
        if label == 0:
            train.setdefault(u, set()).add(i)
            scores[u, i] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1), train


def test_the_registry_and_the_cli_import_without_torch() -> None:
    code = ("import sys; from cliper_prod.commands import cli; "
            "from cliper_prod.backbones import BACKBONE_NAMES; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(*BACKBONE_NAMES)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == list(BACKBONE_NAMES) == sorted(BACKBONE_NAMES)


def test_every_backbone_has_a_preset_and_every_preset_a_backbone() -> None:
    presets = {p.name.removesuffix(".toml") for p in resources.files("cliper_prod.presets")
               .iterdir() if p.name.endswith(".toml")}
    assert presets - {TRAIN_PRESET} == set(BACKBONE_NAMES)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_the_preset_fills_the_config_dataclass(backbone: str) -> None:
    cls = model_class(backbone)
    assert cls.__doc__ and cls.config_class.__doc__
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    assert list(load_config(backbone)["model"]) == fields


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_trains_exports_and_serves_its_dot_product_top_k(exported: dict[str, Path], tmp_path: Path,
                                                          backbone: str) -> None:
    ckpt, bundle_dir = tmp_path / "ckpt", tmp_path / "bundle"
    res = CliRunner().invoke(cli, ["train", "--backbone", backbone, "--data",
                                   str(exported["catalog"]), "--set", "train.epochs=1",
                                   "--out", str(ckpt), "--quiet"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["export", "--backbone", backbone, "--checkpoint", str(ckpt),
                                   "--out", str(bundle_dir), "--max-k", "10",
                                   "--no-torchscript"])
    assert res.exit_code == 0, res.output
    ref_items, ref_scores, _ = naive_topk(ckpt, exported["catalog"], 10)
    items, scores = TopKRanker(Bundle(bundle_dir, "cpu", backbone)).rank(np.arange(80))
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert ((items != ref_items) & np.isfinite(ref_scores)).mean() < 0.01  # ties aside
    # its fold-in rules are ones the runtime has, or refused with a reason
    fold = Bundle(bundle_dir, "cpu").manifest["fold_in"]
    assert fold["user_rule"] in USER_RULES or fold["params"]["no_user_rule"]
    assert fold["item_rule"] in ITEM_ROWS or fold["params"]["no_item_rule"]
