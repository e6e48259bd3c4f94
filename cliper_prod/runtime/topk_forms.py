"""Which form of a bundle's top-K graph ranks a batch: the CPU form (``topk.onnx``: one
``Scan`` over chunks of the table) or the GPU form (``topk.gpu.onnx``: fp16 candidates over the
whole catalog, re-scored in fp32; :class:`~cliper_prod.scoring.CandidateTopKScorer`).

On CUDA the GPU form ranks every batch, in runs of at most :data:`GPU_MATRIX_BYTES` of coarse
scores (the [rows, items] fp16 matrix and its excluded copy). On the CPU the GPU form ranks a
batch of at most the manifest's ``cpu_max_batch`` rows (the largest batch at which the export
measured it faster, at every measured size up to it), the CPU form the rest. A bundle without a
GPU form (written before it, or with ``--no-gpu-form``) runs the CPU form everywhere. Both forms
take and return the same arrays, and on the CPU, where both may run, they give a user the very
same floats (tested), so which one ran does not show in the answer (unless the GPU form's
candidates missed an item: see :class:`~cliper_prod.scoring.CandidateTopKScorer`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cliper_prod.bundle_format import GPU_FORM, PLAIN, TOPK_GRAPH, file_key
from cliper_prod.errors import BundleError
from cliper_prod.runtime.bundle_reader import Bundle

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
#: Most bytes of coarse scores one GPU-form run may hold: 2 bytes per score, twice (the fp16
#: matrix and the copy the exclusions are written into). 1,024 rows at a million items.
GPU_MATRIX_BYTES = 4 << 30


def pick_topk_form(record: dict[str, Any], provider: str, batch: int) -> str:
    """The form of the top-K graph (manifest ``record``) that ranks ``batch`` rows on
    ``provider`` (see the module docstring)."""
    if file_key("fp32", GPU_FORM) not in record["files"]:
        return PLAIN
    if provider == CUDA:
        return GPU_FORM
    return GPU_FORM if batch <= record[GPU_FORM].get("cpu_max_batch", 0) else PLAIN


class TopKGraph:
    """The bundle's top-K graph, called as one
    :class:`~cliper_prod.runtime.sessions.Graph` (same inputs and outputs); each batch runs the
    form :func:`pick_topk_form` picks, or ``form`` for every batch when one is asked for
    (benchmarks, tests). The forms that can be picked are loaded up front, so no request pays
    for a session."""

    def __init__(self, bundle: Bundle, form: str = "auto") -> None:
        if form not in ("auto", PLAIN, GPU_FORM):
            raise BundleError(f"top-K form must be auto, {PLAIN} or {GPU_FORM}; got {form!r}")
        self.record = bundle.manifest["graphs"][TOPK_GRAPH]
        self.provider = bundle.providers[0]
        self.form = form
        forms = {self.pick(batch) for batch in (1, 1 << 20)}
        self.forms = {name: bundle.graph(TOPK_GRAPH, variant=name) for name in sorted(forms)}
        self.rows_per_run = max(1, GPU_MATRIX_BYTES // (4 * int(self.record["n_items"])))
        log.debug("top-K forms on %s: %s", self.provider, sorted(self.forms))

    def pick(self, batch: int) -> str:
        """The form that ranks ``batch`` rows: :func:`pick_topk_form`, unless one was asked."""
        return pick_topk_form(self.record, self.provider, batch) if self.form == "auto" \
            else self.form

    @property
    def session(self) -> Any:
        """The session of the form large batches run (every form runs on the same provider)."""
        return self.forms[self.pick(1 << 20)].session

    def __call__(self, queries: np.ndarray, exclude_rows: np.ndarray,
                 exclude_items: np.ndarray) -> list[np.ndarray]:
        batch = len(queries)
        form = self.pick(batch)
        graph = self.forms[form]
        if form == PLAIN or batch <= self.rows_per_run:
            return graph(queries=queries, exclude_rows=exclude_rows, exclude_items=exclude_items)
        parts = []
        for start in range(0, batch, self.rows_per_run):
            mine = (exclude_rows >= start) & (exclude_rows < start + self.rows_per_run)
            parts.append(graph(queries=queries[start:start + self.rows_per_run],
                               exclude_rows=exclude_rows[mine] - start,
                               exclude_items=exclude_items[mine]))
        return [np.concatenate(outs) for outs in zip(*parts)]
