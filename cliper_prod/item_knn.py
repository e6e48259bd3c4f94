"""Each item's k nearest items by cosine: the item graph of FREEDOM and LATTICE.

``exact`` is brute force in torch (chunks of rows against the whole catalog, on the features'
device): O(n^2 d) time, hours at a million items on a CPU. The faiss methods run on the CPU
with inner product over unit rows: ``faiss-flat`` exact as well (blocked BLAS), ``faiss-ivf``
and ``faiss-hnsw`` approximate, for large catalogs. An approximate graph logs its recall@k
against exact neighbours on a sample of items (:func:`sampled_recall`), so a run says how much
of the exact graph it kept. Every method includes the item itself, as FREEDOM does.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cliper_prod.errors import ConfigError

log = logging.getLogger(__name__)
RECALL_SAMPLE = 1000  # items whose exact neighbours an approximate graph is checked against


def _exact(normed: Tensor, k: int, chunk: int = 4096) -> Tensor:
    return torch.cat([torch.topk(normed[s:s + chunk] @ normed.T, k, dim=1).indices
                      for s in range(0, len(normed), chunk)])


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("knn_method faiss-*: faiss is not installed (pip install "
                          "'cliper-prod[faiss]'), or use knn_method = \"exact\"") from None
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _ivf_lists(n: int) -> int:
    """About 4 sqrt(n) lists, each trained on at least 39 points (faiss' minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _faiss_search(factory: Callable[[object, int, int], object], nprobe: int | None = None):
    def search(normed: Tensor, k: int) -> Tensor:
        faiss = _faiss()
        x = np.ascontiguousarray(normed.detach().cpu().numpy(), dtype=np.float32)
        index = factory(faiss, x.shape[1], len(x))
        if not index.is_trained:
            sample = np.random.default_rng(0).permutation(len(x))[:256 * index.nlist]
            index.train(x[sample])
        index.add(x)
        if nprobe is not None:
            index.nprobe = nprobe
        _, neighbours = index.search(x, k)
        if (neighbours < 0).any():  # fewer than k found (sparse IVF lists): repeat self
            own = np.arange(len(x))[:, None]
            neighbours = np.where(neighbours < 0, own, neighbours)
        return torch.from_numpy(neighbours).to(normed.device)
    return search


def _flat(faiss, dim: int, n: int):
    return faiss.IndexFlatIP(dim)


def _ivf(faiss, dim: int, n: int):
    return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, _ivf_lists(n),
                              faiss.METRIC_INNER_PRODUCT)


def _hnsw(faiss, dim: int, n: int):
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction, index.hnsw.efSearch = 80, 128
    return index


#: name -> (search(unit rows, k) -> neighbour ids [n, k], approximate?)
KNN_METHODS: dict[str, tuple[Callable[[Tensor, int], Tensor], bool]] = {
    "exact": (_exact, False),
    "faiss-flat": (_faiss_search(_flat), False),
    "faiss-ivf": (_faiss_search(_ivf, nprobe=32), True),
    "faiss-hnsw": (_faiss_search(_hnsw), True),
}


def check_method(method: str) -> None:
    if method not in KNN_METHODS:
        raise ConfigError(f"knn_method must be one of {sorted(KNN_METHODS)}, got {method!r}")


def knn_neighbours(features: Tensor, k: int, method: str = "exact") -> Tensor:
    """[n, k] ids of each row's k most cosine-similar rows (itself included)."""
    check_method(method)
    search, approximate = KNN_METHODS[method]
    normed = torch.nn.functional.normalize(features.detach(), dim=1)
    neighbours = search(normed, k)
    if approximate:
        log.info("item kNN graph (%s, %d items): recall@%d against exact on %d sampled items "
                 "= %.4f", method, len(normed), k, min(RECALL_SAMPLE, len(normed)),
                 sampled_recall(normed, neighbours, k))
    return neighbours


def sampled_recall(normed: Tensor, neighbours: Tensor, k: int, sample: int = RECALL_SAMPLE,
                   seed: int = 0) -> float:
    """Share of the exact k neighbours of ``sample`` random rows that ``neighbours`` holds."""
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(rng.choice(len(normed), min(sample, len(normed)), replace=False))
    exact = torch.topk(normed[rows.to(normed.device)] @ normed.T, k, dim=1).indices.cpu()
    got = neighbours[rows.to(neighbours.device)].cpu()
    hits = (exact.unsqueeze(2) == got.unsqueeze(1)).any(2).sum()
    return float(hits) / exact.numel()
