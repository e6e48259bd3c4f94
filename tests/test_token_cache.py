"""The encoders' token cache against the uncached tokenizer: the real CLIP tokenizer's ids for
the synthetic catalog's view prompts and for odd strings, batch after batch, with repeats
within and across batches and the cache starting afresh when full."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
from cliper_prod.features.catalog import Catalog, read_catalog
from cliper_prod.features.items import Item
from cliper_prod.features.tokenize import TokenCache, library_token_ids
from cliper_prod.features.views import ViewSpec

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
    root = generate_catalog(folder, SyntheticSpec(n_users=40, n_items=300))
    spec = ViewSpec()
    return [v for r in read_catalog(Catalog.at(root / "items.jsonl")) if isinstance(r, Item)
            for v in spec.build(r.fields)]


def test_cached_ids_equal_the_tokenizer(tokenizer, tmp_path: Path) -> None:
    prompts = catalog_prompts(tmp_path / "catalog")
    assert len(set(prompts)) < 0.6 * len(prompts)  # brands, categories, "Missing" repeat
    texts = prompts + ODD + ODD[::-1] + prompts[:50]
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(texts)), 40, replace=False))
    batches = np.split(np.array(texts, dtype=object), cuts)
    calls: list[int] = []

    def counted(texts: list[str]) -> list[list[int]]:
        calls.append(len(texts))
        return library_token_ids(tokenizer, texts)

    for capacity in (10_000, 64):  # everything kept; starting afresh many times
        cache = TokenCache(counted, capacity)
        calls.clear()
        for batch in batches:
            batch = list(batch)
            want = [e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=False)]
            assert cache(batch) == want
            assert len(cache.known) <= max(capacity, len(set(batch)))
        assert sum(calls) <= len(texts)
    assert sum(calls) > len(set(texts))  # the small cache did start afresh


def test_encode_batch_fast_equals_encode_batch(tokenizer) -> None:
    texts = ODD + ViewSpec().build({"title": "Soft blanket", "brand": "Dreamo"})
    assert library_token_ids(tokenizer, texts) == \
        [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
