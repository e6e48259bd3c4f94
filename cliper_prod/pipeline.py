"""The built-in default job, end to end on the synthetic catalog with no downloads:
catalog -> CLIP features (a small random-weight CLIP built from a config) -> FREEDOM -> metrics
-> ONNX bundle -> ONNX Runtime feature extraction and top-K.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from cliper_prod.device import CPU
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
from cliper_prod.features.clip_towers import RANDOM_WEIGHTS_KEY, ClipTowers
from cliper_prod.features.embed import embed_catalog
from cliper_prod.features.tiny_clip import build_tiny_clip
from cliper_prod.features.views import DEFAULT_TEMPLATES, GLOBAL_TEMPLATE
from cliper_prod.fusion_modes import EXTRACTION_FUSIONS
from cliper_prod.training import train_model

log = logging.getLogger(__name__)


def catalog_texts(catalog: Path) -> list[str]:
    """Every word the tokenizer must know: item fields plus the prompt templates."""
    texts = [GLOBAL_TEMPLATE, "Missing", *DEFAULT_TEMPLATES.values()]
    for line in (catalog / "items.jsonl").read_text().splitlines():
        item = json.loads(line)
        texts += [json.dumps(v) for k, v in item.items() if k not in ("item_id", "image")]
    return texts


def run_demo(workdir: Path, progress: bool = True, max_epochs: int | None = None) -> dict:
    """Generate the catalog, embed it with CLIPER, train FREEDOM on the fused features, export
    the bundle and serve features and recommendations from it on ONNX Runtime."""
    catalog = workdir / "catalog"
    if not (catalog / "synthetic.inter").exists():
        generate_catalog(catalog, SyntheticSpec())
    log.info(f"[1/5] catalog: {load_dataset(catalog).summary()} ({catalog})")

    clip_dir = workdir / "tiny-clip"
    config = clip_dir / "config.json"
    # rebuilt (the same seed: the same weights) where an older demo left it unmarked as random
    if not config.exists() or RANDOM_WEIGHTS_KEY not in json.loads(config.read_text()):
        build_tiny_clip(clip_dir, catalog_texts(catalog))
    summary = embed_catalog(catalog / "items.jsonl", ClipTowers(clip_dir), catalog / "cliper",
                            progress=progress)
    log.info(f"[2/5] CLIPER features: {summary['embedded']} items, {len(summary['views'])} views, "
             f"fusion {summary['fusion']}, {summary['skipped']} skipped -> {catalog / 'cliper'}"
             f"\n      CLIP: a small CLIP built from a config with RANDOM weights ({clip_dir}): "
             f"the features prove the plumbing, not semantic quality")

    data = load_dataset(catalog, features_dir=catalog / "cliper")
    config = load_config("freedom")
    if max_epochs is not None:
        config["train"]["epochs"] = max_epochs
    out = workdir / "freedom-cliper"
    result = train_model("freedom", data, config, out, progress=progress)
    log.info(f"[3/5] FREEDOM trained on CLIPER features: best epoch {result.best_epoch}, valid "
             f"recall@20 {result.valid['recall@20']:.4f}, test recall@20 "
             f"{result.test['recall@20']:.4f}, ndcg@20 {result.test['ndcg@20']:.4f} -> {out}")
    bundle = _export_and_serve(workdir, out, catalog, progress)
    return {"valid": result.valid, "test": result.test, "checkpoint": str(out),
            "bundle": str(bundle)}


def _export_and_serve(workdir: Path, checkpoint: Path, catalog: Path, progress: bool) -> Path:
    """Export the bundle, then embed the catalog and rank for a few users on ONNX Runtime."""
    from cliper_prod.export.bundle_writer import export_bundle
    from cliper_prod.features.embed import EmbedOptions
    from cliper_prod.runtime.bundle_reader import Bundle
    from cliper_prod.runtime.encoder import OnnxEncoder
    from cliper_prod.runtime.rank_files import rank_users, to_file
    from cliper_prod.runtime.ranking import TopKRanker

    bundle_dir = workdir / "bundle"
    with _quiet("cliper_prod.export"):  # the demo reports the export in one line
        manifest = export_bundle(checkpoint, backbone="freedom", out=bundle_dir)
    worst = min(p["min_cosine"] for g in manifest["graphs"].values()
                for v, p in g["parity"].items() if v.endswith("fp32") or v == "torchscript")
    log.info(f"[4/5] exported {len(manifest['graphs'])} graphs (ONNX fp32, fp16 and int8, TorchScript); "
             f"parity with PyTorch: worst fp32 cosine {worst:.7f} -> {bundle_dir}")
    bundle = Bundle(bundle_dir)
    encoder = OnnxEncoder(bundle, precision="fp32")  # the fp32 graphs: compared with PyTorch
    options = EmbedOptions(views=encoder.views, fusion=encoder.fusion, tau=encoder.tau)
    summary = embed_catalog(catalog / "items.jsonl", encoder, workdir / "features-onnx", options,
                            progress=progress)
    users = workdir / "users.txt"
    users.write_text("".join(f"{u}\n" for u in bundle.user_ids[:5]))
    recs = workdir / "recs.jsonl"
    to_file(rank_users, TopKRanker(bundle), users, recs, k=10)
    first = json.loads(recs.read_text().splitlines()[0])
    log.info(f"[5/5] ONNX Runtime ({bundle.providers[0]}): embedded {summary['embedded']} items "
             f"-> {workdir / 'features-onnx'}; top-10 for 5 users -> {recs} (user "
             f"{first['user_id']}: {', '.join(first['items'][:3])}, ...)")
    return bundle_dir


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hold ``logger`` to warnings for the duration."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.WARNING)
    try:
        yield
    finally:
        target.setLevel(level)


def run_fusion_ablation(items: Path, data_dir: Path, clip_source: str, workdir: Path, *,
                        modes: tuple[str, ...] = EXTRACTION_FUSIONS,
                        backbone: str = "freedom", overrides: dict | None = None,
                        random_init: bool = False, progress: bool = True,
                        device: torch.device = CPU) -> list[dict]:
    """Embed ``items`` with each fusion mode and train ``backbone`` on each (on ``device``);
    one row per mode.

    Selection is on validation; test is the metric at the selected epoch. The rows only mean
    something with a pretrained CLIP: with random weights they test the plumbing.
    """
    from cliper_prod.features.embed import EmbedOptions

    towers = ClipTowers(clip_source, device=device, random_init=random_init)
    rows = []
    for mode in modes:
        features = workdir / f"features-{mode}"
        embed_catalog(items, towers, features, EmbedOptions(fusion=mode), progress=progress)
        data = load_dataset(data_dir, features_dir=features)
        config = load_config(backbone, overrides=overrides)
        result = train_model(backbone, data, config, workdir / f"{backbone}-{mode}",
                             progress=progress, device=device)
        rows.append({"fusion": mode, "best_epoch": result.best_epoch, "valid": result.valid,
                     "test": result.test})
    return rows
