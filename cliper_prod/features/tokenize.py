"""Token ids -> fixed-width model inputs, shared by the PyTorch and the ONNX Runtime paths.

Both paths get token ids from the same tokenizer definition (transformers' fast tokenizer, or
the ``tokenizers`` library reading the same ``tokenizer.json`` in a bundle) and pack them here,
so their inputs are identical by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Callable

import numpy as np

from cliper_prod.features.views import JoinedPrompt

if TYPE_CHECKING:
    import tokenizers


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


def library_token_ids(tokenizer: "tokenizers.Tokenizer", texts: list[str]) -> list[list[int]]:
    """Ids from the ``tokenizers`` library (a bundle's ``tokenizer.json``), without start and
    end tokens; ``encode_batch_fast`` from tokenizers 0.20 gives the same ids without
    computing character offsets."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


#: The CLIP tokenizer's pre-tokenizer pattern (a bundle's tokenizer.json): no alternative
#: matches whitespace, so no token is made across a space
CLIP_SPLIT = ("<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|"
              "[^\\s\\p{L}\\p{N}]+")
LOCAL_NORMALIZERS = ({"type": "NFC"}, {"type": "NFKC"}, {"type": "Lowercase"},
                     {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "})


def splits_at_spaces(tokenizer: "tokenizers.Tokenizer") -> bool:
    """Whether ``tokenizer`` is CLIP's kind, whose ids for ``a + " " + b`` are always a's ids
    then b's: normalizers that act on a character or a run of whitespace, CLIP's split
    pattern with the matches kept and the rest (whitespace) dropped, byte-level encoding of
    each piece with no prefix space, BPE without dropout, no added token holding a space."""
    config = json.loads(tokenizer.to_str())
    normalizer = config["normalizer"] or {"type": "Sequence", "normalizers": []}
    steps = normalizer["normalizers"] if normalizer["type"] == "Sequence" else [normalizer]
    pre = config["pre_tokenizer"] or {}
    return (all(step in LOCAL_NORMALIZERS for step in steps)
            and pre.get("type") == "Sequence" and len(pre["pretokenizers"]) == 2
            and pre["pretokenizers"][0] == {"type": "Split", "pattern": {"Regex": CLIP_SPLIT},
                                             "behavior": "Removed", "invert": True}
            and pre["pretokenizers"][1]["type"] == "ByteLevel"
            and not pre["pretokenizers"][1]["add_prefix_space"]
            and config["model"]["type"] == "BPE" and config["model"]["dropout"] is None
            and not any(any(c.isspace() for c in t["content"]) for t in config["added_tokens"]))


class TokenCache:
    """A tokenizer's ids for a list of texts, each distinct text tokenised once: a catalog's
    prompts repeat (brands, categories, "... is Missing.", whole items in a test catalog), and
    a text's ids do not depend on the texts beside it, so looking them up gives the same ids
    by construction. With ``joins`` (a tokenizer for which :func:`splits_at_spaces` holds) a
    :class:`~cliper_prod.features.views.JoinedPrompt`'s ids are its pieces' ids one after
    another: an item's global view costs no tokenising beyond its field views'. Holds at most
    ``capacity`` texts (then starts afresh: the repeated ones come back at once); safe to share
    between threads (the dict in use is only added to).
    """

    def __init__(self, encode: Callable[[list[str]], list[list[int]]],
                 capacity: int = 4096, joins: bool = False) -> None:
        self.encode, self.capacity, self.joins = encode, capacity, joins
        self.known: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if not self.joins:
            return self.lookup(texts)
        joined = [t for t in texts if isinstance(t, JoinedPrompt)]
        if not joined:
            return self.lookup(texts)
        plain = [t for t in texts if not isinstance(t, JoinedPrompt)]
        plain += [p for t in joined for p in t.pieces]
        ids = dict(zip(plain, self.lookup(plain)))
        return [list(chain.from_iterable(ids[p] for p in t.pieces))
                if isinstance(t, JoinedPrompt) else ids[t] for t in texts]

    def lookup(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, from the cache or the tokenizer."""
        known = self.known
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        fresh = dict(zip(missing, self.encode(missing))) if missing else {}
        ids = [fresh[t] if t in fresh else known[t] for t in texts]
        if len(known) + len(fresh) > self.capacity:
            self.known = fresh
        else:
            known.update(fresh)
        return ids


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
