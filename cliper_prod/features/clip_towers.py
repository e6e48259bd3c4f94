"""CLIP (or Long-CLIP) towers from a transformers checkpoint: a local folder or a hub id.

The projected embeddings are computed as ``text_projection(text_model(...).pooler_output)`` and
``visual_projection(vision_model(...).pooler_output)``: what ``CLIPModel.get_*_features``
return, written out so the same modules export to ONNX unchanged across transformers versions.
Long-CLIP is a CLIP whose text tower has 248 positions; the tokenizer's limit is taken from the
model's ``max_position_embeddings``, so both work through the same code.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cliper_prod.errors import ModelLoadError
from cliper_prod.features.fusion import ViewFusion
from cliper_prod.features.image_preprocess import ClipImagePreprocessor
from cliper_prod.features.tokenize import (SpecialTokens, TokenCache, TokenizedViews,
                                          pack_tokens)
from cliper_prod.messages import first_line

#: a key of a checkpoint's config.json saying that its saved weights are random
RANDOM_WEIGHTS_KEY = "cliper_random_weights"


class ImageTower(nn.Module):
    """pixel_values [B, 3, H, W] -> image embedding [B, D]."""

    causal_attention = False  # a ViT's attention sees every patch

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    @property
    def config(self):
        """The vision encoder's transformers config (layers, heads, width)."""
        return self.vision_model.config

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class TextTower(nn.Module):
    """input_ids, attention_mask [B, L] -> text embedding [B, D].

    ``padding_mask=False`` leaves the padding mask out and keeps CLIP's causal mask alone: the
    same embedding for right-padded text pooled at its first EOS (every position up to it sees
    only the positions before it, never the padding after it; what :func:`~cliper_prod.
    features.tokenize.pack_tokens` makes). The fused text graph is exported so: its attention
    then needs no bias and runs as one causal kernel (:func:`~cliper_prod.export.graphs.
    optimize_clip`)."""

    def __init__(self, model: nn.Module, padding_mask: bool = True) -> None:
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection
        self.padding_mask = padding_mask

    @property
    def causal_attention(self) -> bool:
        """Whether the causal mask is the only one (the fused graph's attention is causal)."""
        return not self.padding_mask

    @property
    def config(self):
        """The text encoder's transformers config (layers, heads, width)."""
        return self.text_model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.text_model(input_ids=input_ids,
                              attention_mask=attention_mask if self.padding_mask else None)
        return self.text_projection(out.pooler_output)


class ViewEncoder(nn.Module):
    """Views and image embedding -> CLIPER features: the text+fusion graph the bundle exports.

    input_ids, attention_mask [B, V, L]; image [B, D]; has_image, has_text [B] (bool)
    -> (fused text feature [B, D'], similarity [B, V], image feature [B, D], views [B, V, D]).
    """

    def __init__(self, text_tower: TextTower, fusion: ViewFusion) -> None:
        super().__init__()
        self.text_tower = text_tower
        self.fusion = fusion

    @property
    def config(self):
        """The text encoder's transformers config: the graph's only attention layers."""
        return self.text_tower.config

    @property
    def causal_attention(self) -> bool:
        return self.text_tower.causal_attention

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image: Tensor,
                has_image: Tensor, has_text: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, v, length = input_ids.shape
        views = self.text_tower(input_ids.reshape(b * v, length),
                                attention_mask.reshape(b * v, length)).reshape(b, v, -1)
        fused, scores, image = self.fusion(views, image, has_image, has_text)
        return fused, scores, image, views


