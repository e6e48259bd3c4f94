"""The ONNX Runtime-optimized (fused) CLIP graphs of a bundle: node counts read from the files,
parity against transformers' own CLIP, the runtime's choice of variant, and old bundles."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cliper_prod.bundle_format import sha256_file
from cliper_prod.errors import BundleError, ExportError
from cliper_prod.export.graphs import GraphSpec, export_onnx, optimize_clip
from cliper_prod.export.feature_graphs import causal_if_exact
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features.fusion import ViewFusion
from cliper_prod.features.views import ViewSpec
from cliper_prod.runtime.bundle_reader import Bundle, pick_variant
from cliper_prod.runtime.encoder import OnnxEncoder
from tests.conftest import rewrite_manifest
from tests.test_export import FP16, FP32, assert_parity

TOWERS = {"image_encoder": "vision_config", "text_fusion": "text_config"}


def clip_config(exported: dict[str, Path]) -> dict:
    return json.loads((exported["clip"] / "config.json").read_text())


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_fused_graphs_hold_one_attention_node_per_layer(exported: dict[str, Path],
                                                        name: str) -> None:
    config = clip_config(exported)[TOWERS[name]]
    record = manifest(exported["bundle"])["graphs"][name]
    layers = config["num_hidden_layers"]
    assert record["fused"]["layers"] == layers
    assert record["fused"]["causal_attention"] is (name == "text_fusion")
    for key in ("fused.fp32", "fused.fp16"):
        graph = onnx.load(str(exported["bundle"] / record["files"][key]))
        ops = Counter(n.op_type for n in graph.graph.node)
        assert ops["Attention"] == layers, (key, ops)
        assert ops["QuickGelu"] == layers and ops["SkipLayerNormalization"] >= layers
        assert ops["Softmax"] == (1 if name == "text_fusion" else 0)  # the SA fusion's softmax
        for node in (n for n in graph.graph.node if n.op_type == "Attention"):
            # the text graph's attention: causal, no bias (CUDA's one-kernel form); the ViT's
            # sees every patch
            causal = {a.name: a.i for a in node.attribute}.get("unidirectional", 0)
            assert causal == (name == "text_fusion") and not any(node.input[3:]), node
        assert [i.name for i in graph.graph.input] == [i.name for i in onnx.load(str(
            exported["bundle"] / record["files"]["fp32"])).graph.input]  # what the runtime feeds
        if key == "fused.fp32":
            assert {op: ops[op] for op in record["fused"]["ops"]} == record["fused"]["ops"]
    plain = onnx.load(str(exported["bundle"] / record["files"]["fp32"]))
    assert not [n for n in plain.graph.node if n.domain == "com.microsoft"]
    for key, bound in (("onnx_fused_fp32", FP32), ("onnx_fused_fp16", FP16)):
        assert record["parity"][key]["min_cosine"] >= bound["min_cosine"]
    cpu = record["fused"]["latency_ms"]["CPUExecutionProvider"]
    assert set(cpu) == {"fp32", "fp16", "int8"} and all(set(v) == {"plain", "fused"}
                                                        for v in cpu.values())
    preferred = record["fused"]["preferred"]["CPUExecutionProvider"]
    assert preferred == {p: min(ms, key=ms.get) for p, ms in cpu.items()}


def test_fused_graphs_match_transformers_clip(exported: dict[str, Path]) -> None:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(exported["clip"]).eval()
    bundle = Bundle(exported["bundle"], "cpu")
    pixels = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    towers = ClipTowers(exported["clip"])
    fields = [{"title": "soft toy", "brand": "Acme"}, {"description": "word " * 200}, {}]
    tokens = towers.tokenize([v for f in fields for v in ViewSpec().build(f)])
    with torch.no_grad():
        ref_image = model.get_image_features(pixel_values=pixels)
        ref_views = model.get_text_features(input_ids=torch.from_numpy(tokens.input_ids),
                                            attention_mask=torch.from_numpy(tokens.attention_mask))
    ref_image = getattr(ref_image, "pooler_output", ref_image).numpy()
    ref_views = getattr(ref_views, "pooler_output", ref_views).numpy().reshape(3, 5, -1)
    feeds = dict(input_ids=tokens.input_ids.reshape(3, 5, -1),
                 attention_mask=tokens.attention_mask.reshape(3, 5, -1),
                 image_embedding=ref_image[:3], has_image=np.array([True, False, True]),
                 has_text=np.array([True, True, False]))
    plain = bundle.graph("text_fusion", "fp32")(**feeds)
    for precision, bound in (("fp32", FP32), ("fp16", FP16)):
        image = bundle.graph("image_encoder", precision, "fused")(pixel_values=pixels.numpy())[0]
        assert_parity(ref_image, image, bound)
        fused = bundle.graph("text_fusion", precision, "fused")(**feeds)
        assert_parity(ref_views, fused[3], bound)
        for want, got in zip(plain, fused):  # the fusion head, as the plain graph computes it
            assert_parity(want, got, bound)


def test_optimizer_that_fuses_no_attention_fails_the_export(exported: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """The plain graph comes from SDPA attention, which the optimizer silently leaves alone."""
    config = clip_config(exported)["vision_config"]
    layers = config["num_hidden_layers"]
    with pytest.raises(ExportError, match=f"fused 0 of {layers} attention layers"):
        optimize_clip(exported["bundle"] / "image_encoder.onnx", tmp_path / "x.onnx", layers,
                      config["num_attention_heads"], config["hidden_size"])
    assert not (tmp_path / "x.onnx").exists()


def test_causal_form_needs_the_graphs_one_mask(exported: dict[str, Path], tmp_path: Path
                                              ) -> None:
    """A ViT has no causal mask to drop: asking the causal form of it fails the export."""
    config = clip_config(exported)["vision_config"]
    towers = ClipTowers(exported["clip"], attn_implementation="eager")
    eager = tmp_path / "eager.onnx"
    export_onnx(GraphSpec("image", towers.image_tower, (torch.randn(2, 3, 32, 32),),
                          (torch.randn(3, 3, 32, 32),), ["pixel_values"], ["image_embedding"]),
                eager)
    with pytest.raises(ExportError, match="causal form needs every fused Attention"):
        optimize_clip(eager, tmp_path / "x.onnx", config["num_hidden_layers"],
                      config["num_attention_heads"], config["hidden_size"], causal=True)
    assert not (tmp_path / "x.onnx").exists()


def test_causal_form_only_where_it_keeps_the_outputs(exported: dict[str, Path]) -> None:
    """The fused text graph drops the padding mask only where the module's outputs stay the
    masked ones on padded views; a twin whose outputs move (here: another tau) keeps the mask."""
    towers = ClipTowers(exported["clip"], attn_implementation="eager")
    tokens = towers.tokenize([v for f in ({"title": "a"}, {"description": "word " * 9})
                              for v in ViewSpec().build(f)])
    assert (tokens.attention_mask == 0).any()  # padded views
    sample = (torch.from_numpy(tokens.input_ids).reshape(2, 5, -1),
              torch.from_numpy(tokens.attention_mask).reshape(2, 5, -1),
              torch.randn(2, towers.dim), torch.tensor([True, False]), torch.tensor([True, True]))
    causal = towers.view_encoder(ViewFusion("sa", 0.1), padding_mask=False)
    assert causal_if_exact(causal, towers.view_encoder(ViewFusion("sa", 0.1)), sample) is causal
    other = towers.view_encoder(ViewFusion("sa", 0.2))
    assert causal_if_exact(causal, other, sample) is other


@pytest.mark.parametrize("record, provider, precision, requested, expected", [
    ({"files": {"fp32": "a.onnx"}}, "CPUExecutionProvider", "fp32", "auto", "plain"),
    ({"files": {"fp32": "a", "fused.fp32": "b"},
      "fused": {"preferred": {"CPUExecutionProvider": {"fp32": "plain"}}}},
     "CPUExecutionProvider", "fp32", "auto", "plain"),
    ({"files": {"fp32": "a", "fused.fp32": "b", "fp16": "c", "fused.fp16": "d"},
      "fused": {"preferred": {"CPUExecutionProvider": {"fp32": "plain", "fp16": "fused"}}}},
     "CPUExecutionProvider", "fp16", "auto", "fused"),
    ({"files": {"fp32": "a", "fused.fp32": "b"},
      "fused": {"preferred": {"CPUExecutionProvider": {"fp32": "plain"}}}},
     "CUDAExecutionProvider", "fp32", "auto", "fused"),
    ({"files": {"fp32": "a", "fused.fp32": "b"},
      "fused": {"preferred": {"CPUExecutionProvider": {"fp32": "fused"}}}},
     "CPUExecutionProvider", "fp32", "plain", "plain"),
])
def test_runtime_picks_the_variant(record: dict, provider: str, precision: str, requested: str,
                                   expected: str) -> None:
    assert pick_variant(record, provider, precision, requested) == expected


def test_encoder_follows_the_manifest_and_can_be_overridden(exported: dict[str, Path]) -> None:
    bundle = Bundle(exported["bundle"], "cpu")
    graphs = bundle.manifest["graphs"]
    encoder = OnnxEncoder(bundle, "fp32")
    assert encoder.variants == {
        name: graphs[name]["fused"]["preferred"]["CPUExecutionProvider"]["fp32"]
        for name in TOWERS}
    forced = OnnxEncoder(bundle, "fp16", variant="fused")
    assert forced.image_graph.path.name == "image_encoder.fused.fp16.onnx"
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert_parity(encoder.encode_images(pixels), forced.encode_images(pixels), FP16)
    with pytest.raises(BundleError, match="variant must be auto"):
        OnnxEncoder(bundle, variant="fast")


def test_bundle_without_fused_graphs_still_loads(exported: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """A bundle written before the fused graphs (and the int8 ones) existed runs its plain
    graphs."""
    old = tmp_path / "bundle"
    shutil.copytree(exported["bundle"], old)
    data = manifest(old)
    for record in data["graphs"].values():
        record.pop("fused", None)
        record.pop("int8", None)
        for key in [k for k in record["files"] if k.startswith("fused.") or "int8" in k]:
            name = record["files"].pop(key)
            (old / name).unlink()
            del data["files"][name]
    rewrite_manifest(old, data)
    assert {p.name for p in old.iterdir()} - {"manifest.json"} == set(data["files"])
    assert all(sha256_file(old / n) == d for n, d in data["files"].items())
    encoder = OnnxEncoder(Bundle(old, "cpu"))
    assert encoder.variants == {name: "plain" for name in TOWERS}
    pixels = np.zeros((1, 3, 32, 32), np.float32)
    assert encoder.encode_images(pixels).shape == (1, 32)
    with pytest.raises(BundleError, match="no fused.fp32 variant of image_encoder"):
        OnnxEncoder(Bundle(old, "cpu"), variant="fused")
