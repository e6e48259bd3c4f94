"""Graph construction and propagation for the backbones, on torch-geometric's utilities.

Adjacency matrices are ``torch.sparse_csr_tensor`` with rows = target nodes (torch-geometric's
``adj_t`` form), wrapped in :class:`Propagation`, which multiplies like ``LGConv``'s ``spmm`` but
keeps the transpose for the backward pass: torch re-sorts a CSR matrix into its transpose on every
backward, which made training 2-3x slower on CPU (measured, see BENCHMARKS.md).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import degree, to_torch_csr_tensor, to_undirected

from cliper_prod.item_knn import knn_neighbours


#: rows of A per product in a blocked ``A @ x``
BLOCK_ROWS = 1 << 18


def _product(adj: Tensor, x: Tensor, blocked: bool) -> Tensor:
    """``adj @ x`` for a CSR ``adj``; ``blocked``: BLOCK_ROWS rows at a time, written into the
    result. One CSR @ dense product holds about twice its result at its peak (measured: 2.2 x
    [nodes, d] on 1.3M nodes); by blocks, the result plus one block's: the same values."""
    if not blocked or adj.shape[0] <= BLOCK_ROWS:
        return adj @ x
    crow, col, val = adj.crow_indices(), adj.col_indices(), adj.values()
    out = torch.empty(adj.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    for first in range(0, adj.shape[0], BLOCK_ROWS):
        last = min(first + BLOCK_ROWS, adj.shape[0])
        lo, hi = int(crow[first]), int(crow[last])
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            block = torch.sparse_csr_tensor(crow[first:last + 1] - lo, col[lo:hi], val[lo:hi],
                                            (last - first, adj.shape[1]))
        torch.mm(block, x, out=out[first:last])
    return out


class _CachedTransposeMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adj: Tensor, adj_t: Tensor, x: Tensor,  # type: ignore[override]
                blocked: bool) -> Tensor:
        ctx.adj_t, ctx.blocked = adj_t, blocked
        return _product(adj, x, blocked)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor, None]:  # type: ignore[override]
        return None, None, _product(ctx.adj_t, grad, ctx.blocked), None


class Propagation:
    """A fixed sparse matrix A applied as ``A @ x`` with gradient ``A^T @ grad`` from a cached A^T."""

    def __init__(self, adj: Tensor, symmetric: bool) -> None:
        self.adj = adj
        self.adj_t = adj if symmetric else _csr(adj.to_sparse_coo().t())

    def __call__(self, x: Tensor, blocked: bool = False) -> Tensor:
        """``A @ x``; ``blocked``: by blocks of rows (:func:`_product`), less memory."""
        return _CachedTransposeMatmul.apply(self.adj, self.adj_t, x, blocked)

    def transposed(self) -> Propagation:
        """A^T as a Propagation, from the cached transpose (no copy): a gradient taken by hand
        propagates through it."""
        out = Propagation.__new__(Propagation)
        out.adj, out.adj_t = self.adj_t, self.adj
        return out

    def to_dense(self) -> Tensor:
        return self.adj.to_dense()


def propagation_layers(adj: Propagation, ego: Tensor, n_layers: int) -> list[Tensor]:
    """The layer outputs 0..n_layers of repeated normalised-adjacency propagation (a new user's
    fold-in reads the items' layers 0..n_layers-1)."""
    layers = [ego]
    for _ in range(n_layers):
        layers.append(adj(layers[-1]))
    return layers


def light_propagate(adj: Propagation, ego: Tensor, n_layers: int, lean: bool = False,
                    owned: bool = False) -> Tensor:
    """Mean of the layer outputs 0..n_layers of repeated normalised-adjacency propagation.

    ``lean`` sums the layers as they come instead of stacking them: about three [nodes, d]
    tables are alive at once instead of 2 x (n_layers + 1) (the stack copies every layer), in
    training and evaluation alike. The propagation itself keeps no layer for the backward pass
    (A^T @ grad needs none), so nothing is gained by recomputing layers (checkpointing). The
    sum adds in another order than the stack's mean: equal up to float rounding. Each product
    goes by blocks of rows (:func:`_product`). ``owned``
    (the caller gives ``ego`` up) with ``lean`` and no gradient recorded sums into ``ego``
    itself, one table fewer: ego, the layer and the next one.
    """
    if not lean:
        return torch.stack(propagation_layers(adj, ego, n_layers)).mean(0)
    in_place = owned and not (torch.is_grad_enabled() and ego.requires_grad)
    total, layer = ego, ego
    for _ in range(n_layers):
        layer = adj(layer, blocked=True)
        total = total.add_(layer) if in_place else total + layer
    return total.div_(n_layers + 1) if in_place else total / (n_layers + 1)


