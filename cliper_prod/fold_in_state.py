"""What a bundle holds to place new users and items (torch-free: the exporter writes it from a
backbone, ``add-items`` from a bundle on a host without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FoldInState:
    """What a bundle needs to place new users and items without retraining: the rules'
    names (:mod:`cliper_prod.runtime.fold_in`, where they are defined), their parameters and
    the arrays they read. A rule of ``None`` is refused with ``params['no_user_rule']`` /
    ``params['no_item_rule']`` as the reason."""

    user_rule: str | None
    item_rule: str | None
    params: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
