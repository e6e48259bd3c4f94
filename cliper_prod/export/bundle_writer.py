"""A trained checkpoint (+ its CLIP feature encoder) -> a self-contained, verified bundle.

Contents (see export/README.md for the format):
  topk.onnx / topk.pt                users [B] -> items [B, K], scores [B, K], training items out
  topk.gpu.onnx                      the same graph's GPU form (fp16 candidates, fp32 re-score)
  user_embeddings.npy, item_embeddings.npy, user_ids.txt, item_ids.txt
  image_encoder[.fp16].onnx / .pt    pixel_values [B, 3, H, W] -> image embedding [B, D]
  text_fusion[.fp16].onnx / .pt      views [B, V, L] + image embedding -> fused text, similarity,
                                     image feature, view embeddings
  <clip graph>.fused[.fp16].onnx     the same, rewritten by ONNX Runtime's transformer optimizer
  <clip graph>[.fused].int8.onnx     the same, dynamically quantised to int8 (MatMul weights)
  image_encoder.uint8[.fused][.fp16|.int8].onnx  each image graph taking uint8 pixels
                                     [B, 3, H, W], normalised inside the graph (export/pixels.py)
  tokenizer.json                     the CLIP tokenizer (read by the `tokenizers` library)
  manifest.json                      versions, IO specs, view settings, hashes, parity figures
Each graph is written and verified by :func:`~.verified_graph.export_graph`, the CLIP graphs by
:mod:`~.feature_graphs`. The bundle is built in a temporary sibling folder, verified, and only then renamed into place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from itertools import takewhile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cliper_prod.backbones.cold_student import StudentConfig
from cliper_prod.bundle_format import GPU_FORM, PLAIN, TOPK_GRAPH, graph_file
from cliper_prod.checkpoint import load_model
from cliper_prod.errors import CheckpointError
from cliper_prod.export.bundle_files import (Extension, FeatureGraphs, ServedTables,
                                             copied_feature_graphs, write_atomically,
                                             write_bundle_files)
from cliper_prod.export.feature_graphs import export_features, feature_settings
from cliper_prod.export.graphs import GraphSpec, export_onnx, feeds, torch_outputs
from cliper_prod.export.parity import same_topk
from cliper_prod.export.student_fit import fit_student
from cliper_prod.export.verified_graph import (CPU, GraphOptions, export_graph, preference,
                                               verified_onnx)
from cliper_prod.fold_in_state import FoldInState
from cliper_prod.histories import history_pairs, training_csr
from cliper_prod.progress import Progress, progress_bar
from cliper_prod.scoring import CandidateTopKScorer, TopKScorer
from cliper_prod.student_format import StudentState

log = logging.getLogger(__name__)

TOPK_INPUTS = ("queries", "exclude_rows", "exclude_items")


def topk_spec(scorer: TopKScorer | CandidateTopKScorer,
              check: tuple[torch.Tensor, ...] | None = None) -> GraphSpec:
    """How a top-K scorer (either form) is exported: traced on two queries and three
    exclusion pairs (batch and pair counts dynamic, neither 0 nor 1 so neither is
    specialised), the item table as external data, the TorchScript twin scripted so its chunk
    loop stays a loop; compared on ``check`` (default: the trace inputs)."""
    sample = (torch.zeros(2, scorer.dim), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))
    return GraphSpec(TOPK_GRAPH, scorer, sample, check or sample, TOPK_INPUTS,
                     ["items", "scores"], dims=["batch", "pairs", "pairs"],
                     external_data=True, script=True)


def _topk_graph(users: torch.Tensor, items: torch.Tensor, train: np.ndarray, max_k: int,
                chunk_items: int
                ) -> tuple[GraphSpec, dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """The top-K graph's spec (checked on 64 users with their training items), its manifest
    record and the training CSR tables the runtime feeds it from."""
    n_users, n_items = len(users), len(items)
    indptr, history = training_csr(train, n_users)
    scorer = TopKScorer(items, max_k, chunk_items).eval()
    rng = np.random.default_rng(0)
    check = rng.choice(n_users, size=min(64, n_users), replace=False)
    rows, seen = (torch.from_numpy(a) for a in history_pairs(indptr, history, check))
    spec = topk_spec(scorer, (users[check], rows, seen))
    info = {"k": scorer.k, "n_users": n_users, "n_items": n_items,
            "dim": int(users.shape[1]), "score": "dot", "excludes": "training items",
            "chunk_items": scorer.chunk}
    return spec, info, (indptr, history)


def _export_gpu_form(cpu: GraphSpec, items: torch.Tensor, folder: Path, options: GraphOptions,
                     reference: list[np.ndarray], record: dict[str, Any]) -> None:
    """The top-K graph's GPU form, written beside the CPU form (``cpu``, listed in ``record``)
    and verified against the CPU form's PyTorch answer (``reference``): the same items
    wherever the scores are not tied, so a candidate set that misses an item on the check
    users fails the export. Timed against the CPU form on the CPU provider (one session each)
    at 1, 8 and all the check users: ``cpu_max_batch`` is the largest of those sizes up to which
    it was faster at every size (0: never), which the runtime reads on the CPU."""
    import onnxruntime as ort

    scorer = CandidateTopKScorer(items, options.max_k, options.candidates,
                                 options.candidate_blocks).eval()
    spec = topk_spec(scorer, cpu.check)
    path = folder / graph_file(TOPK_GRAPH, variant=GPU_FORM)
    export_onnx(spec, path, options.opset)
    verified_onnx(spec, path, GPU_FORM, reference, False, same_topk(*reference), record)
    queries, rows, seen = cpu.check
    batches = {size: replace(cpu, check=(queries[:size], rows[rows < size], seen[rows < size]))
               for size in sorted({1, min(8, len(queries)), len(queries)})}
    sessions = {form: ort.InferenceSession(str(file), providers=[CPU])
                for form, file in ((PLAIN, folder / graph_file(TOPK_GRAPH)), (GPU_FORM, path))}
    measured = preference({form: {str(size): partial(session.run, None, feeds(batch))
                                  for size, batch in batches.items()}
                           for form, session in sessions.items()})
    preferred = measured["preferred"][CPU]
    record[GPU_FORM] = {"candidates": scorer.candidates, "candidates_option": options.candidates,
                        "blocks": scorer.blocks, "blocks_option": options.candidate_blocks,
                        "coarse": "fp16", "external_data": f"{path.name}.data", **measured,
                        "cpu_max_batch": max(takewhile(lambda size: preferred[str(size)] ==
                                                       GPU_FORM, sorted(batches)), default=0)}


def export_bundle(checkpoint: Path, *, backbone: str, out: Path, clip_source: str | None = None,
                  random_init: bool = False, data_dir: Path | None = None,
                  options: GraphOptions = GraphOptions(), progress: bool = False,
                  student: StudentConfig | None = None) -> dict[str, Any]:
    """Write the bundle for ``checkpoint`` to ``out`` (replacing it atomically).

    ``clip_source`` overrides the CLIP checkpoint the model's features were embedded with (``None``
    with vanilla features: no feature graphs); ``data_dir`` is the training data if it moved;
    ``student``: train the cold-start student with these settings and store it.
    """
    model, data, payload = load_model(checkpoint, data_dir)
    if payload["backbone"] != backbone:
        raise CheckpointError(f"{checkpoint}: holds a {payload['backbone']} model, not "
                              f"{backbone}; pass --backbone {payload['backbone']}")
    model.eval()
    settings = feature_settings(data.features_dir, clip_source, random_init)
    tables = EmbeddingTables(*model.embedding_tables(), data.train, data.user_ids, data.item_ids)
    fold_in = model.fold_in_state(data)
    state = None if student is None else fit_student(
        tables.users.numpy(), tables.items.numpy(), data.train, data.features, fold_in,
        backbone, student)
    return write_atomically(out, lambda folder: _build(
        folder, tables, options, payload["backbone"], data.name,
        features=lambda: export_features(settings, folder, options) if settings else None,
        fold_in=fold_in, student=state, progress=progress))


@dataclass(frozen=True)
class EmbeddingTables:
    """What a bundle serves: score(u, i) = users[u] . items[i], each user's training items
    (``train``: (user, item) rows) excluded; ids default to the row numbers."""

    users: torch.Tensor
    items: torch.Tensor
    train: np.ndarray
    user_ids: Sequence[str] | None = None
    item_ids: Sequence[str] | None = None


def export_tables(tables: EmbeddingTables, out: Path, *, backbone: str | None = None,
                  dataset: str | None = None, options: GraphOptions = GraphOptions()
                  ) -> dict[str, Any]:
    """A top-K bundle (no feature graphs) straight from embedding tables, no checkpoint: for
    tables trained elsewhere, and for catalogs too large to train here (benchmarks)."""
    return write_atomically(out, lambda folder: _build(folder, tables, options, backbone,
                                                        dataset))


def extend_with_torch(extension: Extension, out: Path, progress: bool = False
                      ) -> dict[str, Any]:
    """``extension`` written to ``out`` as :func:`export_bundle` writes a bundle: the top-K
    graph re-exported in the source's forms (the GPU form, its candidate count and the
    TorchScript twin only if the source has them) and verified against PyTorch."""
    manifest, topk = extension.manifest, extension.manifest["graphs"][TOPK_GRAPH]
    tables = extension.tables
    counts = np.diff(tables.history_indptr)
    train = np.stack([np.repeat(np.arange(len(counts)), counts),
                      tables.history_items.astype(np.int64)], 1)
    embedding = EmbeddingTables(torch.from_numpy(tables.users), torch.from_numpy(tables.items),
                                train, tables.user_ids, tables.item_ids)
    options = GraphOptions(max_k=topk["k"], chunk_items=topk["chunk_items"],
                           opset=manifest["opset"], torchscript="torchscript" in topk["files"],
                           gpu_form=GPU_FORM in topk,
                           candidates=topk.get(GPU_FORM, {}).get("candidates_option"),
                           candidate_blocks=topk.get(GPU_FORM, {}).get("blocks_option", 1))
    return write_atomically(out, lambda folder: _build(
        folder, embedding, options, manifest["backbone"], manifest["dataset"],
        features=lambda: copied_feature_graphs(extension.source, manifest, folder),
        fold_in=extension.fold_in, lineage=extension.lineage, student=extension.student,
        progress=progress))


def _build(folder: Path, tables: EmbeddingTables, options: GraphOptions, backbone: str | None,
           dataset: str | None, *, features: FeatureGraphs = lambda: None,
           fold_in: FoldInState | None = None, lineage: dict[str, Any] | None = None,
           student: StudentState | None = None, progress: bool = False) -> dict[str, Any]:
    """Write every file of a bundle into ``folder``: the top-K graph and tables, the CLIP graphs
    ``features`` writes (their records and the feature settings, or None), the fold-in arrays,
    the cold-start student's, then the manifest; ``progress`` reports these steps."""
    with progress_bar(desc="export", unit="step", total=3 + options.gpu_form,
                      enabled=progress) as bar:
        return _build_steps(folder, tables, options, backbone, dataset, features, fold_in,
                            lineage, student, bar)


