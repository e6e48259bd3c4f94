"""Bicubic resize of one box of an RGB image to a square, channels first, in numpy: the draft
decode path's resize (the exact path keeps Pillow's, whose bytes are the processor's).

The weights are Pillow's antialiased bicubic (a = -0.5, the support widened by the scale when
shrinking, each output's weights summing to 1), computed for the box alone. Each pass is a
banded product: a block of outputs reads only its span of inputs, one BLAS call per block, each
kept under the size from which OpenBLAS hands a product to its thread pool, so no BLAS threads
wake beside the decoders. About twice as fast as Pillow's resize of the same box (which also
needs its 4-byte image and a transpose afterwards; BENCHMARKS.md, "embed pipeline"). Not
bit-equal to Pillow, which rounds the first pass to 8 bits: here it stays float32 until the
end (about one value in ten differs by 1, a few in 100,000 by more where overshoots clip).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CUBIC_A = -0.5  # Pillow's bicubic
#: OpenBLAS runs a product of m*n*k multiply-adds up to this on the calling thread alone
#: (65536 x its GEMM_MULTITHREAD_THRESHOLD of 4); above it wakes its pool, whose threads
#: would compete with the decoders
ONE_THREAD_MACS = 1 << 18
WIDEST_BAND = 64  # outputs per block at most


@dataclass(frozen=True)
class Band:
    """Outputs ``out0:out1`` read inputs ``in0:in1`` with ``weights`` [outputs, inputs]."""

    out0: int
    out1: int
    in0: int
    in1: int
    weights: np.ndarray  # float32


def cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * CUBIC_A, 0.0))


def weights(in_size: int, out_size: int, start: float, end: float) -> np.ndarray:
    """[out_size, in_size] float64: Pillow's taps for ``out_size`` outputs over the input
    interval [start, end) (its ``precompute_coeffs``, before the 8-bit fixed point)."""
    scale = (end - start) / out_size
    widen = max(scale, 1.0)
    support = 2.0 * widen
    centre = start + (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
    taps = first[:, None] + np.arange(int(np.ceil(support)) * 2 + 1)
    w = cubic((taps - centre[:, None] + 0.5) / widen) * (taps < last[:, None])
    w /= w.sum(1, keepdims=True)
    dense = np.zeros((out_size, in_size))
    rows = np.repeat(np.arange(out_size), taps.shape[1])
    inside = (taps < in_size).ravel()
    dense[rows[inside], taps.ravel()[inside]] = w.ravel()[inside]
    return dense


def bands(dense: np.ndarray, other: int) -> tuple[Band, ...]:
    """``dense`` cut into blocks of consecutive outputs, the widest whose products with
    ``other`` (the length of the axis not resized) stay on one BLAS thread."""
    used = dense != 0
    first = used.argmax(1)
    last = dense.shape[1] - used[:, ::-1].argmax(1)
    width = WIDEST_BAND
    while True:
        cuts = range(0, len(dense), width)
        span = max(last[min(c + width, len(dense)) - 1] - first[c] for c in cuts)
        if width == 1 or width * span * other <= ONE_THREAD_MACS:
            break
        width //= 2
    out = []
    for c in cuts:
        end = min(c + width, len(dense))
        a, b = int(first[c]), int(last[end - 1])
        out.append(Band(c, end, a, b, np.ascontiguousarray(dense[c:end, a:b], np.float32)))
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    rows: tuple[int, int]  # the input rows the box's outputs read
    across: tuple[Band, ...]  # first pass, along each row (weights transposed: [in, out])
    down: tuple[Band, ...]  # second pass, along each column, rows counted from rows[0]


@lru_cache(maxsize=64)
def plan(height: int, width: int, box: tuple[float, float, float, float], size: int) -> Plan:
    """The two passes for a ``height`` x ``width`` image, ``box`` (left, top, right, bottom)
    to ``size`` x ``size`` (a catalog's photos share a few shapes: each is planned once)."""
    down = weights(height, size, box[1], box[3])
    used = np.nonzero(down.any(0))[0]
    top, bottom = int(used[0]), int(used[-1]) + 1
    across = bands(weights(width, size, box[0], box[2]), bottom - top)
    across = tuple(Band(b.out0, b.out1, b.in0, b.in1, np.ascontiguousarray(b.weights.T))
                   for b in across)
    return Plan((top, bottom), across, bands(down[:, top:bottom], size))


_scratch = threading.local()  # each decode thread's float32 work arrays


def scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape`` kept for the calling thread: a fresh 2 MB of arrays per
    image costs more in page faults (the allocator maps and unmaps them) than the resize."""
    size = math.prod(shape)
    flat = getattr(_scratch, name, None)
    if flat is None or flat.size < size:
        flat = np.empty(size, np.float32)
        setattr(_scratch, name, flat)
    return flat[:size].reshape(shape)


def resize_box(rgb: np.ndarray, box: tuple[float, float, float, float], size: int
               ) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [3, size, size]: ``box`` of the image, bicubic."""
    p = plan(rgb.shape[0], rgb.shape[1], box, size)
    rows = rgb[p.rows[0]:p.rows[1]].transpose(2, 0, 1)
    source = scratch("source", rows.shape)  # [3, rows, W]
    source[...] = rows
    first = scratch("first", (3, rows.shape[1], size))
    for b in p.across:
        np.matmul(source[:, :, b.in0:b.in1], b.weights, out=first[:, :, b.out0:b.out1])
    second = scratch("second", (3, size, size))
    for b in p.down:
        np.matmul(b.weights, first[:, b.in0:b.in1], out=second[:, b.out0:b.out1])
    second += 0.5  # round half up, as Pillow does, once clipped to [0, 255]
    np.clip(second, 0, 255, out=second)
    return second.astype(np.uint8)
