"""How close a graph's outputs are to a reference's: worst-row cosine and max abs error
(torch-free: ``add-items`` checks a new top-K table with it on a host without torch)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

FP32_BOUND = {"min_cosine": 0.99999, "max_abs": 1e-4}
FP16_BOUND = {"min_cosine": 0.999, "max_abs": None}
INT8_BOUND = {"min_cosine": 0.99, "max_abs": None}
BOUNDS = {"fp32": FP32_BOUND, "fp16": FP16_BOUND, "int8": INT8_BOUND}

def parity(reference: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, float]:
    """Worst row over all float outputs: cosine and max abs error after unit-normalising rows."""
    cosines, errors = [1.0], [0.0]
    for ref, out in zip(reference, got):
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        ref = ref.reshape(len(ref), -1).astype(np.float64)
        out = out.reshape(len(out), -1).astype(np.float64)
        finite = np.isfinite(ref)
        if not np.array_equal(finite, np.isfinite(out)):
            return {"min_cosine": -1.0, "max_abs": float("inf")}
        ref, out = np.where(finite, ref, 0.0), np.where(finite, out, 0.0)
        ref_n = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
        out_n = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        cosines.append(float((ref_n * out_n).sum(1).min()))
        errors.append(float(np.abs(ref_n - out_n).max()))
    return {"min_cosine": min(cosines), "max_abs": max(errors)}


def within(stats: dict[str, float], bound: dict[str, Any]) -> bool:
    return stats["min_cosine"] >= bound["min_cosine"] and (
        bound["max_abs"] is None or stats["max_abs"] <= bound["max_abs"])


def same_topk(reference_items: np.ndarray, reference_scores: np.ndarray):
    """A check of a top-K graph's outputs: the items must match the reference's wherever the
    reference scores are not tied."""
    def check(outs) -> str | None:
        items = outs[0]
        differ = items != reference_items
        if not differ.any():
            return None
        rows, cols = np.nonzero(differ)
        tied = np.isclose(reference_scores[rows, cols], outs[1][rows, cols], rtol=1e-5,
                          atol=1e-6)
        return None if tied.all() else f"{int((~tied).sum())} top-K entries differ"
    return check
