"""Token ids -> fixed-width model inputs, shared by the PyTorch and the ONNX Runtime paths.

Both paths get token ids from the same tokenizer definition (transformers' fast tokenizer, or
the ``tokenizers`` library reading the same ``tokenizer.json`` in a bundle) and pack them here,
so their inputs are identical by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """
    body = max_tokens - 2  # room for the start and end tokens
    rows, owner, truncated = [], [], []
    for i, tokens in enumerate(token_lists):
        truncated.append(len(tokens) > body)
        pieces = [tokens[s:s + body] for s in range(0, max(len(tokens), 1), body)]
        for piece in (pieces if chunk else pieces[:1]):
            rows.append([special.bos, *piece, special.eos])
            owner.append(i)
    input_ids = np.full((len(rows), max_tokens), special.pad, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for r, seq in enumerate(rows):
        input_ids[r, :len(seq)] = seq
        mask[r, :len(seq)] = 1
    return TokenizedViews(input_ids, mask, np.asarray(truncated, dtype=bool),
                          np.asarray(owner, dtype=np.int64))
