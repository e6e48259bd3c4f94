"""The cold-start content student, run without torch: a new item's vector from its features.

A bundle exported with ``--cold-student`` holds a one-hidden-layer network trained after the
backbone against the backbone's own served scores (:mod:`cliper_prod.backbones.cold_student`;
manifest ``cold_student``, files ``cold_student.<name>.npy``). For a new item with features
f_m (the modalities the student names):

    x = (concat_m f_m / ||f_m|| - mean) / scale
    v = base + tanh(x W1 + b1) W2 + b2

where ``base`` is the item's fold-in vector (:mod:`cliper_prod.runtime.fold_in`) for a
backbone whose item graph places new items, and zero for one that has none (LightGCN, VBPR,
MMGCN, DualGNN, SLMRec, LATTICE with the MLP text fusion): the student is residual on what
the backbone's own rule already gives. Two matrix products; the trained items are untouched.

This module is torch-free; the stored form and the input preparation are shared with the
trainer (:mod:`cliper_prod.student_format`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cliper_prod.errors import BundleError, ConfigError
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.student_format import COLD_STUDENT, StudentState, student_inputs

STUDENT, FOLD_IN_ONLY = "student", "fold-in"
PLACEMENTS = (STUDENT, FOLD_IN_ONLY)
NO_STUDENT = ("the bundle holds no cold-start student (exported without --cold-student, or "
              "before it existed): re-export it with --cold-student, or use --placement fold-in")


class ContentStudent:
    """A stored student, run with numpy."""

    def __init__(self, state: StudentState) -> None:
        self.state, self.params = state, state.params
        self.arrays = {name: np.asarray(a, np.float32) for name, a in state.arrays.items()}
        self.modalities: list[str] = list(self.params["modalities"])
        self.residual: bool = bool(self.params["base"])

    @classmethod
    def of(cls, bundle: Bundle) -> ContentStudent | None:
        """The student of an opened bundle, or None when it has none."""
        record = bundle.manifest.get(COLD_STUDENT)
        if record is None:
            return None
        folder: Path = bundle.folder
        return cls(StudentState(record["params"],
                                {name: np.load(folder / file, allow_pickle=False)
                                 for name, file in record["arrays"].items()}))

    def offsets(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """[Q, D] float32: the student's part of each new item's vector (added to the fold-in
        vector when :attr:`residual`, the whole vector otherwise)."""
        a = self.arrays
        x = student_inputs(features, self.modalities)
        if x.shape[1] != a["mean"].shape[0]:
            raise ConfigError(f"the new items' features are {x.shape[1]}-d in all; the "
                              f"cold-start student was trained on {a['mean'].shape[0]}-d ones")
        hidden = np.tanh(((x - a["mean"]) / a["scale"]) @ a["w1"] + a["b1"])
        return (hidden @ a["w2"] + a["b2"]).astype(np.float32)


def choose_placement(requested: str | None, student: ContentStudent | None, folder: Path
                     ) -> str:
    """The placement add-items uses: ``requested``, else the student when the bundle has
    one, else the fold-in; a student asked of a bundle without one is refused."""
    if requested is not None and requested not in PLACEMENTS:
        raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}; got {requested!r}")
    if requested == STUDENT and student is None:
        raise BundleError(f"{folder}: cannot place items with the student: {NO_STUDENT}")
    return requested or (STUDENT if student is not None else FOLD_IN_ONLY)


def placement_summary(manifest: dict) -> dict:
    """How this bundle places new items and placed those it holds (/metadata): the default
    placement of add-items, the last placement used and the items added by each."""
    lineage = manifest.get("lineage", {})
    return {"default_placement": STUDENT if COLD_STUDENT in manifest else FOLD_IN_ONLY,
            "last_placement": lineage.get("placement"),
            "added_by_placement": lineage.get("placements", {})}
