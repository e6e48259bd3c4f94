"""The cold-start student's stored form, shared by its trainer (torch) and the runtime (numpy):
the manifest record and files, the arrays, and how a new item's features become its input.

This module is torch-free, as :mod:`cliper_prod.bundle_format` is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cliper_prod.errors import ConfigError

COLD_STUDENT = "cold_student"  # manifest record; arrays are cold_student.<name>.npy
#: x -> tanh(((x - mean) / scale) @ w1 + b1) @ w2 + b2
ARRAYS = ("mean", "scale", "w1", "b1", "w2", "b2")


def student_file(name: str) -> str:
    """File of one student array: ``cold_student.w1.npy``, ..."""
    return f"{COLD_STUDENT}.{name}.npy"


@dataclass(frozen=True)
class StudentState:
    """What a bundle stores of a trained student: its settings and training record
    (``params``: ``modalities`` in input order, ``base`` whether it is residual on the fold-in
    vector, and what training measured) and the arrays of :data:`ARRAYS`."""

    params: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def student_inputs(features: dict[str, np.ndarray], modalities: list[str]) -> np.ndarray:
    """[Q, sum d_m] float32: each modality's rows at unit length (zero rows stay zero),
    concatenated in ``modalities`` order (not yet standardised)."""
    missing = [m for m in modalities if m not in features]
    if missing:
        raise ConfigError(f"the cold-start student needs the new items' {', '.join(missing)} "
                          f"features (it was trained on {modalities})")
    parts = []
    for m in modalities:
        x = np.asarray(features[m], dtype=np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        parts.append(x / np.where(norms > 0, norms, 1.0))
    return np.concatenate(parts, axis=1)
