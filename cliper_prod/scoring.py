"""Top-K recommendation over an item table: queries [B, D] -> items [B, K], scores [B, K].

:class:`TopKScorer` is the module the bundle exports (ONNX, TorchScript). Scores are dot
products; the pairs ``(exclude_rows[e], exclude_items[e])`` (a user's training items, given by
the runtime from the bundle's CSR tables, :mod:`cliper_prod.histories`) score ``-inf``. A user
with fewer than K rankable items gets item ``-1`` and score ``-inf`` at the tail, which the
runtime drops.

The catalog is scored in chunks of ``chunk_items`` items: each chunk's top K is merged into a
running top K, which is exact (every global winner wins its chunk) and bounds memory to
[B, chunk_items]. The loop is a loop in every form: ``scan`` in the ONNX graph (one copy of the
chunk body whatever the catalog's size), a plain loop in eager PyTorch and the TorchScript twin. The table is stored
chunk-major, [chunks, D + 1, chunk + 1]: the extra row gives padding items (past the last real
one) the score :data:`FLOOR`, and the extra column is where exclusions outside the chunk land,
so neither needs a copy of the scores.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Score of padding items: below every real score, above the -inf of excluded items.
FLOOR = -3.0e38


class TopKScorer(nn.Module):
    def __init__(self, item_emb: Tensor, k: int, chunk_items: int = 1 << 16) -> None:
        super().__init__()
        n_items, dim = item_emb.shape
        self.k = min(int(k), n_items)
        self.dim = int(dim)  # of the queries
        self.chunk = int(min(chunk_items, n_items))
        self.per_chunk = min(self.k, self.chunk + 1)  # spare column: ranks last, dropped
        self.floor = FLOOR
        n_chunks = -(-n_items // self.chunk)
        rows = torch.zeros(n_chunks * self.chunk, dim + 1)
        rows[:n_items, :dim] = item_emb.detach().float()
        rows[n_items:, dim] = FLOOR  # padding items
        spare = torch.zeros(n_chunks, 1, dim + 1)
        spare[..., dim] = FLOOR  # the column exclusions outside the chunk land in
        table = torch.cat([rows.reshape(n_chunks, self.chunk, dim + 1), spare], dim=1)
        self.register_buffer("chunks", table.transpose(1, 2).contiguous())
        self.register_buffer("firsts", torch.arange(n_chunks) * self.chunk)

    def forward(self, queries: Tensor, exclude_rows: Tensor, exclude_items: Tensor
                ) -> tuple[Tensor, Tensor]:
        batch = queries.shape[0]
        # one spare zero row: with two rows or more ONNX Runtime's MatMul over a non-constant
        # table (a Scan slice) rounds each row alike, with one it takes a GEMV path that rounds
        # differently, and a user's scores would depend on the batch they were ranked in
        lifted = torch.cat([torch.cat([queries, queries.new_ones(batch, 1)], dim=1),
                            queries.new_zeros(1, queries.shape[1] + 1)])
        best = queries.new_full((batch + 1, self.k), float("-inf"))
        owner = torch.zeros_like(best, dtype=torch.int64) - 1
        if torch.jit.is_scripting():
            best, owner = self._loop(lifted, exclude_rows, exclude_items, best, owner)
        else:
            best, owner = self._eager_or_export(lifted, exclude_rows, exclude_items, best, owner)
        best, owner = best[:batch], owner[:batch]
        real = best > self.floor / 2
        return torch.where(real, owner, -1), torch.where(real, best, float("-inf"))

    def _loop(self, lifted: Tensor, exclude_rows: Tensor, exclude_items: Tensor, best: Tensor,
              owner: Tensor) -> tuple[Tensor, Tensor]:
        for c in range(self.chunks.shape[0]):
            best, owner = self._step(lifted, exclude_rows, exclude_items, best, owner,
                                     self.chunks[c], self.firsts[c])
        return best, owner

    @torch.jit.unused
    def _eager_or_export(self, *args: Tensor) -> tuple[Tensor, Tensor]:
        """``scan`` while exporting (one chunk body in the graph), else the plain loop (eager
        ``scan`` would compile its body on every new shape)."""
        return self._scan(*args) if torch.compiler.is_exporting() else self._loop(*args)

    @torch.jit.unused
    def _scan(self, lifted: Tensor, exclude_rows: Tensor, exclude_items: Tensor, best: Tensor,
              owner: Tensor) -> tuple[Tensor, Tensor]:
        from torch._higher_order_ops.scan import scan

        def body(carry: tuple[Tensor, Tensor], xs: tuple[Tensor, Tensor]):
            merged = self._step(lifted, exclude_rows, exclude_items, *carry, *xs)
            return merged, xs[1].clone()  # scan needs a per-step output; it must not alias

        (best, owner), _ = scan(body, (best, owner), (self.chunks, self.firsts))
        return best, owner

    def _step(self, lifted: Tensor, exclude_rows: Tensor, exclude_items: Tensor, best: Tensor,
              owner: Tensor, chunk: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """Merge the top K of one chunk (training items excluded) into the running top K."""
        scores = lifted @ chunk  # [B, chunk + 1]
        local = exclude_items - first
        inside = (local >= 0) & (local < self.chunk)
        columns = torch.where(inside, local, self.chunk)
        scores = scores.index_put((exclude_rows, columns), scores.new_full((), float("-inf")))
        top, pos = scores.topk(self.per_chunk, dim=1)
        return merge_top_k(best, owner, top, pos + first, self.k)


def merge_top_k(best: Tensor, owner: Tensor, top: Tensor, top_owner: Tensor, k: int
                ) -> tuple[Tensor, Tensor]:
    """The k best of a running top K (scores ``best``, items ``owner``) and one chunk's top
    (``top``, ``top_owner``): exact, as every global winner wins its own chunk."""
    merged, keep = torch.cat([best, top], dim=1).topk(k, dim=1)
    return merged, torch.cat([owner, top_owner], dim=1).gather(1, keep)
