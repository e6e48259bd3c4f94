"""int8 CLIP graphs and the runtime's precision and thread settings: the int8 twins against
PyTorch within the stated bound, ``auto`` following the measured latency, a precision the bundle
lacks refused through the CLI and the API, and thread counts reaching ONNX Runtime's sessions."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from cliper_prod.bundle_format import read_manifest
from cliper_prod.commands import cli
from cliper_prod.errors import BundleError
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.runtime.bundle_reader import Bundle, pick_precision
from cliper_prod.runtime.encoder import OnnxEncoder
from cliper_prod.runtime.recommender import Recommender
from cliper_prod.runtime.sessions import OrtThreads, cores_per_worker
from tests.conftest import rewrite_manifest
from tests.test_export import INT8, assert_parity

CPU = "CPUExecutionProvider"
TOWERS = ("image_encoder", "text_fusion")


@pytest.mark.parametrize("name", TOWERS)
def test_int8_twins_are_quantised_recorded_and_timed(exported: dict[str, Path],
                                                     name: str) -> None:
    record = read_manifest(exported["bundle"])["graphs"][name]
    int8 = record["int8"]
    assert int8["written"] and int8["bound"] == INT8 and int8["per_channel"]
    for key in ("int8", "fused.int8"):
        graph = onnx.load(str(exported["bundle"] / record["files"][key]))
        ops = Counter(n.op_type for n in graph.graph.node)
        assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] > 0, ops
        assert record["parity"][f"onnx_{key.replace('.', '_')}"]["min_cosine"] >= 0.99
    latency = int8["latency_ms"][CPU]
    assert set(latency) == {"plain", "fused"}
    assert int8["preferred"][CPU] == {v: min(ms, key=ms.get) for v, ms in latency.items()}


def test_int8_image_graph_against_pytorch(exported: dict[str, Path]) -> None:
    """Fresh pixels, not the export's parity batch: the int8 tower within cosine 0.99 of the
    PyTorch fp32 tower."""
    towers = ClipTowers(exported["clip"])
    pixels = np.random.default_rng(7).standard_normal((8, 3, 32, 32)).astype(np.float32)
    reference = towers.encode_images(pixels)
    encoder = OnnxEncoder(Bundle(exported["bundle"], "cpu"), "int8", variant="plain")
    assert encoder.image_graph.path.name == "image_encoder.int8.onnx"
    got = encoder.encode_images(pixels)
    assert_parity(reference, got, INT8)
    assert not np.allclose(got, reference, atol=1e-6)  # it really is another graph


def test_auto_precision_follows_the_measured_latency() -> None:
    record = {"files": {"fp32": "a", "int8": "b", "fused.fp32": "c", "fused.int8": "d"},
              "fused": {"preferred": {CPU: {"fp32": "plain", "int8": "plain"}}},
              "int8": {"preferred": {CPU: {"plain": "int8", "fused": "fp32"}}}}
    assert pick_precision(record, CPU) == "int8"
    record["fused"]["preferred"][CPU]["fp32"] = "fused"  # int8 measured slower than fused fp32
    assert pick_precision(record, CPU) == "fp32"
    assert pick_precision(record, "CUDAExecutionProvider") == "fp32"  # not measured there
    assert pick_precision({"files": {"fp32": "a"}}, CPU) == "fp32"  # a bundle before int8
    assert pick_precision(record, CPU, "int8") == "int8"
    with pytest.raises(BundleError, match="precision must be"):
        pick_precision(record, CPU, "int4")


def with_preference(bundle: Path, out: Path, precision: str) -> Path:
    """A copy of ``bundle`` whose manifest says ``precision`` measured faster on the CPU."""
    shutil.copytree(bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    for name in TOWERS:
        data["graphs"][name]["int8"]["preferred"][CPU] = {"plain": precision,
                                                          "fused": precision}
    rewrite_manifest(out, data)
    return out


def test_auto_runs_int8_only_where_recorded_faster(exported: dict[str, Path],
                                                   tmp_path: Path) -> None:
    for precision in ("int8", "fp32"):
        folder = with_preference(exported["bundle"], tmp_path / precision, precision)
        encoder = OnnxEncoder(Bundle(folder, "cpu"))
        assert encoder.precisions == {name: precision for name in TOWERS}
        assert f", {precision}, " in encoder.source
        assert encoder.image_graph.path.name.endswith(f"{precision}.onnx".replace(
            "fp32.onnx", "onnx"))


def without_int8(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` as exported with --no-int8 (or before int8 graphs existed)."""
    shutil.copytree(bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    for name in TOWERS:
        record = data["graphs"][name]
        record.pop("int8")
        for measured in ("preferred", "latency_ms"):
            record["fused"][measured][CPU].pop("int8")
        for key in [k for k in record["files"] if k.endswith("int8")]:
            name = record["files"].pop(key)
            del record["parity"][f"onnx_{key.replace('.', '_')}"]
            (out / name).unlink()
            del data["files"][name]
    rewrite_manifest(out, data)
    return out


def test_a_precision_the_bundle_lacks_is_refused(exported: dict[str, Path],
                                                 tmp_path: Path) -> None:
    old = without_int8(exported["bundle"], tmp_path / "old")
    items = exported["catalog"] / "items.jsonl"
    runner = CliRunner()
    res = runner.invoke(cli, ["embed", str(items), "--bundle", str(old), "--out",
                              str(tmp_path / "f"), "--precision", "int8", "--quiet"])
    assert res.exit_code == 7, res.output
    assert "no int8 variant of image_encoder" in res.output and "--no-int8" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli, ["serve", "--bundle", str(old), "--precision", "int8"])
    assert res.exit_code == 7 and "no int8 variant" in res.output, res.output
    with pytest.raises(BundleError, match="no int8 variant of image_encoder"):
        Recommender(old, provider="cpu", precision="int8")
    assert Recommender(old, provider="cpu").embedder.encoder.precisions == {
        name: "fp32" for name in TOWERS}  # auto on a bundle without int8


