"""CLIPER features: items, views, preprocessing, towers, fusion and the embed job, each against
an independent reference (a naive loop, transformers' own processor and model, hand-written
expectations)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cliper_prod.commands import cli
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.errors import ConfigError
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features.embed import EmbedOptions, embed_catalog
from cliper_prod.features.fusion import ViewFusion
from cliper_prod.features.image_preprocess import ClipImagePreprocessor, ImageDecodeError
from cliper_prod.features.items import Item, ItemError, parse_item, read_items
from cliper_prod.features.tiny_clip import build_tiny_clip
from cliper_prod.features.tokenize import SpecialTokens, pack_tokens
from cliper_prod.features.views import ViewSpec
from tests.conftest import write_inter

SKELETON = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinyclip-8m-skeleton"
WORDS = ["The product title is brand categories are description descriptions Missing",
         "red blue bottle soft toy Acme Baby Feeding a an of with for"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", WORDS)


@pytest.fixture(scope="module")
def towers(tiny_clip: Path) -> ClipTowers:
    return ClipTowers(tiny_clip)


# ---- items and views -------------------------------------------------------------------------

def test_item_fields_are_normalised(tmp_path: Path) -> None:
    item = parse_item(json.dumps({"item_id": " A1 ", "title": "  red\n bottle ", "price": 3,
                                  "categories": [["Baby", "Feeding"], ["Baby", "Bottles"]],
                                  "image": "img/a.png"}), 7, tmp_path)
    assert isinstance(item, Item)
    assert item.item_id == "A1" and item.line == 7
    assert item.fields == {"title": "red bottle", "categories": "Baby, Feeding, Bottles"}
    assert item.image == tmp_path / "img" / "a.png"
    assert parse_item('{"item_id": "B", "categories": "Toys"}', 1, tmp_path).fields == \
        {"categories": "Toys"}


@pytest.mark.parametrize("line, reason", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"title": "x"}', "missing or empty 'item_id'"),
    ('{"item_id": 5}', "missing or empty 'item_id'"),
    ('{"item_id": "A", "title": 5}', "'title' must be a string, got int"),
    ('{"item_id": "A", "categories": [["x", 3]]}', "'categories' entries must be strings"),
    ('{"item_id": "A", "image": ""}', "'image' must be a non-empty path string"),
])
def test_bad_item_lines_are_reported_not_raised(tmp_path: Path, line: str, reason: str) -> None:
    got = parse_item(line, 3, tmp_path)
    assert isinstance(got, ItemError) and got.line == 3 and reason in got.reason


def test_reader_reports_bad_bytes_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"item_id": "A"}\n\n\xff\xfe\n{"item_id": "A"}\n{"item_id": "B"}\n')
    got = list(read_items(path))
    assert [type(g).__name__ for g in got] == ["Item", "ItemError", "ItemError", "Item"]
    assert got[1].reason.startswith("not UTF-8") and got[1].line == 3
    assert got[2].reason.startswith("duplicate") and got[2].line == 4


def test_views_fill_templates_and_missing_fields() -> None:
    spec = ViewSpec()
    views = spec.build({"title": "Red bottle", "categories": "Baby, Feeding"})
    assert views == [
        "The product title is Red bottle.",
        "The product brand is Missing.",
        "The product categories are Baby, Feeding.",
        "The product description is Missing.",
        "The product descriptions are: The product title is Red bottle. "
        "The product categories are Baby, Feeding.",
    ]
    assert all("{}" not in v for v in views)
    assert spec.names == ("title", "brand", "categories", "description", "global")
    custom = ViewSpec(fields=("title",), templates={"title": "Title: {}"}, global_template=None,
                      missing_word="n/a")
    assert custom.build({}) == ["Title: n/a"] and custom.names == ("title",)
    with pytest.raises(ValueError):
        ViewSpec(fields=("title",), templates={"title": "no slot"})


# ---- preprocessing ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(64, 64), (300, 200), (200, 300), (640, 481), (50, 900)])
def test_preprocessing_equals_clip_image_processor(size: tuple[int, int]) -> None:
    from transformers import CLIPImageProcessor

    if not SKELETON.exists():
        pytest.skip("../shared/models not present")
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = CLIPImageProcessor.from_pretrained(SKELETON)(images=img, return_tensors="np")
    got = ClipImagePreprocessor.from_pretrained(SKELETON)(img)
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref["pixel_values"][0], atol=1e-5, rtol=0)


def test_image_modes_load_and_bad_files_raise(tmp_path: Path) -> None:
    pre = ClipImagePreprocessor(size=32, crop=32)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for mode in ("L", "P", "CMYK", "RGBA", "I;16"):
        img = Image.fromarray(rgb).convert(mode) if mode != "I;16" else \
            Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        img.save(tmp_path / f"{mode.replace(';', '')}.{'tiff' if mode == 'CMYK' else 'png'}")
    for f in tmp_path.iterdir():
        assert pre.load(f).shape == (3, 32, 32), f
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(rgb).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    for name, reason in [("missing.png", "not found"), ("empty.png", "empty"),
                         ("text.png", "not a readable image"), ("cut.png", "not a readable")]:
        with pytest.raises(ImageDecodeError, match=reason):
            pre.load(tmp_path / name)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        ClipImagePreprocessor(size=32, crop=32, max_pixels=100).load(tmp_path / "full.png")


# ---- towers ----------------------------------------------------------------------------------

def test_towers_equal_clip_model_and_survive_save_and_reload(tiny_clip: Path, towers: ClipTowers,
                                                             tmp_path: Path) -> None:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    texts = ["The product title is red bottle.", "soft toy"]
    tok = towers.tokenize(texts)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref_t = model.text_projection(model.text_model(
            input_ids=torch.from_numpy(tok.input_ids),
            attention_mask=torch.from_numpy(tok.attention_mask)).pooler_output)
        ref_i = model.visual_projection(model.vision_model(
            pixel_values=torch.from_numpy(pixels)).pooler_output)
    text, _ = towers.encode_texts(texts)
    np.testing.assert_allclose(text, ref_t.numpy(), atol=1e-5)
    np.testing.assert_allclose(towers.encode_images(pixels), ref_i.numpy(), atol=1e-5)
    copy = tmp_path / "copy"
    model.save_pretrained(copy)
    towers.tokenizer.save_pretrained(copy)
    shutil.copy(tiny_clip / "preprocessor_config.json", copy)
    again = ClipTowers(copy)
    np.testing.assert_array_equal(again.encode_texts(texts)[0], text)
    np.testing.assert_array_equal(again.encode_images(pixels), towers.encode_images(pixels))


def _skeleton_with_positions(tmp_path: Path, positions: int) -> Path:
    """The real CLIP tokenizer with a small text tower of ``positions`` positions."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig.from_pretrained(SKELETON)
    cfg.text_config.max_position_embeddings = positions
    cfg.text_config.num_hidden_layers = 1
    cfg.vision_config.num_hidden_layers = 1
    folder = tmp_path / f"clip{positions}"
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copy(SKELETON / f, folder)
    return folder


