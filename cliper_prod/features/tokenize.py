"""Token ids -> fixed-width model inputs, shared by the PyTorch and the ONNX Runtime paths.

Both paths get token ids from the same tokenizer definition (transformers' fast tokenizer, or
the ``tokenizers`` library reading the same ``tokenizer.json`` in a bundle) and pack them here,
so their inputs are identical by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int


@dataclass
class TokenizedViews:
    input_ids: np.ndarray  # int64 [N, L]
    attention_mask: np.ndarray  # int64 [N, L]
    truncated: np.ndarray  # bool [T]: the text had more tokens than the model's positions
    owner: np.ndarray  # int64 [N]: index of the text each row belongs to (chunking adds rows)


def pack_tokens(token_lists: list[list[int]], special: SpecialTokens, max_tokens: int,
                chunk: bool = False) -> TokenizedViews:
    """Wrap each text's ids in start/end tokens and pad to ``max_tokens``.

    Over-long texts are cut at the token level, or with ``chunk`` split into consecutive
    windows, one row each (their embeddings are summed downstream: the authors' approach).
    Built with array indexing, not a loop per text: the driver thread packs every batch.
    """
    body = max_tokens - 2  # room for the start and end tokens
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    flat = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=lengths.sum())
    starts = np.cumsum(lengths) - lengths  # each text's offset in ``flat``
    windows = np.maximum(-(-lengths // body), 1) if chunk else np.ones_like(lengths)
    owner = np.repeat(np.arange(len(token_lists)), windows)
    window = np.arange(len(owner)) - np.repeat(np.cumsum(windows) - windows, windows)
    offset = window * body  # of each row's first token within its text
    taken = np.clip(lengths[owner] - offset, 0, body)  # tokens in each row
    rows, columns = np.nonzero(np.arange(body) < taken[:, None])
    input_ids = np.full((len(owner), max_tokens), special.pad, dtype=np.int64)
    input_ids[:, 0] = special.bos
    input_ids[rows, columns + 1] = flat[starts[owner][rows] + offset[rows] + columns]
    input_ids[np.arange(len(owner)), taken + 1] = special.eos
    mask = (np.arange(max_tokens) < (taken + 2)[:, None]).astype(np.int64)
    return TokenizedViews(input_ids, mask, lengths > body, owner.astype(np.int64))
