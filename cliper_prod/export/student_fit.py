"""The cold-start student of a model being exported: its fold-in base, then its training.

The student is residual on the fold-in vector where the backbone places new items by a rule
of its own, so it learns from what that rule gives each trained item placed as if it were new
(left out of its own neighbours); for a backbone without one it stands alone.
"""

from __future__ import annotations

import logging

import numpy as np

from cliper_prod.backbones.base import FoldInState
from cliper_prod.backbones.cold_student import StudentConfig, train_student
from cliper_prod.errors import ConfigError
from cliper_prod.runtime.fold_in import FoldIn
from cliper_prod.student_format import StudentState

log = logging.getLogger(__name__)


def fold_in_base(fold_in: FoldInState, backbone: str | None,
                 features: dict[str, np.ndarray]) -> np.ndarray | None:
    """[n, D] each trained item's fold-in vector as if it were new, or None where the backbone
    has no item rule."""
    fold = FoldIn.in_memory({"user_rule": fold_in.user_rule, "item_rule": fold_in.item_rule,
                             "params": fold_in.params}, fold_in.arrays, backbone)
    if fold.item_rule_problem():
        return None
    n_items = len(fold.array(f"knn_{fold.modalities[0]}"))
    return fold.items({m: features[m] for m in fold.modalities},
                      leave_out=np.arange(n_items)).vectors


def fit_student(users: np.ndarray, items: np.ndarray, train: np.ndarray,
                features: dict[str, np.ndarray], fold_in: FoldInState, backbone: str | None,
                config: StudentConfig) -> StudentState:
    """Train the student of a model whose served tables are ``users``/``items`` (trained on
    the ``train`` interactions, with the item ``features`` of its data)."""
    if not features:
        raise ConfigError(f"--cold-student needs item features: the {backbone} model was "
                          f"trained on interactions alone, so a new item has no content to "
                          f"place it by")
    base = fold_in_base(fold_in, backbone, features)
    log.info("training the cold-start student (%s)",
             "residual on the fold-in" if base is not None else "alone: no item rule")
    return train_student(users, items, train, features, base, config)
