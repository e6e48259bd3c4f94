"""CLIP (or Long-CLIP) towers from a transformers checkpoint: a local folder or a hub id.

The projected embeddings are computed as ``text_projection(text_model(...).pooler_output)`` and
``visual_projection(vision_model(...).pooler_output)``: what ``CLIPModel.get_*_features``
return, written out so the same modules export to ONNX unchanged across transformers versions.
Long-CLIP is a CLIP whose text tower has 248 positions; the tokenizer's limit is taken from the
model's ``max_position_embeddings``, so both work through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cliper_prod.errors import CliperError
from cliper_prod.features.image_preprocess import ClipImagePreprocessor


class ModelLoadError(CliperError):
    exit_code = 6


class ImageTower(nn.Module):
    """pixel_values [B, 3, H, W] -> image embedding [B, D]."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class TextTower(nn.Module):
    """input_ids, attention_mask [B, L] -> text embedding [B, D]."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(out.pooler_output)


@dataclass
class TokenizedViews:
    input_ids: np.ndarray  # int64 [N, L]
    attention_mask: np.ndarray  # int64 [N, L]
    truncated: np.ndarray  # bool [N]: the text had more tokens than the model's positions
    owner: np.ndarray  # int64 [N]: index of the text each row belongs to (chunking adds rows)


class ClipTowers:
    """The two towers, the tokenizer and the image preprocessor of one checkpoint."""

    def __init__(self, source: str | Path, device: str | torch.device = "cpu",
                 random_init: bool = False) -> None:
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # this package draws its own progress
        self.source = str(source)
        self.random_init = random_init
        try:
            if random_init:  # a config-only folder: realistic shapes, random weights
                torch.manual_seed(0)
                clip = CLIPModel(CLIPConfig.from_pretrained(self.source))
            else:
                clip = CLIPModel.from_pretrained(self.source)
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a CLIP checkpoint from {self.source!r}: "
                                 f"{str(exc).splitlines()[0]}") from None
        folder = Path(self.source)
        self.preprocess = (ClipImagePreprocessor.from_pretrained(folder)
                           if (folder / "preprocessor_config.json").exists()
                           else ClipImagePreprocessor(size=clip.config.vision_config.image_size,
                                                      crop=clip.config.vision_config.image_size))
        self.max_tokens = int(clip.config.text_config.max_position_embeddings)
        self.dim = int(clip.config.projection_dim)
        self.device = torch.device(device)
        self.image_tower = ImageTower(clip).eval().to(self.device)
        self.text_tower = TextTower(clip).eval().to(self.device)

    def tokenize(self, texts: list[str], chunk: bool = False) -> TokenizedViews:
        """Pad to the model's positions. Over-long texts are cut at the token level, or with
        ``chunk`` split into consecutive windows whose embeddings are summed (the authors'
        approach; see :meth:`encode_texts`)."""
        tok = self.tokenizer
        body = self.max_tokens - 2  # room for start and end tokens
        ids, owner, truncated = [], [], []
        for i, text in enumerate(texts):
            tokens = tok(text, add_special_tokens=False)["input_ids"]
            truncated.append(len(tokens) > body)
            pieces = [tokens[s:s + body] for s in range(0, max(len(tokens), 1), body)]
            for piece in (pieces if chunk else pieces[:1]):
                ids.append([tok.bos_token_id, *piece, tok.eos_token_id])
                owner.append(i)
        input_ids = np.full((len(ids), self.max_tokens), tok.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return TokenizedViews(input_ids, mask, np.asarray(truncated), np.asarray(owner))

    @torch.no_grad()
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixel_values).to(self.device)
        return self.image_tower(x).float().cpu().numpy()

    @torch.no_grad()
    def encode_texts(self, texts: list[str], chunk: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [len(texts), D] and which texts were longer than the model's positions."""
        tv = self.tokenize(texts, chunk)
        emb = self.text_tower(torch.from_numpy(tv.input_ids).to(self.device),
                              torch.from_numpy(tv.attention_mask).to(self.device)).float().cpu()
        out = torch.zeros(len(texts), emb.shape[1]).index_add_(0, torch.from_numpy(tv.owner), emb)
        return out.numpy(), tv.truncated
