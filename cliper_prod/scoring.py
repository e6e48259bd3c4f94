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

:class:`CandidateTopKScorer` is the GPU form of the same graph (same inputs and outputs): no
loop, an fp16 table selects candidates that are re-scored exactly in fp32 (see its docstring).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cliper_prod.topk_layout import FLOOR, chunked_table


class TopKScorer(nn.Module):
    def __init__(self, item_emb: Tensor, k: int, chunk_items: int = 1 << 16) -> None:
        super().__init__()
        n_items, dim = item_emb.shape
        self.k = min(int(k), n_items)
        self.dim = int(dim)  # of the queries
        self.chunk = int(min(chunk_items, n_items))
        self.per_chunk = min(self.k, self.chunk + 1)  # spare column: ranks last, dropped
        self.floor = FLOOR
        table = chunked_table(item_emb.detach().float().cpu().numpy(), self.chunk)
        for name, array in table.items():  # "chunks", "firsts": names the graph keeps
            self.register_buffer(name, torch.from_numpy(array))

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


#: Scale of the fp16 table: unit queries against items of norm at most this keep every partial
#: dot product (bounded by the item's norm) far inside fp16's range (65504).
COARSE_NORM = 2.0 ** 14


def default_candidates(k: int) -> int:
    """Candidates the GPU form re-scores by default: a wide margin over fp16's rounding."""
    return max(4 * k, 2048)


class CandidateTopKScorer(nn.Module):
    """The GPU form of :class:`TopKScorer`: same inputs, outputs and exclusions, no loop.

    The whole catalog is scored in one MatMul against an fp16 copy of the table (rows scaled to
    a largest norm of :data:`COARSE_NORM`, queries to unit norm: a positive factor per row, so
    the order is unchanged and fp16 cannot overflow); excluded pairs score ``-inf`` there. Its
    top ``candidates`` items are re-scored exactly in fp32, in item order, by a MatMul of two
    rows (the query and a spare zero row) as in :class:`TopKScorer`, which on ONNX Runtime's
    CPU provider gives the CPU form's very floats (tested), and the top K of those is the
    answer, ties to the lower item as in the CPU form. A candidate that was excluded (``-inf``
    in fp16) stays ``-inf``.

    Exactness: the answer equals the exact top K whenever every item of the exact top K is among
    the fp16 top ``candidates``. That can fail in principle: fp16 keeps 11 significant bits, so
    an item of the top K can be missed when more than ``candidates - K`` other items score
    within about 2^-10 of the query-item norm product of it in fp16 (a catalog of near-duplicates
    around the K-th score), or when top scores fall below fp16's normal range (2^-14 after the
    scaling: items some 2^28 times shorter than the longest), where fp16 keeps fewer bits.
    ``candidates`` is an export option (``--candidates``); the benchmarks and tests measure
    recall against the exact answer.

    With ``blocks`` > 1 the candidates are chosen in two levels: the row is cut into ``blocks``
    equal blocks (padded with ``-inf``), each keeps its own top ``candidates``, and the top
    ``candidates`` of those survivors are kept: the same set, ties included (every one of the
    row's top ``candidates`` is among its block's), but a selection kernel that gives each row
    to one thread block (ONNX Runtime's CUDA TopK) gets ``blocks`` times the parallel work, which
    matters for small batches. On the CPU it only adds work.

    Memory is [B, N] fp16 for the coarse scores: the runtime runs it for batches whose matrix
    fits (see :mod:`cliper_prod.runtime.topk_forms`).
    """

    def __init__(self, item_emb: Tensor, k: int, candidates: int | None = None,
                 blocks: int = 1) -> None:
        super().__init__()
        n_items, dim = item_emb.shape
        items = item_emb.detach().float()
        self.k = min(int(k), n_items)
        self.dim = int(dim)
        wanted = default_candidates(self.k) if candidates is None else int(candidates)
        self.candidates = min(max(wanted, self.k), n_items)
        self.blocks = max(1, min(int(blocks), n_items // self.candidates))
        self.block = -(-n_items // self.blocks)
        self.per_block = min(self.candidates, self.block)
        self.n_items = n_items
        scale = COARSE_NORM / items.norm(dim=1).max().clamp_min(1e-30)
        self.register_buffer("coarse", (items * scale).T.contiguous().half())  # [D, N]
        self.register_buffer("table", items.contiguous())  # [N, D]

    def forward(self, queries: Tensor, exclude_rows: Tensor, exclude_items: Tensor
                ) -> tuple[Tensor, Tensor]:
        unit = queries / queries.norm(dim=1, keepdim=True).clamp_min(1e-30)
        coarse = unit.half() @ self.coarse  # [B, N]
        coarse = coarse.index_put((exclude_rows, exclude_items),
                                  coarse.new_full((), float("-inf")))
        top, ids = self._candidates(coarse)
        ids, order = ids.topk(self.candidates, dim=1, largest=False)  # item order: fp32 ties
        rankable = top.gather(1, order) > float("-inf")
        # a spare zero row, as in TopKScorer: ONNX Runtime's one-row MatMul rounds differently
        pair = torch.stack([queries, torch.zeros_like(queries)], dim=1)  # [B, 2, D]
        rows = self.table.index_select(0, ids.reshape(-1).clamp(max=self.n_items - 1))
        exact = (pair @ rows.reshape(*ids.shape, self.dim).transpose(1, 2))[:, 0]
        exact = torch.where(rankable, exact, float("-inf"))
        best, at = exact.topk(self.k, dim=1)
        real = best > float("-inf")
        return torch.where(real, ids.gather(1, at), -1), best

    def _candidates(self, coarse: Tensor) -> tuple[Tensor, Tensor]:
        """The top ``candidates`` of each row of ``coarse`` [B, N] and their items, in one
        level or in two (see the class docstring; padding items score ``-inf``)."""
        if self.blocks == 1:
            return coarse.topk(self.candidates, dim=1)
        batch = coarse.shape[0]
        padded = torch.nn.functional.pad(coarse, (0, self.blocks * self.block - self.n_items),
                                         value=float("-inf"))
        top, local = padded.reshape(batch, self.blocks, self.block).topk(self.per_block, dim=2)
        firsts = torch.arange(self.blocks, device=coarse.device).unsqueeze(1) * self.block
        top, keep = top.reshape(batch, -1).topk(self.candidates, dim=1)
        return top, (local + firsts).reshape(batch, -1).gather(1, keep)
