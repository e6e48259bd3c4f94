"""The encoders' token cache against the uncached tokenizer: the real CLIP tokenizer's ids for
the synthetic catalog's view prompts and for odd strings, batch after batch, with repeats
within and across batches and the cache starting afresh when full; global views tokenised from
their pieces equal to the whole text's ids, and refused for tokenizers where they would not be."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
from cliper_prod.features.catalog import Catalog, read_catalog
from cliper_prod.features.items import Item
from cliper_prod.features.tokenize import TokenCache, library_token_ids, splits_at_spaces
from cliper_prod.features.views import JoinedPrompt, ViewSpec

SKELETON = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinyclip-8m-skeleton"
ODD = ["", " ", "  two  spaces  ", "tab\tand\nnewline", "UPPER lower MiXeD", "it's we're I'd",
       "naïve café", "e\u0301 combining", "Ünïcödé ß ﬁ", "数字 中文 日本語", "emoji 👶🍼",
       "<|endoftext|> <|startoftext|>", "1234567890 3.14 -7", "a" * 300, "!!! ??? ...",
       "zero\u200bwidth", "\u00a0no-break space", "ǅ title-case"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    if not SKELETON.exists():
        pytest.skip("../shared/models not present")
    tok = Tokenizer.from_file(str(SKELETON / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def catalog_prompts(folder: Path) -> list[str]:
    """The synthetic catalog's view prompts, then views of items whose fields are odd strings
    (in every field, with some fields missing)."""
    root = generate_catalog(folder, SyntheticSpec(n_users=40, n_items=300))
    spec = ViewSpec()
    items = [r.fields for r in read_catalog(Catalog.at(root / "items.jsonl"))
             if isinstance(r, Item)]
    items += [{name: ODD[(i + k) % len(ODD)] for k, name in enumerate(spec.fields)
               if (i + k) % 3} for i in range(len(ODD))]
    return [v for fields in items for v in spec.build(fields)]


def uncached(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch([str(t) for t in texts],
                                                  add_special_tokens=False)]


def test_cached_ids_equal_the_tokenizer(tokenizer, tmp_path: Path) -> None:
    prompts = catalog_prompts(tmp_path / "catalog")
    assert len(set(prompts)) < 0.6 * len(prompts)  # brands, categories, "Missing" repeat
    assert sum(isinstance(p, JoinedPrompt) for p in prompts) == len(prompts) // 5
    texts = prompts + ODD + ODD[::-1] + prompts[:50]
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(texts)), 40, replace=False))
    batches = [list(b) for b in np.split(np.array(texts, dtype=object), cuts)]
    assert splits_at_spaces(tokenizer)
    calls: list[int] = []

    def counted(texts: list[str]) -> list[list[int]]:
        assert not any(isinstance(t, JoinedPrompt) for t in texts) or not joins
        calls.append(len(texts))
        return library_token_ids(tokenizer, texts)

    for joins in (False, True):
        tokenised = {}
        for capacity in (10_000, 64):  # everything kept; starting afresh many times
            cache = TokenCache(counted, capacity, joins)
            calls.clear()
            for batch in batches:
                assert cache(batch) == uncached(tokenizer, batch)
                assert len(cache.known) <= max(capacity, 2 * len(batch) + 2)
            tokenised[capacity] = sum(calls)
        # each distinct text once (global views not at all when joined); more once full
        assert tokenised[10_000] == (len(set(texts)) if not joins else
                                     len({p for t in texts for p in getattr(t, "pieces", [t])}))
        assert tokenised[64] > tokenised[10_000]


def variant(tokenizer, change) -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer

    config = json.loads(tokenizer.to_str())
    change(config)
    return Tokenizer.from_str(json.dumps(config))


def prefix_space(config: dict) -> None:
    config["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True


def keep_spaces(config: dict) -> None:  # the split keeps what its pattern does not match
    config["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Isolated"


def words_with_spaces(config: dict) -> None:  # a word keeps the space after it
    config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\S+\\s?"


def test_joining_is_refused_where_it_would_change_the_ids(tokenizer) -> None:
    view = ViewSpec().build({"title": "Soft blanket", "brand": "Dreamo"})[-1]
    assert isinstance(view, JoinedPrompt)
    for change in (prefix_space, keep_spaces, words_with_spaces,
                   lambda c: c["normalizer"]["normalizers"].append({"type": "Strip",
                                                                    "strip_left": True,
                                                                    "strip_right": True}),
                   lambda c: c["model"].update(dropout=0.1)):
        assert not splits_at_spaces(variant(tokenizer, change))
    # what the refusal prevents: pieces' ids that are not the text's (the guard refuses more
    # than it must: a prefix space or a strip would still join exactly)
    for change in (keep_spaces, words_with_spaces):
        other = variant(tokenizer, change)
        pieces = library_token_ids(other, list(view.pieces))
        assert [i for ids in pieces for i in ids] != library_token_ids(other, [view])[0]


@pytest.mark.parametrize("template, joined", [
    ("The product descriptions are: {}", True), ("{}", True), ("{} (all of it)", True),
    ("Descriptions:{}", False), ("{}.", False), ("{{literal}} {}", False)])
def test_global_view_is_joined_only_on_spaces(template: str, joined: bool) -> None:
    spec = ViewSpec(global_template=template)
    fields = {"title": "Soft blanket", "categories": "Baby, Bedding"}
    views = spec.build(fields)
    want = template.format(" ".join(spec.templates[n].format(fields[n])
                                    for n in spec.fields if n in fields))
    assert views[-1] == want and isinstance(views[-1], JoinedPrompt) == joined
    if joined:
        before, *parts, after = views[-1].pieces
        assert before + " ".join(parts) + after == want and parts == [views[0], views[2]]


def test_encode_batch_fast_equals_encode_batch(tokenizer) -> None:
    texts = ODD + ViewSpec().build({"title": "Soft blanket", "brand": "Dreamo"})
    assert library_token_ids(tokenizer, texts) == uncached(tokenizer, texts)
