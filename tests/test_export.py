"""Export bundle and ONNX Runtime path, each against an independent reference: transformers'
own CLIP, a naive numpy fusion and top-K, the PyTorch embed path, hand-broken bundles."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cliper_prod.bundle_format import sha256_file
from cliper_prod.commands import cli
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features.views import ViewSpec
from cliper_prod.histories import history_pairs
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.ranking import TopKRanker
from cliper_prod.runtime.encoder import OnnxEncoder
from tests.conftest import rewrite_manifest
from tests.test_backbone_contract import naive_topk
from tests.test_features import SKELETON, naive_fusion

FP32 = {"min_cosine": 0.99999, "max_abs": 1e-4}
FP16 = {"min_cosine": 0.999, "max_abs": None}
INT8 = {"min_cosine": 0.99, "max_abs": None}  # the bound, written here by hand


def unit(a: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def assert_parity(ref: np.ndarray, got: np.ndarray, bound: dict) -> None:
    r, g = unit(ref), unit(got)
    assert (r * g).sum(1).min() >= bound["min_cosine"]
    if bound["max_abs"] is not None:
        assert np.abs(r - g).max() <= bound["max_abs"]


def test_bundle_files_and_manifest(exported: dict[str, Path]) -> None:
    bundle = exported["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = {p.name for p in bundle.iterdir()}
    for stem in ("image_encoder", "text_fusion"):
        assert {f"{stem}.onnx", f"{stem}.fp16.onnx", f"{stem}.pt"} <= names
    assert {"topk.onnx", "topk.onnx.data", "topk.pt", "tokenizer.json", "user_ids.txt",
            "item_ids.txt", "user_embeddings.npy", "item_embeddings.npy", "history_indptr.npy",
            "history_items.npy"} <= names
    assert manifest["graphs"]["topk"]["external_data"] == "topk.onnx.data"
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert sha256_file(bundle / name) == digest
    text = manifest["graphs"]["text_fusion"]
    assert [i["name"] for i in text["inputs"]] == ["input_ids", "attention_mask",
                                                    "image_embedding", "has_image", "has_text"]
    assert text["inputs"][0]["shape"] == ["batch", 5, 77]
    feats = manifest["features"]
    assert (feats["fusion"], feats["tau"], feats["max_tokens"]) == ("sa", 0.1, 77)
    assert feats["view_spec"]["templates"]["title"] == "The product title is {}."
    assert manifest["backbone"] == "freedom" and manifest["opset"] == 18
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle")]


def test_image_graphs_match_transformers_clip(exported: dict[str, Path]) -> None:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(exported["clip"]).eval()
    pixels = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=pixels)
        ref = getattr(ref, "pooler_output", ref).numpy()
    bundle = Bundle(exported["bundle"], "cpu")
    for precision, bound in (("fp32", FP32), ("fp16", FP16)):
        got = bundle.graph("image_encoder", precision)(pixel_values=pixels.numpy())[0]
        assert got.shape == ref.shape
        assert_parity(ref, got, bound)
    script = torch.jit.load(str(exported["bundle"] / "image_encoder.pt"))
    with torch.no_grad():
        assert_parity(ref, script(pixels).numpy(), FP32)


def test_text_fusion_graphs_match_naive_fusion(exported: dict[str, Path]) -> None:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(exported["clip"]).eval()
    towers = ClipTowers(exported["clip"])
    spec = ViewSpec()
    fields = [{"title": "soft toy", "brand": "Acme"}, {"description": "word " * 200}, {},
              {"title": "red bottle", "categories": "Baby, Feeding"}, {"brand": "x"}, {}]
    tokens = towers.tokenize([v for f in fields for v in spec.build(f)])
    with torch.no_grad():
        ref_views = model.get_text_features(input_ids=torch.from_numpy(tokens.input_ids),
                                            attention_mask=torch.from_numpy(tokens.attention_mask))
    ref_views = getattr(ref_views, "pooler_output", ref_views).numpy().reshape(6, 5, -1)
    rng = np.random.default_rng(2)
    image = rng.standard_normal((6, 32)).astype(np.float32)
    has_image = np.array([True, True, False, True, False, True])
    has_text = np.array([True, True, False, True, True, False])
    ref_image = np.where(has_image[:, None], image, ref_views.mean(1))
    ref_text, ref_sims = naive_fusion(ref_views.astype(np.float64), ref_image.astype(np.float64),
                                      "sa", 0.1)
    ref_text = np.where(has_text[:, None], ref_text, ref_image)
    feeds = dict(input_ids=tokens.input_ids.reshape(6, 5, -1),
                 attention_mask=tokens.attention_mask.reshape(6, 5, -1),
                 image_embedding=image, has_image=has_image, has_text=has_text)
    bundle = Bundle(exported["bundle"], "cpu")
    for precision, bound in (("fp32", FP32), ("fp16", FP16)):
        text, sims, image_out, views = bundle.graph("text_fusion", precision)(**feeds)
        assert_parity(ref_text, text, bound)
        assert_parity(ref_image, image_out, bound)
        assert_parity(ref_views, views, bound)
        assert_parity(ref_sims * 0.1, sims * 0.1, bound)  # cosines, unit scale
    script = torch.jit.load(str(exported["bundle"] / "text_fusion.pt"))
    with torch.no_grad():
        out = script(*(torch.from_numpy(v) for v in feeds.values()))
    assert_parity(ref_text, out[0].numpy(), FP32)


def test_topk_graph_equals_naive_numpy_and_never_returns_training_items(
        exported: dict[str, Path]) -> None:
    ref_items, ref_scores, train = naive_topk(exported["ckpt"], exported["catalog"], 50)
    bundle = Bundle(exported["bundle"], "cpu")
    users = np.arange(80, dtype=np.int64)
    items, scores = TopKRanker(bundle).rank(users)
    assert items.shape == (80, 50) and scores.dtype == np.float32
    for u in range(80):
        assert not set(items[u].tolist()) & train[u]
        assert (items[u] == -1).sum() == max(0, 50 - (60 - len(train[u])))
    differ = (items != ref_items) & np.isfinite(ref_scores)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert differ.mean() < 0.01  # ties aside
    script = torch.jit.load(str(exported["bundle"] / "topk.pt"))
    indptr, history = (np.load(exported["bundle"] / f"history_{n}.npy") for n in
                       ("indptr", "items"))
    queries = np.load(exported["bundle"] / "user_embeddings.npy")[users]
    with torch.no_grad():
        s_items, _ = script(torch.from_numpy(queries),
                            *(torch.from_numpy(a) for a in history_pairs(indptr, history, users)))
    np.testing.assert_array_equal(s_items.numpy(), items)


def test_topk_cli_policy_and_ids(exported: dict[str, Path], tmp_path: Path) -> None:
    bundle = str(exported["bundle"])
    user_ids = (exported["bundle"] / "user_ids.txt").read_text().split()
    item_ids = (exported["bundle"] / "item_ids.txt").read_text().split()
    ref_items, _, _ = naive_topk(exported["ckpt"], exported["catalog"], 5)
    users = tmp_path / "u.txt"
    users.write_text(f"# header\n{user_ids[3]}\n\n  {user_ids[7]}  \n")
    out = tmp_path / "recs.jsonl"
    res = CliRunner().invoke(cli, ["topk", "--users", str(users), "--bundle", bundle, "-k", "5",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["user_id"] for r in recs] == [user_ids[3], user_ids[7]]
    assert recs[0]["items"] == [item_ids[i] for i in ref_items[3]]
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{user_ids[1]}\nnobody\n{user_ids[1]}\ntwo words\n")
    out_bad = tmp_path / "bad.jsonl"
    res = CliRunner().invoke(cli, ["topk", "--users", str(bad), "--bundle", bundle, "--out",
                                   str(out_bad)])
    assert res.exit_code == 3 and f"{bad}:2: unknown user id 'nobody'" in res.stderr
    assert not out_bad.exists() and not list(tmp_path.glob(".bad.jsonl*"))
    res = CliRunner().invoke(cli, ["topk", "--users", str(bad), "--bundle", bundle, "--out",
                                   str(out_bad), "--skip-unknown"])
    assert res.exit_code == 0
    assert ":3: skipped: duplicate user id" in res.stderr and ":4: skipped: malformed" in res.stderr
    assert len(out_bad.read_text().splitlines()) == 1
    res = CliRunner().invoke(cli, ["topk", "--users", str(users), "--bundle", bundle, "-k", "51"])
    assert res.exit_code == 2 and "at most 50" in res.stderr


def test_onnx_embed_equals_pytorch_embed(exported: dict[str, Path], tmp_path: Path) -> None:
    items = exported["policy_items"]
    runner = CliRunner()
    res = runner.invoke(cli, ["embed", str(items), "--clip", str(exported["clip"]), "--out",
                              str(tmp_path / "pt"), "--quiet", "--save-views"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["embed", str(items), "--bundle", str(exported["bundle"]), "--out",
                              str(tmp_path / "ort"), "--quiet", "--save-views", "--batch-size",
                              "3", "--precision", "fp32"])  # auto may run int8 (its own test)
    assert res.exit_code == 0, res.output
    for name in ("item_ids.txt", "errors.jsonl"):
        assert (tmp_path / "pt" / name).read_text() == (tmp_path / "ort" / name).read_text()
    errors = (tmp_path / "ort" / "errors.jsonl").read_text()
    assert "image not found" in errors and "malformed JSON" in errors and '"T2"' in errors
    for name in ("image_feat.npy", "text_feat.npy", "view_feat.npy", "similarity.npy"):
        assert_parity(np.load(tmp_path / "pt" / name), np.load(tmp_path / "ort" / name), FP32)
    summary = json.loads((tmp_path / "ort" / "embed_summary.json").read_text())
    assert summary["truncated_items"] == 1 and summary["fusion"] == "sa"
    res = runner.invoke(cli, ["embed", str(items), "--bundle", str(exported["bundle"]), "--out",
                              str(tmp_path / "x"), "--fusion", "sum"])
    assert res.exit_code == 2 and "--fusion: fixed in the bundle" in res.stderr


def test_bundle_tokenizer_equals_transformers_on_the_real_clip_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(SKELETON)
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = ["The product title is Graco® SnugRide 35 — Infant Car Seat!", "  MiXeD   case ",
             "émoji 👶 and ünïcode", "", "a" * 500, "The product descriptions are: x, y; z."]
    expected = [hf(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)] == expected


def _broken(exported: dict[str, Path], tmp_path: Path, edit) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(exported["bundle"], copy)
    edit(copy)
    return copy


def _rehash(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(folder / name)
    rewrite_manifest(folder, manifest)


def _set_opset(folder: Path) -> None:
    model = onnx.load(str(folder / "topk.onnx"))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 99
    onnx.save(model, str(folder / "topk.onnx"))
    _rehash(folder, "topk.onnx")


def _corrupt(folder: Path) -> None:
    (folder / "topk.onnx").write_bytes((folder / "topk.onnx").read_bytes()[:200])
    _rehash(folder, "topk.onnx")


def _format(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_format_2_bundle_still_serves_with_a_warning(exported: dict[str, Path], tmp_path: Path,
                                                      caplog) -> None:
    """A bundle written before the manifest hashed itself (format 2: no manifest_sha256) opens
    and ranks as before; the log says its values are not protected."""
    from cliper_prod.runtime.recommender import Recommender

    folder = tmp_path / "v2"
    shutil.copytree(exported["bundle"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["manifest_sha256"]
    manifest["format_version"] = 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    users = (folder / "user_ids.txt").read_text().split()[:3]
    with caplog.at_level(logging.WARNING, logger="cliper_prod.bundle_format"):
        got = Recommender(folder, provider="cpu").topk(users, k=5)
    assert got == Recommender(exported["bundle"], provider="cpu").topk(users, k=5)
    assert "format 2 bundle" in caplog.text


@pytest.mark.parametrize("edit, code, message", [
    (lambda f: (f / "topk.onnx").write_bytes((f / "topk.onnx").read_bytes() + b"x"), 7,
     "sha256 differs from the manifest"),
    (lambda f: (f / "item_ids.txt").unlink(), 7, "listed in the manifest but missing"),
    (lambda f: (f / "manifest.json").unlink(), 7, "not a complete bundle"),
    (_format, 7, "this cliper-prod reads format 3"),
    (_set_opset, 9, "cannot load this graph"),
    (_corrupt, 9, "cannot load this graph"),
])
def test_broken_bundles_give_clear_errors(exported: dict[str, Path], tmp_path: Path, edit,
                                          code: int, message: str) -> None:
    bundle = _broken(exported, tmp_path, edit)
    users = tmp_path / "u.txt"
    users.write_text((exported["bundle"] / "user_ids.txt").read_text().split()[0] + "\n")
    res = CliRunner().invoke(cli, ["topk", "--users", str(users), "--bundle", str(bundle)])
    assert res.exit_code == code, res.output
    assert message in res.stderr and "Traceback" not in res.output


def test_topk_refuses_a_bundle_of_another_backbone(exported: dict[str, Path],
                                                   tmp_path: Path) -> None:
    users = tmp_path / "u.txt"
    users.write_text((exported["bundle"] / "user_ids.txt").read_text().split()[0] + "\n")
    res = CliRunner().invoke(cli, ["topk", "--users", str(users), "--bundle",
                                   str(exported["bundle"]), "--backbone", "lightgcn"])
    assert res.exit_code == 7 and "holds a freedom model, not lightgcn" in res.stderr


def test_export_refuses_the_wrong_backbone(exported: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["export", "--backbone", "lightgcn", "--checkpoint",
                                   str(exported["ckpt"]), "--out", str(tmp_path / "b")])
    assert res.exit_code == 4 and "holds a freedom model" in res.stderr
    assert not (tmp_path / "b").exists()


def test_onnx_encoder_reads_the_manifest(exported: dict[str, Path]) -> None:
    encoder = OnnxEncoder(Bundle(exported["bundle"], "cpu"))
    assert encoder.views.names == ViewSpec().names and encoder.max_tokens == 77
    assert encoder.preprocess.crop == 32 and encoder.random_init is False
