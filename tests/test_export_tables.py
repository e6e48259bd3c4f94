"""A bundle straight from embedding tables: exported, verified, ranked like naive numpy; the
top-K graph's two forms, the runtime's choice between them, bundles without the GPU form."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cliper_prod.bundle_format import GPU_FORM, PLAIN, TOPK_GRAPH
from cliper_prod.export.bundle_writer import EmbeddingTables, GraphOptions, export_tables
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.ranking import TopKRanker
from cliper_prod.runtime.recommender import Recommender
from cliper_prod.runtime.topk_forms import TopKGraph, pick_topk_form


def test_tables_bundle_ranks_like_naive_numpy_over_several_chunks(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    users, items = torch.randn(30, 6, generator=gen), torch.randn(500, 6, generator=gen)
    rng = np.random.default_rng(5)
    train = np.unique(np.stack([rng.integers(0, 30, 400), rng.integers(0, 500, 400)], 1), axis=0)
    item_ids = [f"i{n}" for n in range(500)]
    tables = EmbeddingTables(users, items, train, [f"u{n}" for n in range(30)], item_ids)
    manifest = export_tables(tables, tmp_path / "b", options=GraphOptions(
        max_k=15, chunk_items=64, torchscript=False, fp16=False, fused=False))
    assert manifest["graphs"]["topk"]["chunk_items"] == 64 and manifest["features"] is None
    got = Recommender(tmp_path / "b", provider="cpu").topk([f"u{n}" for n in range(30)], k=15)
    scores = users.numpy() @ items.numpy().T
    scores[train[:, 0], train[:, 1]] = -np.inf
    for u, rec in enumerate(got):
        assert rec["items"] == [item_ids[i] for i in np.argsort(-scores[u], kind="stable")[:15]]


def _tables(seed: int = 5, n_users: int = 30, n_items: int = 500):
    gen = torch.Generator().manual_seed(seed)
    users, items = torch.randn(n_users, 6, generator=gen), torch.randn(n_items, 6, generator=gen)
    rng = np.random.default_rng(seed)
    train = np.unique(np.stack([rng.integers(0, n_users, 400), rng.integers(0, n_items, 400)],
                               1), axis=0)
    return EmbeddingTables(users, items, train, [f"u{n}" for n in range(n_users)],
                           [f"i{n}" for n in range(n_items)])


def _naive(tables: EmbeddingTables, k: int) -> tuple[list[list[str]], np.ndarray]:
    scores = tables.users.double().numpy() @ tables.items.double().numpy().T
    scores[tables.train[:, 0], tables.train[:, 1]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ([[tables.item_ids[i] for i in row] for row in order],
            np.take_along_axis(scores, order, 1))


OPTIONS = GraphOptions(max_k=15, chunk_items=64, torchscript=False, fp16=False, fused=False)


def test_the_gpu_form_is_written_verified_timed_and_ranks_as_naive_numpy(tmp_path: Path) -> None:
    tables = _tables()
    manifest = export_tables(tables, tmp_path / "b", options=replace(OPTIONS, candidates=40))
    topk = manifest["graphs"][TOPK_GRAPH]
    assert topk["files"] == {"fp32": "topk.onnx", "gpu.fp32": "topk.gpu.onnx"}
    assert {"topk.gpu.onnx", "topk.gpu.onnx.data"} <= set(manifest["files"])  # hashed
    gpu = topk[GPU_FORM]
    assert (gpu["candidates"], gpu["candidates_option"], gpu["blocks"], gpu["external_data"]) == (
        40, 40, 1, "topk.gpu.onnx.data")
    assert set(gpu["latency_ms"]["CPUExecutionProvider"]) == {"1", "8", "30"}
    assert gpu["cpu_max_batch"] in (0, 1, 8, 30) and topk["parity"]["onnx_gpu_fp32"]
    expected, scores = _naive(tables, 15)
    kept = _naive(replace(tables, train=np.concatenate(  # `exclude`: i3 and i7 for everybody
        [tables.train, [(u, i) for u in range(30) for i in (3, 7)]])), 5)[0]
    bundle = Bundle(tmp_path / "b", "cpu")
    for form in (PLAIN, GPU_FORM):
        ranker = TopKRanker(bundle)
        ranker.graph = TopKGraph(bundle, form)
        top = ranker.rank(np.arange(30))
        got = ranker.answer(tables.user_ids, top, 15, set())
        assert [r["items"] for r in got] == expected
        np.testing.assert_allclose([r["scores"] for r in got], scores, rtol=1e-5, atol=1e-6)
        excluded = ranker.exclusions(["i3", "i7"], 5)
        assert [r["items"] for r in ranker.answer(tables.user_ids, top, 5, excluded)] == kept


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_the_runtime_picks_the_form_per_provider_and_batch(tmp_path: Path) -> None:
    export_tables(_tables(), tmp_path / "b", options=OPTIONS)
    record = {"files": {"fp32": "topk.onnx", "gpu.fp32": "topk.gpu.onnx"},
              GPU_FORM: {"cpu_max_batch": 4}}
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    assert [pick_topk_form(record, cpu, b) for b in (1, 4, 5)] == [GPU_FORM, GPU_FORM, PLAIN]
    assert pick_topk_form(record, cuda, 1 << 20) == GPU_FORM
    assert pick_topk_form({"files": {"fp32": "topk.onnx"}}, cuda, 1) == PLAIN  # an old bundle
    # on the CPU, both forms behind one call: a user's answer does not show which one ran
    bundle = Bundle(tmp_path / "b", "cpu")
    bundle.manifest["graphs"][TOPK_GRAPH][GPU_FORM]["cpu_max_batch"] = 4
    rec = Recommender(bundle)
    assert set(rec.ranker.graph.forms) == {PLAIN, GPU_FORM}
    users = [f"u{n}" for n in range(30)]
    assert [rec.topk([u], k=15)[0] for u in users] == rec.topk(users, k=15)
    # "CUDA" (here ONNX Runtime falls back to the CPU): the GPU form only, in runs of rows
    bundle.providers = [cuda, cpu]
    graph = TopKGraph(bundle)
    assert set(graph.forms) == {GPU_FORM}
    graph.rows_per_run = 7
    rec.ranker.graph = graph
    assert rec.topk(users, k=15) == [rec.topk([u], k=15)[0] for u in users]
    assert [r["items"] for r in rec.topk(users, k=15)] == _naive(_tables(), 15)[0]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_bundles_without_the_gpu_form_still_serve(tmp_path: Path) -> None:
    """Exported without it, or written before it (format 2: its files and record taken out of a
    new bundle's manifest, which then has no self-hash): the CPU form ranks every batch on every
    provider."""
    tables = _tables()
    export_tables(tables, tmp_path / "off", options=replace(OPTIONS, gpu_form=False))
    export_tables(tables, tmp_path / "old", options=OPTIONS)
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["graphs"][TOPK_GRAPH][GPU_FORM], manifest["graphs"][TOPK_GRAPH]["files"][
        "gpu.fp32"], manifest["graphs"][TOPK_GRAPH]["parity"]["onnx_gpu_fp32"]
    for name in ("topk.gpu.onnx", "topk.gpu.onnx.data"):
        del manifest["files"][name]
        (tmp_path / "old" / name).unlink()
    del manifest["manifest_sha256"]  # as format 2 wrote it, before the manifest hashed itself
    manifest["format_version"] = 2
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    expected = _naive(tables, 15)[0]
    for name in ("off", "old"):
        assert not (tmp_path / name / "topk.gpu.onnx").exists()
        bundle = Bundle(tmp_path / name, "cpu")
        bundle.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        rec = Recommender(bundle)
        assert set(rec.ranker.graph.forms) == {PLAIN}
        assert [r["items"] for r in rec.topk(tables.user_ids, k=15)] == expected