class ClipTowers:
    """The two towers, the tokenizer and the image preprocessor of one checkpoint.

    ``attn_implementation`` is passed to transformers (``None``: its default, SDPA): the export
    of the ONNX Runtime-optimized graphs loads ``"eager"``, whose explicit softmax(QK^T)V is the
    pattern ONNX Runtime's attention fusion recognises; the weights are the same either way.
    """

    def __init__(self, source: str | Path, device: str | torch.device = "cpu",
                 random_init: bool = False, attn_implementation: str | None = None) -> None:
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # this package draws its own progress
        hf_logging.set_verbosity_error()
        self.source = str(source)
        self.random_init = random_init  # built from the config here (seed 0), not loaded
        try:
            if random_init:  # a config-only folder: realistic shapes, random weights
                torch.manual_seed(0)
                model = CLIPModel(CLIPConfig.from_pretrained(
                    self.source, attn_implementation=attn_implementation))
            else:
                model = CLIPModel.from_pretrained(self.source,
                                                 attn_implementation=attn_implementation)
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a CLIP checkpoint from {self.source!r}: "
                                 f"{first_line(exc)}") from None
        folder = Path(self.source)
        self.preprocess = (ClipImagePreprocessor.from_pretrained(folder)
                           if (folder / "preprocessor_config.json").exists()
                           else ClipImagePreprocessor(size=model.config.vision_config.image_size,
                                                      crop=model.config.vision_config.image_size))
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        self.dim = int(model.config.projection_dim)
        #: the weights are random: built here, or a checkpoint saved with random weights (the
        #: demo's tiny CLIP, marked in its config by :func:`~cliper_prod.features.tiny_clip.
        #: build_tiny_clip`)
        self.random_weights = random_init or bool(getattr(model.config, RANDOM_WEIGHTS_KEY,
                                                          False))
        self.device = torch.device(device)
        self.image_tower = ImageTower(model).eval().to(self.device)
        self.text_tower = TextTower(model).eval().to(self.device)
        self.token_ids = TokenCache(self._token_ids)
        # transformers' fast tokenizer may reset its Rust state on a call ("Already borrowed"
        # from a second thread); the embed pipeline tokenises on its decode threads
        self._tokenizer_lock = threading.Lock()

    @property
    def special(self) -> SpecialTokens:
        tok = self.tokenizer
        return SpecialTokens(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        with self._tokenizer_lock:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def tokenize(self, texts: list[str], chunk: bool = False) -> TokenizedViews:
        return self.pack(self.token_ids(texts), chunk)

    def pack(self, token_lists: list[list[int]], chunk: bool = False) -> TokenizedViews:
        """Pad to the model's positions; over-long texts cut, or chunked (see pack_tokens)."""
        return pack_tokens(token_lists, self.special, self.max_tokens, chunk)

    @torch.no_grad()
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """uint8 pixels (normalised here) or normalised float32 [B, 3, H, W] -> [B, D]."""
        if pixel_values.dtype == np.uint8:
            pixel_values = self.preprocess.normalise(pixel_values)
        x = torch.from_numpy(pixel_values).to(self.device)
        return self.image_tower(x).float().cpu().numpy()

    @torch.no_grad()
    def _text_embeddings(self, tokens: TokenizedViews) -> Tensor:
        """One embedding per text [T, D]: the rows of a chunked text are summed."""
        emb = self.text_tower(torch.from_numpy(tokens.input_ids).to(self.device),
                              torch.from_numpy(tokens.attention_mask).to(self.device)).float().cpu()
        return torch.zeros(len(tokens.truncated), emb.shape[1]).index_add_(
            0, torch.from_numpy(tokens.owner), emb)

    def encode_texts(self, texts: list[str], chunk: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [len(texts), D] and which texts were longer than the model's positions."""
        tokens = self.tokenize(texts, chunk)
        return self._text_embeddings(tokens).numpy(), tokens.truncated

    @torch.no_grad()
    def encode_views(self, tokens: TokenizedViews, image: np.ndarray, has_image: np.ndarray,
                     has_text: np.ndarray, mode: str, tau: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tokenised views of B items (rows owned by B*V texts), their image embeddings and
        presence flags -> (fused text, similarity, image feature, views), as numpy."""
        views = self._text_embeddings(tokens).reshape(len(image), -1, self.dim)
        out = ViewFusion(mode, tau)(views, torch.from_numpy(image), torch.from_numpy(has_image),
                                    torch.from_numpy(has_text))
        return (*(t.numpy() for t in out), views.numpy())

    def view_encoder(self, fusion: ViewFusion, padding_mask: bool = True) -> ViewEncoder:
        """The text+fusion module; ``padding_mask=False``: see :class:`TextTower`."""
        tower = self.text_tower if padding_mask else TextTower(self.text_tower, padding_mask)
        return ViewEncoder(tower, fusion).eval()