@pytest.mark.parametrize("positions", [77, 248])
def test_truncation_at_the_models_positions_with_the_real_tokenizer(tmp_path: Path,
                                                                    positions: int) -> None:
    if not SKELETON.exists():
        pytest.skip("../shared/models not present")
    towers = ClipTowers(_skeleton_with_positions(tmp_path, positions))
    assert towers.max_tokens == positions
    long_text = " ".join(f"word{i}" for i in range(400))
    tok = towers.tokenize(["a short prompt.", long_text])
    assert tok.input_ids.shape == (2, positions)
    assert tok.truncated.tolist() == [False, True]
    assert tok.attention_mask[1].sum() == positions and tok.attention_mask[0].sum() < 10
    ref = towers.tokenizer([long_text], truncation=True, max_length=positions)["input_ids"][0]
    assert tok.input_ids[1].tolist() == ref  # same cut as the tokenizer's own truncation
    chunked = towers.tokenize([long_text], chunk=True)
    full = towers.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    body = positions - 2
    windows = [row[mask == 1][1:-1].tolist()
               for row, mask in zip(chunked.input_ids, chunked.attention_mask)]
    assert windows == [full[s:s + body] for s in range(0, len(full), body)]
    assert set(chunked.owner.tolist()) == {0}
    emb, cut = towers.encode_texts([long_text], chunk=True)
    with torch.no_grad():
        per_window = towers.text_tower(torch.from_numpy(chunked.input_ids),
                                       torch.from_numpy(chunked.attention_mask))
    np.testing.assert_allclose(emb[0], per_window.sum(0).numpy(), rtol=1e-4, atol=1e-4)
    assert cut.tolist() == [True]


