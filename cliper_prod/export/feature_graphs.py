"""The CLIP image tower and the text+fusion graph of a bundle, with the tokenizer and the
feature settings the runtime needs to embed items as the model's features were embedded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cliper_prod.bundle_format import IMAGE_GRAPH, TEXT_GRAPH, TOKENIZER
from cliper_prod.errors import ConfigError
from cliper_prod.export.graphs import GraphSpec
from cliper_prod.export.pixels import add_uint8_twins
from cliper_prod.export.verified_graph import GraphOptions, export_graph
from cliper_prod.features.image_preprocess import ClipImagePreprocessor
from cliper_prod.features.views import ViewSpec
from cliper_prod.fusion_modes import fusion_mode

log = logging.getLogger(__name__)

SAMPLE_FIELDS = [  # parity inputs: short, long (truncated), partial and empty items
    {"title": "Organic cotton baby blanket", "brand": "Dreamo", "categories": "Baby, Bedding",
     "description": "A breathable knit blanket."},
    {"title": "Stroller", "description": "folds flat with one hand " * 40},
    {"brand": "Acme"},
    {},
]


@dataclass(frozen=True)
class FeatureSettings:
    """How the item features were (or will be) extracted: fixed in the bundle."""

    clip_source: str
    random_init: bool  # build the CLIP from its config (as `embed --random-init` did)
    fusion: str
    tau: float
    views: ViewSpec


def feature_settings(features_dir: Path | None, clip_source: str | None, random_init: bool
                     ) -> FeatureSettings | None:
    """From the embed summary the model was trained on, with ``clip_source`` overriding its
    CLIP checkpoint; with no summary, defaults for ``clip_source``; with neither, no feature
    graphs. The CLIP is rebuilt from its config only where the features were embedded so
    (``built_from_config``; summaries older than that key meant it by ``random_weights``): a
    checkpoint saved with random weights is loaded as saved, never re-randomised."""
    summary_path = features_dir / "embed_summary.json" if features_dir else None
    if summary_path is not None and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("long_text") == "chunk-and-sum":
            raise ConfigError(f"{summary_path}: the features were extracted with chunk-and-sum "
                              f"over-long text, which the bundle graphs do not reproduce; "
                              f"re-embed with truncation to export")
        views = ViewSpec.from_dict(summary["view_spec"])
        return FeatureSettings(clip_source or summary["clip"],
                               random_init or bool(summary.get("built_from_config",
                                                               summary["random_weights"])),
                               summary["fusion"], float(summary["tau"]), views)
    if clip_source is None:
        return None
    return FeatureSettings(clip_source, random_init, "sa", 0.1, ViewSpec())


def causal_if_exact(causal: nn.Module, masked: nn.Module, sample: tuple[Tensor, ...]
                    ) -> nn.Module:
    """The text+fusion twin to fuse: the one without the padding mask (causal attention, see
    :class:`~cliper_prod.features.clip_towers.TextTower`) where it gives the masked one's
    outputs on ``sample`` (padded views), else the masked one. Every CLIP pooled at its first
    EOS gives them; a checkpoint whose pooling rule lands in the padding (a legacy config whose
    pad id is the largest id) does not, and keeps the masked form rather than failing."""
    with torch.no_grad():
        same = all(torch.allclose(a, b, rtol=0, atol=1e-6)  # equal but for kernel order
                   for a, b in zip(causal(*sample), masked(*sample)))
    if not same:
        log.info("text_fusion: the causal form changes this checkpoint's outputs (its pooling "
                 "reads the padding); the fused graph keeps the padding mask")
    return causal if same else masked


def _feature_graphs(settings: FeatureSettings, folder: Path, fused: bool
                    ) -> tuple[list[GraphSpec], dict[str, nn.Module], dict]:
    """The CLIP graphs' specs, their eager-attention twins for the fused variant (when
    ``fused``; same weights) and the manifest's feature settings."""
    from cliper_prod.features.clip_towers import ClipTowers
    from cliper_prod.features.fusion import ViewFusion

    towers = ClipTowers(settings.clip_source, random_init=settings.random_init)
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
        eager = ClipTowers(settings.clip_source, random_init=settings.random_init,
                           attn_implementation="eager")
        fusion = ViewFusion(extracted_as, settings.tau)
        twins = {IMAGE_GRAPH: eager.image_tower,
                 TEXT_GRAPH: causal_if_exact(eager.view_encoder(fusion, padding_mask=False),
                                             eager.view_encoder(fusion), specs[1].check)}
    towers.tokenizer.backend_tokenizer.save(str(folder / TOKENIZER))
    special = towers.special
    info = {"clip": settings.clip_source, "random_weights": towers.random_weights,
            "built_from_config": settings.random_init,
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
        log.info("exporting %s (CLIP %s%s)", spec.name, settings.clip_source,
                 ", RANDOM weights" if info["random_weights"] else "")
        records[spec.name] = export_graph(spec, folder, options, fp16=options.fp16,
                                          fused=twins.get(spec.name), int8=options.int8)
    if options.uint8:
        add_uint8_twins(specs[0], folder, records[IMAGE_GRAPH],
                        ClipImagePreprocessor.from_dict(info["preprocess"]))
    return records, info
