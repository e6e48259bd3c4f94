"""The CLIPER feature encoder of a bundle on ONNX Runtime: the embed pipeline's second backend.

Same interface as :class:`~cliper_prod.features.clip_towers.ClipTowers`, so ``embed --bundle``
runs the exact pipeline and per-item policy of the PyTorch path. Token ids come from the
bundle's ``tokenizer.json`` via the ``tokenizers`` library (no transformers, no torch). Each
graph runs the variant (plain or fused) :meth:`Bundle.variant` picks for the session's provider.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from cliper_prod.bundle_format import IMAGE_GRAPH, TEXT_GRAPH, TOKENIZER
from cliper_prod.errors import BundleError
from cliper_prod.features.image_preprocess import ClipImagePreprocessor
from cliper_prod.features.tokenize import SpecialTokens, TokenizedViews, pack_tokens
from cliper_prod.features.views import ViewSpec
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.sessions import Graph


class OnnxEncoder:
    def __init__(self, bundle: Bundle, precision: str = "fp32", variant: str = "auto") -> None:
        from tokenizers import Tokenizer

        info = bundle.features
        # a bundle that lacks a graph fails here, before any work
        self.variants = {name: bundle.variant(name, precision, variant)
                         for name in (IMAGE_GRAPH, TEXT_GRAPH)}
        for name, chosen in self.variants.items():
            bundle.graph_file(name, precision, chosen)
        self.source = (f"{bundle.folder} ({info['clip']}, {precision}, "
                       f"{'/'.join(sorted(set(self.variants.values())))})")
        self.random_init = bool(info["random_weights"])
        self.max_tokens = int(info["max_tokens"])
        self.dim = int(info["dim"])
        self.fusion = info["fusion"]
        self.graph_fusion = info["graph_fusion"]
        self.tau = float(info["tau"])
        self.views = ViewSpec.from_dict(info["view_spec"])
        self.special = SpecialTokens(**info["special_tokens"])
        pre = info["preprocess"]
        self.preprocess = ClipImagePreprocessor(**{**pre, "mean": tuple(pre["mean"]),
                                                   "std": tuple(pre["std"])})
        self.tokenizer = Tokenizer.from_file(str(bundle.folder / TOKENIZER))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        # sessions open on first use (a Ray driver only needs the metadata)
        self.bundle, self.precision = bundle, precision

    @cached_property
    def image_graph(self) -> Graph:
        return self.bundle.graph(IMAGE_GRAPH, self.precision, self.variants[IMAGE_GRAPH])

    @cached_property
    def text_graph(self) -> Graph:
        return self.bundle.graph(TEXT_GRAPH, self.precision, self.variants[TEXT_GRAPH])

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def tokenize(self, texts: list[str], chunk: bool = False) -> TokenizedViews:
        if chunk:
            raise BundleError("chunk-and-sum over-long text is not part of the exported graphs; "
                              "the bundle truncates at the token level")
        return pack_tokens(self.token_ids(texts), self.special, self.max_tokens)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.image_graph(pixel_values=pixel_values.astype(np.float32))[0]

    def encode_views(self, tokens: TokenizedViews, image: np.ndarray, has_image: np.ndarray,
                     has_text: np.ndarray, mode: str, tau: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if (mode, tau) != (self.graph_fusion, self.tau):
            raise BundleError(f"the bundle's graph fuses with {self.graph_fusion}, tau "
                              f"{self.tau}; asked for {mode}, tau {tau}")
        b = len(image)
        fused, scores, image_out, views = self.text_graph(
            input_ids=tokens.input_ids.reshape(b, -1, self.max_tokens),
            attention_mask=tokens.attention_mask.reshape(b, -1, self.max_tokens),
            image_embedding=image, has_image=has_image, has_text=has_text)
        return fused, scores, image_out, views