def naive_pack(token_lists: list[list[int]], special: SpecialTokens, max_tokens: int,
               chunk: bool) -> tuple[np.ndarray, ...]:
    """Token packing as a loop per text and row: start token, ids, end token, padding."""
    body = max_tokens - 2
    rows, owner = [], []
    for i, tokens in enumerate(token_lists):
        windows = [tokens[s:s + body] for s in range(0, max(len(tokens), 1), body)]
        for window in windows if chunk else windows[:1]:
            rows.append([special.bos, *window, special.eos])
            owner.append(i)
    ids = np.full((len(rows), max_tokens), special.pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    truncated = np.array([len(t) > body for t in token_lists], dtype=bool)
    return ids, mask, truncated, np.array(owner, dtype=np.int64)


@pytest.mark.parametrize("chunk", [False, True])
def test_token_packing_equals_a_naive_loop(chunk: bool) -> None:
    special = SpecialTokens(bos=1, eos=2, pad=0)
    rng = np.random.default_rng(0)
    for max_tokens in (3, 4, 9, 77):
        body = max_tokens - 2
        lengths = [0, 1, body - 1, body, body + 1, 3 * body, *rng.integers(0, 200, 6)]
        lists = [rng.integers(3, 1000, n).tolist() for n in lengths]
        for texts in (lists, lists[:1], []):
            got = pack_tokens(texts, special, max_tokens, chunk)
            want = naive_pack(texts, special, max_tokens, chunk)
            for a, b in zip((got.input_ids, got.attention_mask, got.truncated, got.owner), want):
                assert a.dtype == b.dtype and np.array_equal(a, b), (max_tokens, texts)


# ---- fusion ----------------------------------------------------------------------------------

def naive_fusion(views: np.ndarray, image: np.ndarray, mode: str, tau: float):
    fused, scores = [], []
    for t, v in zip(views, image):
        s = np.array([t_v @ v / (np.linalg.norm(t_v) * np.linalg.norm(v)) for t_v in t]) / tau
        w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        fused.append({"sa": (w[:, None] * t).sum(0), "sum": t.sum(0),
                      "concat": np.concatenate(list(t))}[mode])
        scores.append(s)
    return np.array(fused), np.array(scores)


@pytest.mark.parametrize("mode", ["sa", "sum", "concat"])
def test_fusion_equals_a_naive_per_item_loop(mode: str) -> None:
    rng = np.random.default_rng(0)
    views, image = rng.standard_normal((6, 5, 8)), rng.standard_normal((6, 8))
    fused, scores, _ = ViewFusion(mode, tau=0.1)(torch.tensor(views), torch.tensor(image))
    ref_fused, ref_scores = naive_fusion(views, image, mode, 0.1)
    np.testing.assert_allclose(fused.numpy(), ref_fused, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-6)


def test_attention_weights_behave() -> None:
    rng = np.random.default_rng(1)
    views, image = torch.tensor(rng.standard_normal((4, 5, 8))), torch.tensor(
        rng.standard_normal((4, 8)))
    fusion = ViewFusion("sa", tau=0.1)
    weights = torch.softmax(fusion.similarity(views, image), dim=1)
    torch.testing.assert_close(weights.sum(1), torch.ones(4, dtype=torch.float64))
    sharp = ViewFusion("sa", tau=1e-4)(views, image)[0]  # tau -> 0: the most image-like view
    best = torch.nn.functional.cosine_similarity(views, image[:, None], dim=-1).argmax(1)
    torch.testing.assert_close(sharp, views[torch.arange(4), best])
    same = views[:, :1].expand(-1, 5, -1)  # identical views: the fusion is that view
    torch.testing.assert_close(fusion(same, image)[0], views[:, 0])


# ---- the embed job ---------------------------------------------------------------------------

def _catalog(tmp_path: Path) -> Path:
    folder = tmp_path / "cat"
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "d"):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(
            folder / "img" / f"{name}.png")
    (folder / "img" / "broken.png").write_text("nope")
    lines = [
        {"item_id": "A", "title": "red bottle", "brand": "Acme", "image": "img/a.png"},
        {"item_id": "B", "title": "soft toy", "categories": [["Baby"]], "image": "img/b.png"},
        {"item_id": "C", "title": "blue bottle", "image": "img/missing.png"},
        {"item_id": "D", "image": "img/d.png"},
        {"item_id": "E", "image": "img/broken.png"},
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + "{broken\n"
    (folder / "items.jsonl").write_text(text)
    return folder / "items.jsonl"


def test_embed_outputs_and_per_item_policy(towers: ClipTowers, tmp_path: Path) -> None:
    items = _catalog(tmp_path)
    out = tmp_path / "out"
    summary = embed_catalog(items, towers, out, EmbedOptions(batch_size=2, save_views=True),
                            progress=False)
    assert (out / "item_ids.txt").read_text().split() == ["A", "B", "C", "D"]
    errors = {(e["item_id"], e["action"]): e["reason"] for e in
              map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == {("C", "kept"), ("D", "kept"), ("E", "skipped"), (None, "skipped")}
    assert "image not found" in errors[("C", "kept")]
    assert "no usable image" in errors[("E", "skipped")]
    assert (summary["embedded"], summary["skipped"], summary["kept_with_fallback"]) == (4, 2, 2)
    image, text = np.load(out / "image_feat.npy"), np.load(out / "text_feat.npy")
    views, sims = np.load(out / "view_feat.npy"), np.load(out / "similarity.npy")
    assert image.shape == text.shape == (4, towers.dim) and views.shape == (4, 5, towers.dim)
    # the kept items follow the documented fallbacks
    np.testing.assert_allclose(image[2], views[2].mean(0), rtol=1e-5)
    np.testing.assert_allclose(text[3], image[3], rtol=1e-6)
    # item A, recomputed from scratch: its views, its image, the SA fusion
    spec = ViewSpec()
    ref_views, _ = towers.encode_texts(spec.build({"title": "red bottle", "brand": "Acme"}))
    ref_image = towers.encode_images(towers.preprocess.load(items.parent / "img" / "a.png")[None])
    np.testing.assert_allclose(views[0], ref_views, atol=1e-5)
    np.testing.assert_allclose(image[0], ref_image[0], atol=1e-5)
    ref_text, ref_sims = naive_fusion(ref_views[None].astype(np.float64),
                                      ref_image.astype(np.float64), "sa", 0.1)
    np.testing.assert_allclose(text[0], ref_text[0], atol=1e-4)
    np.testing.assert_allclose(sims[0], ref_sims[0], atol=1e-3)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_train_uses_embedded_features_in_dataset_item_order(towers: ClipTowers,
                                                            tmp_path: Path) -> None:
    items = _catalog(tmp_path)
    out = items.parent / "cliper"
    embed_catalog(items, towers, out, EmbedOptions(), progress=False)
    data_dir = items.parent
    # dataset item ids in another order than the embed output
    (data_dir / "i_id_mapping.csv").write_text("asin\titemID\nD\t0\nA\t1\nC\t2\nB\t3\n")
    write_inter(data_dir, [(0, 0, 0), (0, 1, 0), (1, 2, 0), (1, 3, 0), (0, 2, 1), (1, 0, 2)])
    data = load_dataset(data_dir, features_dir=out)
    image = np.load(out / "image_feat.npy")  # rows A, B, C, D
    np.testing.assert_array_equal(data.features["image"], image[[3, 0, 2, 1]])
    (data_dir / "i_id_mapping.csv").write_text("asin\titemID\nD\t0\nA\t1\nE\t2\nB\t3\n")
    res = CliRunner().invoke(cli, ["train", "--data", str(data_dir), "--features", "cliper",
                                   "--quiet"])
    assert res.exit_code == 3 and "1 of the dataset's 4 items have no embedding (first: E)" \
        in res.stderr


def test_embed_cli(tiny_clip: Path, tmp_path: Path) -> None:
    items = _catalog(tmp_path)
    res = CliRunner().invoke(cli, ["embed", str(items), "--clip", str(tiny_clip), "--out",
                                   str(tmp_path / "o"), "--fusion", "concat", "--quiet",
                                   "--no-global-view"])
    assert res.exit_code == 0, res.output
    assert "embedded 4 item(s), skipped 2" in res.output
    assert np.load(tmp_path / "o" / "text_feat.npy").shape == (4, 4 * 32)
    res = CliRunner().invoke(cli, ["embed", str(items), "--clip", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "o2")])
    assert res.exit_code == 6 and "cannot load a CLIP checkpoint" in res.stderr
    res = CliRunner().invoke(cli, ["embed", str(items), "--clip", str(tiny_clip), "--out",
                                   str(tmp_path / "o3"), "--fields", "title,colour"])
    assert res.exit_code == 2 and "unknown field(s) ['colour']" in res.stderr


def test_fusion_ablation_runs_each_mode(tiny_clip: Path, tmp_path: Path) -> None:
    from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog

    data_dir = generate_catalog(tmp_path / "cat", SyntheticSpec(n_users=60, n_items=60,
                                                                min_interactions=5,
                                                                max_interactions=10))
    res = CliRunner().invoke(cli, ["ablate-fusion", "--items", str(data_dir / "items.jsonl"),
                                   "--data", str(data_dir), "--clip", str(tiny_clip),
                                   "--workdir", str(tmp_path / "w"), "--epochs", "2", "--quiet",
                                   "--random-init"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "w" / "ablation.json").read_text())
    assert [r["fusion"] for r in rows] == ["sa", "sum", "concat"]
    assert "only prove the plumbing" in res.output
    assert np.load(tmp_path / "w" / "features-concat" / "text_feat.npy").shape == (60, 5 * 32)


def bpr(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.logsigmoid((a * p).sum(1) - (a * n).sum(1)).mean()


def test_mlp_fusion_is_trained_with_the_recommender(towers: ClipTowers, tmp_path: Path) -> None:
    from cliper_prod.backbones import create_model
    from cliper_prod.config import load_config

    items = _catalog(tmp_path)
    out = items.parent / "cliper"
    summary = embed_catalog(items, towers, out, EmbedOptions(fusion="mlp"), progress=False)
    assert summary["fusion"] == "mlp"
    assert np.load(out / "text_feat.npy").shape == (4, 5 * towers.dim)  # the MLP's input
    (items.parent / "i_id_mapping.csv").write_text("asin\titemID\nA\t0\nB\t1\nC\t2\nD\t3\n")
    write_inter(items.parent, [(0, 0, 0), (0, 1, 0), (1, 2, 0), (1, 3, 0), (0, 2, 1), (1, 0, 2)])
    data = load_dataset(items.parent, features_dir=out)
    assert (data.text_views, data.text_fusion) == (5, "mlp")
    cfg = load_config("freedom")["model"]
    cfg.update(knn_k=2)
    with pytest.raises(ConfigError, match="set model.reg_weight > 0"):
        create_model("freedom", data, cfg)
    cfg.update(reg_weight=0.1, dropout=0.0)
    model = create_model("freedom", data, cfg)
    loss = model.loss(torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([3, 1]))
    loss.backward()
    layer = model.text_fusion.layer
    assert layer.weight.shape == (towers.dim, 5 * towers.dim)
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # the loss's text term runs the views through the layer: recompute it by hand
    u, i = (t.detach() for t in model.propagate())
    feats = model.features["text"].detach()
    proj = model.projections["text"]
    with torch.no_grad():
        fused = torch.nn.functional.leaky_relu(feats @ layer.weight.T + layer.bias, 0.2)
        t = proj(fused)
        img = model.projections["image"](model.features["image"])
        users, pos, neg = torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([3, 1])
        expected = bpr(u[users], i[pos], i[neg]) + 0.1 * (
            bpr(u[users], img[pos], img[neg]) + bpr(u[users], t[pos], t[neg]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
