"""A trained checkpoint (+ its CLIP feature encoder) -> a self-contained, verified bundle.

Contents (see export/README.md for the format):
  topk.onnx / topk.pt                users [B] -> items [B, K], scores [B, K], training items out
  user_embeddings.npy, item_embeddings.npy, user_ids.txt, item_ids.txt
  image_encoder[.fp16].onnx / .pt    pixel_values [B, 3, H, W] -> image embedding [B, D]
  text_fusion[.fp16].onnx / .pt      views [B, V, L] + image embedding -> fused text, similarity,
                                     image feature, view embeddings
  <clip graph>.fused[.fp16].onnx     the same, rewritten by ONNX Runtime's transformer optimizer
  image_encoder.uint8[.fused][.fp16].onnx  each image graph taking uint8 pixels [B, 3, H, W],
                                     normalised inside the graph (export/pixels.py)
  tokenizer.json                     the CLIP tokenizer (read by the `tokenizers` library)
  manifest.json                      versions, IO specs, view settings, hashes, parity figures
The bundle is built in a temporary sibling folder, verified, and only then renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from cliper_prod import __version__
from cliper_prod.backbones.base import FoldInState
from cliper_prod.bundle_format import (FOLD_IN, FORMAT_VERSION, FUSED, HISTORY_INDPTR,
                                       HISTORY_ITEMS, IMAGE_GRAPH, ITEM_IDS, ITEM_TABLE, MANIFEST,
                                       PLAIN, TEXT_GRAPH, TOKENIZER, TOPK_GRAPH, USER_IDS,
                                       USER_TABLE, file_key, fold_in_file, graph_file,
                                       sha256_file)
from cliper_prod.checkpoint import load_model
from cliper_prod.errors import CheckpointError, ConfigError
from cliper_prod.export.graphs import (DEFAULT_OPSET, FP16_BOUND, FP32_BOUND, GraphSpec,
                                       export_onnx, export_torchscript, feeds,
                                       optimize_clip, to_fp16, torch_outputs, verify)
from cliper_prod.export.pixels import add_uint8_twins
from cliper_prod.features.image_preprocess import ClipImagePreprocessor
from cliper_prod.features.views import ViewSpec
from cliper_prod.fusion_modes import fusion_mode
from cliper_prod.io import write_json, write_npy, write_text
from cliper_prod.histories import history_pairs, training_csr
from cliper_prod.scoring import TopKScorer

log = logging.getLogger(__name__)

SAMPLE_FIELDS = [  # parity inputs: short, long (truncated), partial and empty items
    {"title": "Organic cotton baby blanket", "brand": "Dreamo", "categories": "Baby, Bedding",
     "description": "A breathable knit blanket."},
    {"title": "Stroller", "description": "folds flat with one hand " * 40},
    {"brand": "Acme"},
    {},
]


@dataclass(frozen=True)
class GraphOptions:
    """How the graphs are written, for every graph of a bundle.

    Attributes:
        max_k: most items per user the top-K graph returns (``topk -k`` may ask for fewer).
        chunk_items: items the top-K graph scores at a time (bounds its memory to batch x chunk).
        opset: ONNX opset of every graph.
        fp16: also write fp16 variants of the CLIP graphs.
        torchscript: also write TorchScript twins.
        fused: also write the CLIP graphs as rewritten by ONNX Runtime's transformer optimizer
            (fused attention, SkipLayerNormalization, QuickGelu), each precision, with their
            CPU latency beside the plain graphs' (the runtime's choice, see export/README.md).
        uint8: also write a uint8-pixel twin of each image graph file (export/pixels.py); each
            twin holds a full copy of its graph's weights, so the image graphs take twice the
            disk.
    """

    max_k: int = 100
    chunk_items: int = 1 << 16
    opset: int = DEFAULT_OPSET
    fp16: bool = True
    torchscript: bool = True
    fused: bool = True
    uint8: bool = True


@dataclass(frozen=True)
class FeatureSettings:
    """How the item features were (or will be) extracted: fixed in the bundle."""

    clip: str
    random_init: bool
    fusion: str
    tau: float
    views: ViewSpec


def feature_settings(features_dir: Path | None, clip: str | None, random_init: bool
                     ) -> FeatureSettings | None:
    """From the embed summary the model was trained on, with ``clip`` overriding its source;
    with no summary, defaults for ``clip``; with neither, no feature graphs."""
    summary_path = features_dir / "embed_summary.json" if features_dir else None
    if summary_path is not None and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("long_text") == "chunk-and-sum":
            raise ConfigError(f"{summary_path}: the features were extracted with chunk-and-sum "
                              f"over-long text, which the bundle graphs do not reproduce; "
                              f"re-embed with truncation to export")
        views = ViewSpec.from_dict(summary["view_spec"])
        return FeatureSettings(clip or summary["clip"],
                               random_init or bool(summary["random_weights"]),
                               summary["fusion"], float(summary["tau"]), views)
    if clip is None:
        return None
    return FeatureSettings(clip, random_init, "sa", 0.1, ViewSpec())


def _io_spec(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes of a graph's inputs and outputs, read from the file itself."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict[str, Any]]:
        return [{"name": v.name,
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(
                     v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values]
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output),
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}


def _ort_run(path: Path, spec: GraphSpec):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds(spec))


def _script_run(path: Path, spec: GraphSpec):
    module = torch.jit.load(str(path))

    def run() -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in _as_tuple(module(*spec.check))]
    return run


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


CPU = "CPUExecutionProvider"
LATENCY_RUNS = 5  # timed runs of the verification batch per graph (after one warm-up)


def _export_graph(spec: GraphSpec, folder: Path, options: GraphOptions, *, fp16: bool,
                  extra_check=lambda outs: None, fused: nn.Module | None = None
                  ) -> dict[str, Any]:
    """Export one module in every requested form and verify each against PyTorch.

    ``fused``: the same module with eager attention, exported and optimized for the fused
    variant, which is verified against the same reference and timed against the plain one.
    """
    reference = torch_outputs(spec)
    fp32 = folder / graph_file(spec.name)
    export_onnx(spec, fp32, options.opset)
    record: dict[str, Any] = {**_io_spec(fp32), "files": {}, "parity": {}}
    if spec.external_data:  # the exporter's name for it; hashed with every other file
        record["external_data"] = f"{fp32.name}.data"
    runs = {PLAIN: _verified_onnx(spec, fp32, PLAIN, reference, fp16, extra_check, record)}
    if fused is not None:
        path = folder / graph_file(spec.name, variant=FUSED)
        config = fused.config
        with tempfile.TemporaryDirectory() as tmp:
            eager = Path(tmp) / path.name
            export_onnx(replace(spec, module=fused), eager, options.opset)
            ops = optimize_clip(eager, path, config.num_hidden_layers,
                                config.num_attention_heads, config.hidden_size)
        runs[FUSED] = _verified_onnx(spec, path, FUSED, reference, fp16, extra_check, record)
        record[FUSED] = {"attn_implementation": "eager", "optimizer": "onnxruntime.transformers "
                         "optimize_model(model_type='clip', opt_level=0)",
                         "layers": config.num_hidden_layers, "ops": ops, **_preference(runs)}
        log.info("%s: fused %s; CPU prefers %s", spec.name, ops, record[FUSED]["preferred"][CPU])
    if options.torchscript:
        script = folder / graph_file(spec.name, kind="pt")
        export_torchscript(spec, script)
        record["files"]["torchscript"] = script.name
        record["parity"]["torchscript"] = verify(script.name, reference,
                                                 _script_run(script, spec), FP32_BOUND,
                                                 extra_check)
    return record


def _verified_onnx(spec: GraphSpec, fp32: Path, variant: str, reference, fp16: bool,
                   extra_check, record: dict[str, Any]) -> dict[str, Callable]:
    """Verify ``fp32`` (and its fp16 twin, written here), list both in ``record``; their runs."""
    runs = {"fp32": _ort_run(fp32, spec)}
    checks = [("fp32", fp32, FP32_BOUND, extra_check)]
    if fp16:
        half = fp32.with_name(graph_file(spec.name, "fp16", variant=variant))
        to_fp16(fp32, half)
        runs["fp16"] = _ort_run(half, spec)
        checks.append(("fp16", half, FP16_BOUND, lambda outs: None))
    for precision, path, bound, check in checks:
        key = file_key(precision, variant)
        record["files"][key] = path.name
        record["parity"][f"onnx_{key.replace('.', '_')}"] = verify(path.name, reference,
                                                                    runs[precision], bound, check)
    return runs


def _preference(runs: dict[str, dict[str, Callable]]) -> dict[str, Any]:
    """Median CPU latency of each variant per precision, interleaved; the faster is preferred."""
    latency: dict[str, dict[str, float]] = {}
    for precision in runs[PLAIN]:
        variants = {variant: by_precision[precision] for variant, by_precision in runs.items()}
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        for run in variants.values():
            run()  # warm-up
        for _ in range(LATENCY_RUNS):
            for variant, run in variants.items():
                start = time.perf_counter()
                run()
                times[variant].append(time.perf_counter() - start)
        latency[precision] = {v: round(1e3 * statistics.median(t), 4) for v, t in times.items()}
    return {"latency_ms": {CPU: latency},
            "preferred": {CPU: {p: min(ms, key=ms.get) for p, ms in latency.items()}}}


TOPK_INPUTS = ("queries", "exclude_rows", "exclude_items")


def topk_spec(scorer: TopKScorer, check: tuple[torch.Tensor, ...] | None = None) -> GraphSpec:
    """How a :class:`TopKScorer` is exported: traced on two queries and three exclusion pairs
    (batch and pair counts dynamic, neither 0 nor 1 so neither is specialised), the item
    table as external data, the TorchScript twin scripted so its chunk loop stays a loop;
    compared on ``check`` (default: the trace inputs)."""
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


def _feature_graphs(settings: FeatureSettings, folder: Path, fused: bool
                    ) -> tuple[list[GraphSpec], dict[str, nn.Module], dict]:
    """The CLIP graphs' specs, their eager-attention twins for the fused variant (when
    ``fused``; same weights) and the manifest's feature settings."""
    from cliper_prod.features.clip_towers import ClipTowers
    from cliper_prod.features.fusion import ViewFusion

    towers = ClipTowers(settings.clip, random_init=settings.random_init)
    size = towers.preprocess.crop
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(len(SAMPLE_FIELDS) + 1, 3, size, size, generator=gen)
    n = len(SAMPLE_FIELDS)
    with torch.no_grad():
        image_emb = towers.image_tower(pixels[:n])
    tokens = towers.tokenize([v for f in SAMPLE_FIELDS for v in settings.views.build(f)])
    n_views = len(settings.views.names)
    ids = torch.from_numpy(tokens.input_ids).reshape(n, n_views, -1)
    mask = torch.from_numpy(tokens.attention_mask).reshape(n, n_views, -1)
    has_image = torch.tensor([True, False, True, True])
    has_text = torch.tensor([True, True, True, False])
    extracted_as = fusion_mode(settings.fusion).extracted_as
    encoder = towers.view_encoder(ViewFusion(extracted_as, settings.tau))
    specs = [
        GraphSpec(IMAGE_GRAPH, towers.image_tower, (pixels[:2],), (pixels,), ["pixel_values"],
                  ["image_embedding"]),
        GraphSpec(TEXT_GRAPH, encoder,
                  (ids[:2], mask[:2], image_emb[:2], has_image[:2], has_text[:2]),
                  (ids, mask, image_emb, has_image, has_text),
                  ["input_ids", "attention_mask", "image_embedding", "has_image", "has_text"],
                  ["text_feature", "similarity", "image_feature", "view_embeddings"]),
    ]
    twins: dict[str, nn.Module] = {}
    if fused:
        eager = ClipTowers(settings.clip, random_init=settings.random_init,
                           attn_implementation="eager")
        twins = {IMAGE_GRAPH: eager.image_tower,
                 TEXT_GRAPH: eager.view_encoder(ViewFusion(extracted_as, settings.tau))}
    towers.tokenizer.backend_tokenizer.save(str(folder / TOKENIZER))
    special = towers.special
    info = {"clip": settings.clip, "random_weights": settings.random_init,
            "fusion": settings.fusion, "graph_fusion": extracted_as,
            "tau": settings.tau, "views": list(settings.views.names),
            "view_spec": asdict(settings.views), "max_tokens": towers.max_tokens,
            "dim": towers.dim, "long_text": "truncate",
            "special_tokens": {"bos": special.bos, "eos": special.eos, "pad": special.pad},
            "preprocess": towers.preprocess.as_dict()}
    return specs, twins, info