def _build_steps(folder: Path, tables: EmbeddingTables, options: GraphOptions,
                 backbone: str | None, dataset: str | None, features: FeatureGraphs,
                 fold_in: FoldInState | None, lineage: dict[str, Any] | None,
                 student: StudentState | None, bar: Progress) -> dict[str, Any]:
    """:func:`_build`'s steps, each counted on ``bar`` when done."""
    graphs: dict[str, Any] = {}
    users, items = (t.detach().float().contiguous() for t in (tables.users, tables.items))
    spec, topk_info, (indptr, history) = _topk_graph(users, items, tables.train, options.max_k,
                                                     options.chunk_items)
    ref_items, ref_scores = torch_outputs(spec)
    log.info("exporting %s (%d users x %d items, K=%d)", spec.name, len(users), len(items),
             topk_info["k"])
    graphs[spec.name] = {**export_graph(spec, folder, options, fp16=False,
                                         extra_check=same_topk(ref_items, ref_scores)),
                         **topk_info}
    bar.update(1)
    if options.gpu_form:
        _export_gpu_form(spec, items, folder, options, [ref_items, ref_scores],
                         graphs[spec.name])
        bar.update(1)
    return write_bundle_files(folder, graphs, ServedTables(
        users.numpy(), items.numpy(), indptr, history, tables.user_ids, tables.item_ids),
        options.opset, backbone, dataset, features=features, fold_in=fold_in, lineage=lineage,
        student=student, bar=bar)
