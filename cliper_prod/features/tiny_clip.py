"""A small random-weight CLIP checkpoint folder, built locally for the demo and the tests.

No pretrained CLIP weights can be downloaded on the machines this package is developed on, so
the built-in default job builds one from a config: real ``CLIPModel`` architecture, a word-level
tokenizer over the catalog's own words, random weights. Its embeddings prove the plumbing, not
semantic quality, and everything that uses it says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch

from cliper_prod.features.clip_towers import RANDOM_WEIGHTS_KEY
from cliper_prod.features.image_preprocess import CLIP_MEAN, CLIP_STD

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "[UNK]"]


def _word_tokenizer(words: Iterable[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIALS[0],
                                   eos_token=SPECIALS[1], pad_token=SPECIALS[1],
                                   unk_token=SPECIALS[2])


def build_tiny_clip(folder: Path, texts: Iterable[str], image_size: int = 32, dim: int = 32,
                    max_tokens: int = 77, seed: int = 0) -> Path:
    """Write a loadable CLIP checkpoint folder (config, weights, tokenizer, preprocessor)."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    words = {w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())}
    tokenizer = _word_tokenizer(words)
    layers = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=max_tokens,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **layers),
        vision_config=dict(image_size=image_size, patch_size=8, **layers),
        projection_dim=dim, **{RANDOM_WEIGHTS_KEY: True})
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": image_size}, "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size}, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
        "image_processor_type": "CLIPImageProcessor"}, indent=2))
    (folder / "README.txt").write_text("Random-weight CLIP built by cliper-prod for the demo and "
                                       "tests: real architecture, no pretrained knowledge.\n")
    return folder
