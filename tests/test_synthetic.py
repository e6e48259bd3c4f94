"""The built-in synthetic catalog and the demo job built on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cliper_prod.commands import cli
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog

SMALL = SyntheticSpec(n_users=120, n_items=80, min_interactions=6, max_interactions=15)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return generate_catalog(tmp_path_factory.mktemp("syn") / "catalog", SMALL)


def test_catalog_is_a_valid_mmrec_folder(catalog: Path) -> None:
    data = load_dataset(catalog)
    assert (data.n_users, data.n_items) == (120, 80)
    assert set(data.train[:, 1].tolist()) == set(range(80))  # every item trained
    assert set(data.train[:, 0].tolist()) == set(range(120))
    assert data.dropped_cold == {"valid": 0, "test": 0}
    n = {s: len(a) for s, a in data.splits.items()}
    total = sum(n.values())
    assert 0.7 < n["train"] / total < 0.9 and 0.05 < n["test"] / total < 0.15
    assert data.features["image"].shape == (80, 128) and data.features["text"].shape == (80, 64)
    assert data.item_ids[:2] == ["SYN00000", "SYN00001"]


def test_items_have_text_fields_and_rgb_images(catalog: Path) -> None:
    items = [json.loads(line) for line in (catalog / "items.jsonl").read_text().splitlines()]
    assert [it["item_id"] for it in items] == load_dataset(catalog).item_ids
    for it in items:
        assert it["title"] and isinstance(it["categories"], list)
        assert isinstance(it["categories"][0], list)
        with Image.open(catalog / it["image"]) as img:
            assert img.mode == "RGB" and img.size == (64, 64)
    big = generate_catalog(catalog.parent / "big", SyntheticSpec(n_items=400, seed=3))
    items = [json.loads(line) for line in (big / "items.jsonl").read_text().splitlines()]
    gaps = [it for it in items if "brand" not in it or not it["description"]]
    assert 0 < len(gaps) < 0.1 * len(items)  # some items exercise the missing-field policy


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path: Path, catalog: Path) -> None:
    again = generate_catalog(tmp_path / "again", SMALL)
    for f in sorted(p.relative_to(catalog) for p in catalog.rglob("*") if p.is_file()):
        assert (again / f).read_bytes() == (catalog / f).read_bytes(), f
    other = generate_catalog(tmp_path / "other", SyntheticSpec(**{**SMALL.__dict__, "seed": 1}))
    assert (other / "synthetic.inter").read_bytes() != (catalog / "synthetic.inter").read_bytes()


def test_existing_folder_is_not_overwritten_by_default(tmp_path: Path) -> None:
    out = tmp_path / "cat"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_catalog(out, SMALL)
    assert (out / "keep.txt").read_text() == "mine"
    generate_catalog(out, SMALL, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "synthetic.inter").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cat"]  # no temporary folder left behind


def test_interactions_follow_item_topics(catalog: Path) -> None:
    """A user's held-out items share the categories of their training items far more than chance:
    scoring items by the user's training-category histogram beats random ranking."""
    data = load_dataset(catalog)
    items = [json.loads(line) for line in (catalog / "items.jsonl").read_text().splitlines()]
    cats = sorted({"/".join(it["categories"][0]) for it in items})
    item_cat = np.array([cats.index("/".join(it["categories"][0])) for it in items])
    hist = np.zeros((data.n_users, len(cats)))
    np.add.at(hist, (data.train[:, 0], item_cat[data.train[:, 1]]), 1)
    scores = hist[:, item_cat] + 1e-3 * np.random.default_rng(0).random((data.n_users, 80))
    scores[data.train[:, 0], data.train[:, 1]] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :10]
    test = data.splits["test"]
    hit_rate = np.mean([i in top[u] for u, i in test])
    assert hit_rate > 2 * 10 / 80  # random ranking would hit about 10 / 80


@pytest.mark.parametrize("bad", [dict(n_users=0), dict(min_interactions=2),
                                 dict(max_interactions=80), dict(n_topics=9)])
def test_bad_specs_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        SyntheticSpec(**{**SMALL.__dict__, **bad}).validate()


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path), "--epochs", "2",
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    assert "[3/5] FREEDOM trained on CLIPER features" in res.output
    assert "RANDOM weights" in res.output
    assert (tmp_path / "freedom-cliper" / "item_embeddings.npy").is_file()
    assert (tmp_path / "catalog" / "cliper" / "text_feat.npy").is_file()
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    # its CLIP has random weights (saved, then loaded): said so, and exported as saved (below)
    summary = json.loads((tmp_path / "catalog" / "cliper" / "embed_summary.json").read_text())
    features = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["features"]
    assert summary["random_weights"] is features["random_weights"] is True
    assert summary["built_from_config"] is features["built_from_config"] is False
    # the ONNX Runtime features equal the PyTorch ones; the recommendations are 10 unseen items
    for name in ("image_feat.npy", "text_feat.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "features-onnx" / name),
                                   np.load(tmp_path / "catalog" / "cliper" / name), atol=1e-5)
    recs = [json.loads(line) for line in (tmp_path / "recs.jsonl").read_text().splitlines()]
    assert len(recs) == 5 and all(len(r["items"]) == 10 for r in recs)
