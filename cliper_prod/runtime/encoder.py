"""The CLIPER feature encoder of a bundle on ONNX Runtime: the embed pipeline's second backend.

Same interface as :class:`~cliper_prod.features.clip_towers.ClipTowers`, so ``embed --bundle``
runs the exact pipeline and per-item policy of the PyTorch path. Token ids come from the
bundle's ``tokenizer.json`` via the ``tokenizers`` library (no transformers, no torch). Each
graph runs the precision (:meth:`Bundle.precision`: ``auto`` is int8 on the CPU where the export
measured it faster, else fp32) and the variant (plain or fused, :meth:`Bundle.variant`) picked
for the session's provider.
uint8 pixels go to the image graph's uint8 twin where the bundle has one (normalisation in the
graph; on the CPU its outputs equal the float graph's bit for bit, tests/test_decode_paths.py),
and are normalised on the host for bundles exported before the twins.
"""

from __future__ import annotations

from functools import cached_property, partial

import numpy as np

from cliper_prod.bundle_format import IMAGE_GRAPH, TEXT_GRAPH, TOKENIZER, UINT8_INPUT
from cliper_prod.errors import BundleError
from cliper_prod.features.image_preprocess import ClipImagePreprocessor
from cliper_prod.features.tokenize import (SpecialTokens, TokenCache, TokenizedViews,
                                          library_token_ids, pack_tokens, splits_at_spaces)
from cliper_prod.features.views import ViewSpec
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.sessions import Graph


class OnnxEncoder:
    def __init__(self, bundle: Bundle, precision: str = "auto", variant: str = "auto") -> None:
        from tokenizers import Tokenizer

        info = bundle.features
        # a bundle that lacks a graph fails here, before any work
        self.precisions = {name: bundle.precision(name, precision)
                           for name in (IMAGE_GRAPH, TEXT_GRAPH)}
        self.variants = {name: bundle.variant(name, chosen, variant)
                         for name, chosen in self.precisions.items()}
        for name, chosen in self.variants.items():
            bundle.graph_file(name, self.precisions[name], chosen)
        self.source = (f"{bundle.folder} ({info['clip']}, "
                       f"{'/'.join(sorted(set(self.precisions.values())))}, "
                       f"{'/'.join(sorted(set(self.variants.values())))})")
        self.random_weights = bool(info["random_weights"])
        self.random_init = False  # the graphs hold their weights; nothing is built at load
        self.max_tokens = int(info["max_tokens"])
        self.dim = int(info["dim"])
        self.fusion = info["fusion"]
        self.graph_fusion = info["graph_fusion"]
        self.tau = float(info["tau"])
        self.views = ViewSpec.from_dict(info["view_spec"])
        self.special = SpecialTokens(**info["special_tokens"])
        self.preprocess = ClipImagePreprocessor.from_dict(info["preprocess"])
        self.uint8_pixels = bundle.has_uint8(IMAGE_GRAPH, self.precisions[IMAGE_GRAPH],
                                             self.variants[IMAGE_GRAPH])
        self.tokenizer = Tokenizer.from_file(str(bundle.folder / TOKENIZER))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.token_ids = TokenCache(partial(library_token_ids, self.tokenizer),
                                    joins=splits_at_spaces(self.tokenizer))
        # sessions open on first use (a Ray driver only needs the metadata)
        self.bundle = bundle

    def _graph(self, name: str, uint8: bool = False) -> Graph:
        return self.bundle.graph(name, self.precisions[name], self.variants[name], uint8)

    @cached_property
    def image_graph(self) -> Graph:
        return self._graph(IMAGE_GRAPH)

    @cached_property
    def uint8_image_graph(self) -> Graph:
        return self._graph(IMAGE_GRAPH, uint8=True)

    @cached_property
    def text_graph(self) -> Graph:
        return self._graph(TEXT_GRAPH)

    def tokenize(self, texts: list[str], chunk: bool = False) -> TokenizedViews:
        return self.pack(self.token_ids(texts), chunk)

    def pack(self, token_lists: list[list[int]], chunk: bool = False) -> TokenizedViews:
        """Token ids -> the text graph's inputs (truncated at its positions)."""
        if chunk:
            raise BundleError("chunk-and-sum over-long text is not part of the exported graphs; "
                              "the bundle truncates at the token level")
        return pack_tokens(token_lists, self.special, self.max_tokens)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """uint8 pixels or normalised float32 [B, 3, H, W] -> image embeddings [B, D]."""
        if pixel_values.dtype == np.uint8:
            if self.uint8_pixels:
                return self.uint8_image_graph(**{UINT8_INPUT: pixel_values})[0]
            pixel_values = self.preprocess.normalise(pixel_values)
        return self.image_graph(pixel_values=np.asarray(pixel_values, dtype=np.float32))[0]

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