def export_features(settings: FeatureSettings, folder: Path,
                    options: GraphOptions = GraphOptions()
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The image and text+fusion graphs and the tokenizer into ``folder``; verified."""
    folder.mkdir(parents=True, exist_ok=True)
    specs, twins, info = _feature_graphs(settings, folder, options.fused)
    records = {}
    for spec in specs:
        log.info("exporting %s (CLIP %s%s)", spec.name, settings.clip,
                 ", RANDOM weights" if settings.random_init else "")
        records[spec.name] = _export_graph(spec, folder, options, fp16=options.fp16,
                                           fused=twins.get(spec.name))
    if options.uint8:
        add_uint8_twins(specs[0], folder, records[IMAGE_GRAPH],
                        ClipImagePreprocessor.from_dict(info["preprocess"]))
    return records, info


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


def export_bundle(checkpoint: Path, *, backbone: str, out: Path, clip: str | None = None,
                  random_init: bool = False, data_dir: Path | None = None,
                  options: GraphOptions = GraphOptions()) -> dict[str, Any]:
    """Write the bundle for ``checkpoint`` to ``out`` (replacing it atomically).

    ``clip`` overrides the CLIP checkpoint the model's features were embedded with (``None``
    with vanilla features: no feature graphs); ``data_dir`` is the training data if it moved.
    """
    model, data, payload = load_model(checkpoint, data_dir)
    if payload["backbone"] != backbone:
        raise CheckpointError(f"{checkpoint}: holds a {payload['backbone']} model, not "
                              f"{backbone}; pass --backbone {payload['backbone']}")
    model.eval()
    settings = feature_settings(data.features_dir, clip, random_init)
    tables = EmbeddingTables(*model.embedding_tables(), data.train, data.user_ids, data.item_ids)
    fold_in = model.fold_in_state(data)
    return _write_atomically(out, lambda folder: _build(
        folder, tables, options, payload["backbone"], data.name,
        features=lambda: export_features(settings, folder, options) if settings else None,
        fold_in=fold_in))


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
                  items: np.ndarray, fold_in: FoldInState, out: Path) -> dict[str, Any]:
    """A new bundle at ``out``: ``source`` (``manifest``: its manifest, as
    :func:`~cliper_prod.bundle_format.read_manifest` checked it when the bundle was opened) with
    the items ``item_ids`` (embeddings ``items``, placed by ``fold_in``, which holds the arrays
    with them appended) added to its catalog, exported and verified as :func:`export_bundle`
    does; ``source`` is not touched. The CLIP graphs and the tokenizer are copied with their
    verified records."""
    topk = manifest["graphs"][TOPK_GRAPH]
    old_ids = (source / manifest["ids"]["items"]).read_text(encoding="utf-8").splitlines()
    tables = {name: np.load(source / file) for name, file in manifest["tables"].items()}
    counts = np.diff(tables["history_indptr"])
    train = np.stack([np.repeat(np.arange(len(counts)), counts),
                      tables["history_items"].astype(np.int64)], 1)
    user_ids = (source / manifest["ids"]["users"]).read_text(encoding="utf-8").splitlines()
    embedding = EmbeddingTables(torch.from_numpy(tables["users"]),
                                torch.from_numpy(np.concatenate([tables["items"], items])),
                                train, user_ids, old_ids + list(item_ids))
    options = GraphOptions(max_k=topk["k"], chunk_items=topk["chunk_items"],
                           opset=manifest["opset"], torchscript="torchscript" in topk["files"])
    lineage = {"extended_from": {"created": manifest["created"],
                                 "manifest_sha256": sha256_file(source / MANIFEST)},
               "added_items": manifest.get("lineage", {}).get("added_items", 0) + len(item_ids)}

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
        features=lambda: copy_features(folder), fold_in=fold_in, lineage=lineage))


def _write_atomically(out: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``build`` in a temporary sibling of ``out``, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
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
           fold_in: FoldInState | None = None, lineage: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    """Write every file of a bundle into ``folder``: the top-K graph and tables, the CLIP graphs
    ``features`` writes (their records and the feature settings, or None), the fold-in arrays,
    then the manifest."""
    graphs: dict[str, Any] = {}
    users, items = (t.detach().float().contiguous() for t in (tables.users, tables.items))
    spec, topk_info, (indptr, history) = _topk_graph(users, items, tables.train, options.max_k,
                                                     options.chunk_items)
    ref_items, ref_scores = torch_outputs(spec)
    log.info("exporting %s (%d users x %d items, K=%d)", spec.name, len(users), len(items),
             topk_info["k"])
    graphs[spec.name] = {**_export_graph(spec, folder, options, fp16=False,
                                         extra_check=_same_topk(ref_items, ref_scores)),
                         **topk_info}
    write_npy(folder / USER_TABLE, users.numpy())
    write_npy(folder / ITEM_TABLE, items.numpy())
    write_npy(folder / HISTORY_INDPTR, indptr)
    write_npy(folder / HISTORY_ITEMS, history)
    write_text(folder / USER_IDS, "".join(f"{u}\n" for u in (tables.user_ids or
                                                             range(len(users)))))
    write_text(folder / ITEM_IDS, "".join(f"{i}\n" for i in (tables.item_ids or
                                                             range(len(items)))))
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
    write_json(folder / MANIFEST, manifest)
    return manifest


def _replace_dir(new: Path, final: Path) -> None:
    """Swap ``new`` into ``final``: readers see the old bundle or the new one, never a mix."""
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old)
