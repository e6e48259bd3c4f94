"""A trained checkpoint (+ its CLIP feature encoder) -> a self-contained, verified bundle.

Contents (see export/README.md for the format):
  topk.onnx / topk.pt                users [B] -> items [B, K], scores [B, K], training items out
  topk.gpu.onnx                      the same graph's GPU form (fp16 candidates, fp32 re-score)
  user_embeddings.npy, item_embeddings.npy, user_ids.txt, item_ids.txt
  image_encoder[.fp16].onnx / .pt    pixel_values [B, 3, H, W] -> image embedding [B, D]
  text_fusion[.fp16].onnx / .pt      views [B, V, L] + image embedding -> fused text, similarity,
                                     image feature, view embeddings
  <clip graph>.fused[.fp16].onnx     the same, rewritten by ONNX Runtime's transformer optimizer
  image_encoder.uint8[.fused][.fp16].onnx  each image graph taking uint8 pixels [B, 3, H, W],
                                     normalised inside the graph (export/pixels.py)
  tokenizer.json                     the CLIP tokenizer (read by the `tokenizers` library)
  manifest.json                      versions, IO specs, view settings, hashes, parity figures
Each graph is written and verified by :func:`~.verified_graph.export_graph`, the CLIP graphs by
:mod:`~.feature_graphs`. The bundle is built in a temporary sibling folder, verified, and only then renamed into place.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from itertools import takewhile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cliper_prod import __version__
from cliper_prod.backbones.base import FoldInState
from cliper_prod.backbones.cold_student import StudentConfig
from cliper_prod.bundle_format import (FOLD_IN, FORMAT_VERSION, GPU_FORM, HISTORY_INDPTR,
                                       HISTORY_ITEMS, IMAGE_GRAPH, ITEM_IDS, ITEM_TABLE, MANIFEST,
                                       MANIFEST_HASH, PLAIN, TEXT_GRAPH, TOKENIZER, TOPK_GRAPH,
                                       USER_IDS, USER_TABLE, fold_in_file, graph_file,
                                       manifest_hash, sha256_file)
from cliper_prod.checkpoint import load_model
from cliper_prod.errors import CheckpointError
from cliper_prod.export.feature_graphs import export_features, feature_settings
from cliper_prod.export.graphs import GraphSpec, export_onnx, feeds, torch_outputs
from cliper_prod.export.student_fit import fit_student
from cliper_prod.export.verified_graph import (CPU, GraphOptions, export_graph, preference,
                                               verified_onnx)
from cliper_prod.histories import history_pairs, training_csr
from cliper_prod.ids import read_ids, write_ids
from cliper_prod.io import TEMP_SUFFIX, check_output, temp_prefix, write_json, write_npy
from cliper_prod.scoring import CandidateTopKScorer, TopKScorer
from cliper_prod.student_format import COLD_STUDENT, StudentState, student_file

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
    verified_onnx(spec, path, GPU_FORM, reference, False, _same_topk(*reference), record)
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


def _same_topk(reference_items: np.ndarray, reference_scores: np.ndarray):
    """Indices must match wherever the reference scores are not tied."""
    def check(outs) -> str | None:
        items = outs[0]
        differ = items != reference_items
        if not differ.any():
            return None
        rows, cols = np.nonzero(differ)
        tied = np.isclose(reference_scores[rows, cols], outs[1][rows, cols], rtol=1e-5,
                          atol=1e-6)
        return None if tied.all() else f"{int((~tied).sum())} top-K entries differ"
    return check


def export_bundle(checkpoint: Path, *, backbone: str, out: Path, clip_source: str | None = None,
                  random_init: bool = False, data_dir: Path | None = None,
                  options: GraphOptions = GraphOptions(),
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
    return _write_atomically(out, lambda folder: _build(
        folder, tables, options, payload["backbone"], data.name,
        features=lambda: export_features(settings, folder, options) if settings else None,
        fold_in=fold_in, student=state))


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
    return _write_atomically(out, lambda folder: _build(folder, tables, options, backbone,
                                                        dataset))


def extend_bundle(source: Path, manifest: dict[str, Any], *, item_ids: Sequence[str],
                  items: np.ndarray, fold_in: FoldInState, out: Path,
                  placement: str = "fold-in", student: StudentState | None = None
                  ) -> dict[str, Any]:
    """A new bundle at ``out``: ``source`` (``manifest``: its manifest, as
    :func:`~cliper_prod.bundle_format.read_manifest` checked it when the bundle was opened) with
    the items ``item_ids`` (embeddings ``items``, placed by ``fold_in``, which holds the arrays
    with them appended) added to its catalog, exported and verified as :func:`export_bundle`
    does; ``source`` is not touched. The CLIP graphs and the tokenizer are copied with their
    verified records. The top-K graph keeps the source's forms (the GPU form and its candidate
    count only if the source has one). ``placement`` (how the new items were placed) goes
    into the lineage; ``student``, the source's cold-start student, is kept."""
    topk = manifest["graphs"][TOPK_GRAPH]
    tables = {name: np.load(source / file) for name, file in manifest["tables"].items()}
    old_ids = read_ids(source / manifest["ids"]["items"], len(tables["items"]))
    counts = np.diff(tables["history_indptr"])
    train = np.stack([np.repeat(np.arange(len(counts)), counts),
                      tables["history_items"].astype(np.int64)], 1)
    user_ids = read_ids(source / manifest["ids"]["users"], len(tables["users"]))
    embedding = EmbeddingTables(torch.from_numpy(tables["users"]),
                                torch.from_numpy(np.concatenate([tables["items"], items])),
                                train, user_ids, old_ids + list(item_ids))
    options = GraphOptions(max_k=topk["k"], chunk_items=topk["chunk_items"],
                           opset=manifest["opset"], torchscript="torchscript" in topk["files"],
                           gpu_form=GPU_FORM in topk,
                           candidates=topk.get(GPU_FORM, {}).get("candidates_option"),
                           candidate_blocks=topk.get(GPU_FORM, {}).get("blocks_option", 1))
    lineage = {"extended_from": {"created": manifest["created"],
                                 "manifest_sha256": sha256_file(source / MANIFEST)},
               "added_items": manifest.get("lineage", {}).get("added_items", 0) + len(item_ids),
               "placement": placement}
    placements = dict(manifest.get("lineage", {}).get("placements", {}))
    placements[placement] = placements.get(placement, 0) + len(item_ids)
    lineage["placements"] = placements

    def copy_features(folder: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
        if manifest.get("features") is None:
            return None
        records = {name: manifest["graphs"][name] for name in (IMAGE_GRAPH, TEXT_GRAPH)}
        names = [f for r in records.values() for f in r["files"].values()] + [TOKENIZER]
        for name in names:
            shutil.copy2(source / name, folder / name)
        return records, manifest["features"]

    return _write_atomically(out, lambda folder: _build(
        folder, embedding, options, manifest["backbone"], manifest["dataset"],
        features=lambda: copy_features(folder), fold_in=fold_in, lineage=lineage,
        student=student))


def _write_atomically(out: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``build`` in a temporary sibling of ``out`` (named as :mod:`cliper_prod.io` names
    temporaries, so a killed run's is found), then swap it into place."""
    check_output(out, "bundle")
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=TEMP_SUFFIX, dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)  # mkdtemp makes it private; the bundle is an ordinary folder
    try:
        manifest = build(folder)
        _replace_dir(folder, out)
    finally:
        if folder.exists():
            shutil.rmtree(folder)
    return manifest


FeatureGraphs = Callable[[], "tuple[dict[str, Any], dict[str, Any]] | None"]


def _build(folder: Path, tables: EmbeddingTables, options: GraphOptions, backbone: str | None,
           dataset: str | None, *, features: FeatureGraphs = lambda: None,
           fold_in: FoldInState | None = None, lineage: dict[str, Any] | None = None,
           student: StudentState | None = None) -> dict[str, Any]:
    """Write every file of a bundle into ``folder``: the top-K graph and tables, the CLIP graphs
    ``features`` writes (their records and the feature settings, or None), the fold-in arrays,
    the cold-start student's, then the manifest."""
    graphs: dict[str, Any] = {}
    users, items = (t.detach().float().contiguous() for t in (tables.users, tables.items))
    spec, topk_info, (indptr, history) = _topk_graph(users, items, tables.train, options.max_k,
                                                     options.chunk_items)
    ref_items, ref_scores = torch_outputs(spec)
    log.info("exporting %s (%d users x %d items, K=%d)", spec.name, len(users), len(items),
             topk_info["k"])
    graphs[spec.name] = {**export_graph(spec, folder, options, fp16=False,
                                         extra_check=_same_topk(ref_items, ref_scores)),
                         **topk_info}
    if options.gpu_form:
        _export_gpu_form(spec, items, folder, options, [ref_items, ref_scores],
                         graphs[spec.name])
    write_npy(folder / USER_TABLE, users.numpy())
    write_npy(folder / ITEM_TABLE, items.numpy())
    write_npy(folder / HISTORY_INDPTR, indptr)
    write_npy(folder / HISTORY_ITEMS, history)
    write_ids(folder / USER_IDS, tables.user_ids or range(len(users)))
    write_ids(folder / ITEM_IDS, tables.item_ids or range(len(items)))
    feature_graphs = features()
    feature_info = None
    if feature_graphs is not None:
        records, feature_info = feature_graphs
        graphs.update(records)
    extra: dict[str, Any] = {"lineage": lineage} if lineage else {}
    if fold_in is not None:
        for name, array in fold_in.arrays.items():
            write_npy(folder / fold_in_file(name), np.ascontiguousarray(array))
        extra[FOLD_IN] = {"user_rule": fold_in.user_rule, "item_rule": fold_in.item_rule,
                          "params": fold_in.params,
                          "arrays": {name: fold_in_file(name) for name in fold_in.arrays}}
    if student is not None:
        for name, array in student.arrays.items():
            write_npy(folder / student_file(name), np.ascontiguousarray(array, np.float32))
        extra[COLD_STUDENT] = {"params": student.params,
                               "arrays": {name: student_file(name) for name in student.arrays}}
    return write_manifest(folder, graphs, feature_info, options.opset, backbone=backbone,
                          dataset=dataset, extra=extra)


def write_manifest(folder: Path, graphs: dict[str, Any], features: dict[str, Any] | None,
                   opset: int, backbone: str | None, dataset: str | None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of ``folder`` and write ``manifest.json`` (last, once all is verified)."""
    import onnx
    import onnxruntime

    files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    manifest = {
        "format_version": FORMAT_VERSION, "cliper_prod": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone, "dataset": dataset,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "opset": opset, "graphs": graphs, "features": features,
        "ids": {"users": USER_IDS, "items": ITEM_IDS},
        "tables": {"users": USER_TABLE, "items": ITEM_TABLE,
                   "history_indptr": HISTORY_INDPTR, "history_items": HISTORY_ITEMS},
        **(extra or {}),
        "files": {name: sha256_file(folder / name) for name in files},
    }
    manifest[MANIFEST_HASH] = manifest_hash(manifest)
    write_json(folder / MANIFEST, manifest)
    return manifest


def _replace_dir(new: Path, final: Path) -> None:
    """Swap ``new`` into ``final``: readers see the old bundle or the new one, never a mix."""
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(f"{temp_prefix(final)}old{TEMP_SUFFIX}")
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old)