def test_embed_cli_runs_the_int8_graphs(exported: dict[str, Path], tmp_path: Path) -> None:
    items = exported["catalog"] / "items.jsonl"
    feats = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / precision
        res = CliRunner().invoke(cli, ["embed", str(items), "--bundle", str(exported["bundle"]),
                                       "--out", str(out), "--precision", precision,
                                       "--intra-op-threads", "1", "--quiet"])
        assert res.exit_code == 0, res.output
        summary = json.loads((out / "embed_summary.json").read_text())
        assert f", {precision}, " in summary["clip"]
        feats[precision] = {f: np.load(out / f) for f in ("image_feat.npy", "text_feat.npy")}
    for name, fp32 in feats["fp32"].items():
        assert_parity(fp32, feats["int8"][name], INT8)
        assert not np.array_equal(fp32, feats["int8"][name])
    res = CliRunner().invoke(cli, ["embed", str(items), "--clip", str(exported["clip"]),
                                   "--out", str(tmp_path / "c"), "--precision", "int8"])
    assert res.exit_code == 2 and "--precision: for --bundle" in res.output, res.output


def options_of(graph) -> tuple[int, int, str]:
    opts = graph.session.get_session_options()
    return opts.intra_op_num_threads, opts.inter_op_num_threads, str(opts.execution_mode)


def test_thread_settings_reach_every_session(exported: dict[str, Path]) -> None:
    rec = Recommender(exported["bundle"], provider="cpu", intra_op_threads=1,
                      inter_op_threads=2)
    encoder = rec.embedder.encoder
    for graph in (rec.ranker.graph.forms["plain"], encoder.image_graph, encoder.text_graph):
        assert options_of(graph) == (1, 2, str(ort.ExecutionMode.ORT_PARALLEL))
    default = Bundle(exported["bundle"], "cpu").graph("topk")
    assert options_of(default) == (0, 0, str(ort.ExecutionMode.ORT_SEQUENTIAL))
    with pytest.raises(Exception, match="thread counts"):
        OrtThreads(-1)


def test_serve_gives_each_local_worker_a_share_of_the_cores(exported: dict[str, Path],
                                                            monkeypatch) -> None:
    """serve --workers N: cores // N intra-op threads each unless given; the settings each
    worker builds its Service (and so its sessions) from."""
    import cliper_prod.serving.local_engine as local_engine
    from cliper_prod.serving.service import ServeSettings

    seen: list[ServeSettings] = []

    class Recorder:
        def __init__(self, settings: ServeSettings, **kwargs) -> None:
            seen.append(settings)

        def start(self, timeout: float):
            raise SystemExit(0)

        def stop(self) -> None:
            pass

    monkeypatch.setattr(local_engine, "LocalServer", Recorder)
    cores = len(__import__("os").sched_getaffinity(0))
    for extra, intra, inter in ((["--workers", "2"], max(1, cores // 2), 0),
                                ([], 0, 0),
                                (["--workers", "2", "--intra-op-threads", "3",
                                  "--inter-op-threads", "2", "--precision", "int8"], 3, 2)):
        CliRunner().invoke(cli, ["serve", "--bundle", str(exported["bundle"]), *extra])
        assert (seen[-1].intra_op_threads, seen[-1].inter_op_threads) == (intra, inter), extra
    assert seen[-1].precision == "int8"
    assert cores_per_worker(1) == 0 and cores_per_worker(10 * cores) == 1


@pytest.mark.parametrize("bound, written", [(0.99, True), (1.01, False)])
def test_an_int8_twin_missing_its_bound_is_left_out(tmp_path: Path, monkeypatch,
                                                    bound: float, written: bool) -> None:
    """A small MLP through export_graph: int8 kept within the bound, deleted (and recorded as
    missed, the fp32 graph kept) past it."""
    import torch

    import cliper_prod.export.verified_graph as verified_graph
    from cliper_prod.export.graphs import GraphSpec
    from cliper_prod.export.verified_graph import GraphOptions, export_graph

    monkeypatch.setattr(verified_graph, "INT8_BOUND", {"min_cosine": bound, "max_abs": None})
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                 torch.nn.Linear(64, 16)).eval()
    x = torch.randn(8, 32)
    spec = GraphSpec("mlp", module, (x[:2],), (x,), ["x"], ["y"])
    record = export_graph(spec, tmp_path, GraphOptions(torchscript=False), fp16=False,
                          int8=True)
    assert record["int8"]["written"] is written
    assert ("int8" in record["files"]) is written
    assert (tmp_path / "mlp.int8.onnx").exists() is written
    assert (tmp_path / "mlp.onnx").exists() and "fp32" in record["files"]
    if written:
        got = ort.InferenceSession(str(tmp_path / "mlp.int8.onnx")).run(None, {"x": x.numpy()})
        assert_parity(module(x).detach().numpy(), got[0], INT8)
        assert set(record["int8"]["preferred"][CPU]) == {"plain"}
    else:
        assert record["int8"]["missed"]["plain"]["min_cosine"] < 1.01
        assert "onnx_int8" not in record["parity"]
