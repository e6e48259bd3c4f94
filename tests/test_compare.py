"""`cliper-prod compare` end to end on the synthetic catalog, CI-sized (2 epochs, 2 seeds)."""

from __future__ import annotations

import json
import statistics

from click.testing import CliRunner

from cliper_prod.commands import cli
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.training import train_model

BACKBONES = ["lattice", "mmgcn", "dualgnn", "slmrec", "freedom", "vbpr"]


def test_compare_writes_table_two_for_every_backbone(exported, tmp_path) -> None:
    catalog = exported["catalog"]
    res = CliRunner().invoke(cli, ["compare", "--data", str(catalog), "--backbones",
                                   ",".join(BACKBONES), "--seeds", "1,2", "--set",
                                   "train.epochs=2", "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "compare.json").read_text())
    assert len(result["runs"]) == len(BACKBONES) * 2 * 2
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "compare.md").read_text()
    for backbone in BACKBONES:
        runs = {v: [r["test"]["recall@20"] for r in result["runs"]
                    if r["backbone"] == backbone and r["features"] == v]
                for v in ("vanilla", "cliper")}
        vanilla, cliper = statistics.fmean(runs["vanilla"]), statistics.fmean(runs["cliper"])
        assert result["summary"][backbone]["improvement"]["recall@20"] == \
            (cliper - vanilla) / vanilla
        assert f"| {backbone} | +CLIPER | " in table and f"| {backbone} | improv. | " in table
        assert f"{vanilla:.4f}" in table and f"{(cliper - vanilla) / vanilla:+.1%}" in table

    # one run, retrained on its own, gives the same test metrics (selection on valid only)
    config = load_config("freedom", overrides={"train": {"epochs": 2, "seed": 2}})
    alone = train_model("freedom", load_dataset(catalog, features_dir=catalog / "cliper"),
                        config, progress=False)
    listed = next(r for r in result["runs"]
                  if (r["backbone"], r["features"], r["seed"]) == ("freedom", "cliper", 2))
    assert listed["test"] == alone.test


def test_compare_rejects_unknown_backbones_and_bad_seeds(exported, tmp_path) -> None:
    base = ["compare", "--data", str(exported["catalog"]), "--out", str(tmp_path)]
    res = CliRunner().invoke(cli, base + ["--backbones", "freedom,nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = CliRunner().invoke(cli, base + ["--seeds", "1,x"])
    assert res.exit_code == 2 and "--seeds" in res.output
    assert not (tmp_path / "compare.json").exists()