def _csr(adj: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is stable
        warnings.simplefilter("ignore", UserWarning)
        return adj.coalesce().to_sparse_csr()


def bipartite_edge_index(users: Tensor, items: Tensor, n_users: int) -> Tensor:
    """Undirected user-item edges on one node set: users 0..n_users-1, items after them."""
    return to_undirected(torch.stack([users, items + n_users]))


def normalized_adjacency(edge_index: Tensor, num_nodes: int) -> Propagation:
    """D^-1/2 A D^-1/2 of an undirected graph (LightGCN's and FREEDOM's user-item propagation)."""
    edge_index, weight = gcn_norm(edge_index, None, num_nodes, add_self_loops=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adj = to_torch_csr_tensor(edge_index, weight, size=(num_nodes, num_nodes))
        # its column indices are a view of edge_index: a copy frees the row indices (0.55 GiB
        # of int64 at 74M edges)
        adj = torch.sparse_csr_tensor(adj.crow_indices(), adj.col_indices().clone(),
                                      adj.values(), adj.size())
    return Propagation(adj, symmetric=True)


def mean_adjacency(edge_index: Tensor, num_nodes: int) -> Propagation:
    """D^-1 A over edges (source, target): each target's mean of its sources, torch-geometric's
    ``aggr='mean'`` without the scatter (MMGCN's convolution); isolated nodes get zeros."""
    source, target = edge_index
    weight = degree(target, num_nodes).reciprocal()[target]
    return fixed_propagation(torch.stack([target, source]), weight, num_nodes)


def co_occurrence_neighbours(users: Tensor, items: Tensor, n_users: int, n_items: int, k: int
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Each user's (at most) k other users sharing the most items, most shared first, ties by
    lower id: neighbour ids [n_users, k], shared-item counts [n_users, k] (0 past the end) and
    how many each user has. One sparse product R R^T: no dense n_users x n_users matrix."""
    device = users.device
    r = torch.sparse_coo_tensor(torch.stack([users, items]),
                                torch.ones(len(users), device=device), (n_users, n_items),
                                check_invariants=False).coalesce()
    r = torch.sparse_coo_tensor(r.indices(), torch.ones_like(r.values()), r.shape,
                                check_invariants=False)  # repeated pairs count once
    with warnings.catch_warnings():  # sparse CSR is "beta"; sparse @ sparse is stable
        warnings.simplefilter("ignore", UserWarning)
        shared = torch.sparse.mm(r, r.t()).coalesce()
    (row, col), count = shared.indices(), shared.values().round().long()
    off_diagonal = row != col
    row, col, count = row[off_diagonal], col[off_diagonal], count[off_diagonal]
    # coalesced order is (row, col); a stable sort by (row, -count) keeps lower ids first on ties
    top = int(count.max()) if len(count) else 0
    order = torch.sort(row * (top + 1) + (top - count), stable=True).indices
    row, col, count = row[order], col[order], count[order]
    per_user = torch.bincount(row, minlength=n_users)
    rank = torch.arange(len(row), device=device) - (torch.cumsum(per_user, 0) - per_user)[row]
    keep = rank < k
    neighbours = torch.zeros(n_users, k, dtype=torch.long, device=device)
    counts = torch.zeros(n_users, k, device=device)
    neighbours[row[keep], rank[keep]] = col[keep]
    counts[row[keep], rank[keep]] = count[keep].float()
    return neighbours, counts, per_user.clamp(max=k)


def bipartite_edge_weights(users: Tensor, items: Tensor, n_users: int, n_items: int) -> Tensor:
    """1/sqrt(deg(u) deg(i)) of each user-item edge: FREEDOM's pruning probabilities."""
    du = degree(users, n_users)
    di = degree(items, n_items)
    return (du[users] * di[items]).rsqrt()


#: torch.multinomial's largest category count.
MULTINOMIAL_MAX = 2 ** 24


def weighted_sample(weights: Tensor, n: int, generator: torch.Generator | None = None,
                    multinomial_max: int = MULTINOMIAL_MAX) -> Tensor:
    """``n`` distinct indices drawn without replacement with probability proportional to
    ``weights``. torch.multinomial where it can (up to ``multinomial_max`` categories: the
    draws every run up to this size made); beyond it (FREEDOM's pruning at 5M users has 74M
    edges) the same distribution by exponential keys (Efraimidis-Spirakis): each index gets
    E/w with E ~ Exp(1) and the ``n`` smallest keys are kept, found as the complement of the
    largest so that the common case (most edges kept) sorts the few dropped ones."""
    if len(weights) <= multinomial_max:
        return torch.multinomial(weights, n, replacement=False, generator=generator)
    keys = torch.empty_like(weights, dtype=torch.float32).exponential_(generator=generator)
    keys /= weights
    drop = torch.topk(keys, len(weights) - n, sorted=False).indices
    kept = torch.ones(len(weights), dtype=torch.bool, device=weights.device)
    kept[drop] = False
    return kept.nonzero().squeeze(1)


def degree_sensitive_prune(users: Tensor, items: Tensor, n_users: int, n_items: int,
                           keep_ratio: float, generator: torch.Generator | None = None
                           ) -> Propagation:
    """FREEDOM's edge pruning: keep ``keep_ratio`` of the edges, sampled without replacement with
    probability proportional to 1/sqrt(deg(u) deg(i)), and renormalise the kept graph.
    ``generator`` must be on the edges' device."""
    weights = bipartite_edge_weights(users, items, n_users, n_items)
    n_keep = int(len(users) * keep_ratio)
    keep = weighted_sample(weights, n_keep, generator)
    edge_index = bipartite_edge_index(users[keep], items[keep], n_users)
    return normalized_adjacency(edge_index, n_users + n_items)


def knn_edge_index(features: Tensor, k: int, method: str = "exact") -> Tensor:
    """Each item's k most cosine-similar items (itself included, as in FREEDOM), as (row, col),
    found by ``method`` (:data:`cliper_prod.item_knn.KNN_METHODS`)."""
    col = knn_neighbours(features, k, method)
    row = torch.arange(len(col), device=col.device).repeat_interleave(k)
    return torch.stack([row, col.reshape(-1)])


def knn_normalized_adjacency(features: Tensor, k: int, method: str = "exact") -> Tensor:
    """FREEDOM's item-item graph for one modality: kNN adjacency scaled by
    rowdeg(i)^-1/2 rowdeg(j)^-1/2 (MMRec normalises both sides with the row degree)."""
    edge_index = knn_edge_index(features, k, method)
    n = features.shape[0]
    inv_sqrt = degree(edge_index[0], n).rsqrt()
    weight = inv_sqrt[edge_index[0]] * inv_sqrt[edge_index[1]]
    return torch.sparse_coo_tensor(edge_index, weight, (n, n), check_invariants=False).coalesce()


def mixed_item_graph(graphs: dict[str, Tensor], image_weight: float) -> Propagation:
    """FREEDOM's frozen item graph: image_weight * image + (1 - image_weight) * text (or the one
    modality present)."""
    if not graphs:
        raise ValueError("FREEDOM needs at least one modality feature matrix")
    if len(graphs) == 1:
        (adj,) = graphs.values()
    else:
        adj = image_weight * graphs["image"] + (1.0 - image_weight) * graphs["text"]
    return Propagation(_csr(adj), symmetric=False)


def cosine_knn_graph(features: Tensor, k: int, method: str = "exact") -> tuple[Tensor, Tensor]:
    """Each item's k most cosine-similar items (itself included) weighted by that cosine, as
    (edge_index, weight). The choice of neighbours is fixed; the weights stay differentiable in
    ``features`` (what a dense top-k of the similarity matrix gives, without the dense matrix)."""
    with torch.no_grad():
        edge_index = knn_edge_index(features, k, method)
    normed = torch.nn.functional.normalize(features, dim=1)
    return edge_index, (normed[edge_index[0]] * normed[edge_index[1]]).sum(1)


def row_degree_normalize(edge_index: Tensor, weight: Tensor, num_nodes: int) -> Tensor:
    """w_ij / sqrt(d_i d_j) with d the weighted row sums, for a possibly asymmetric graph (MMRec's
    compute_normalized_laplacian); rows summing to zero get zero weight."""
    inv_sqrt = torch.zeros(num_nodes, dtype=weight.dtype, device=weight.device).index_add(
        0, edge_index[0], weight)
    inv_sqrt = inv_sqrt.pow(-0.5)
    inv_sqrt = inv_sqrt.masked_fill(torch.isinf(inv_sqrt), 0.0)
    return inv_sqrt[edge_index[0]] * weight * inv_sqrt[edge_index[1]]


def edge_matmul(edge_index: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """A @ x for a square graph given as weighted (row, col) edges, duplicates adding up;
    differentiable in both ``weight`` and ``x`` (a :class:`Propagation` is fixed)."""
    row, col = edge_index
    return torch.zeros_like(x).index_add(0, row, weight.unsqueeze(1) * x[col])


def fixed_propagation(edge_index: Tensor, weight: Tensor, num_nodes: int) -> Propagation:
    """A weighted edge list (duplicates summed) frozen into a :class:`Propagation`."""
    adj = torch.sparse_coo_tensor(edge_index, weight.detach(), (num_nodes, num_nodes),
                                  check_invariants=False)
    return Propagation(_csr(adj), symmetric=False)
