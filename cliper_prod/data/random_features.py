"""Stand-in modality features for datasets whose images and texts are not available.

Standard-normal float32 matrices from ``numpy.random.default_rng(seed)``, image first, then text,
in the shapes of MMRec's files (4096-d image, 384-d text). They carry no item semantics: use them
to compare implementations side by side, never to claim multi-modal accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cliper_prod.data.mmrec import FEATURE_FILES, find_inter_file, read_inter
from cliper_prod.io import write_npy

DEFAULT_DIMS = {"image": 4096, "text": 384}


def random_features(n_items: int, dims: dict[str, int] = DEFAULT_DIMS, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((n_items, d), dtype=np.float32) for m, d in dims.items()}


def with_random_features(data_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A dataset folder = ``data_dir``'s .inter and id maps (linked, not copied) + random features."""
    inter = find_inter_file(data_dir)
    n_items = int(read_inter(inter)[:, 1].max()) + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in [inter, *(data_dir / f for f in ("i_id_mapping.csv", "u_id_mapping.csv"))]:
        dst = out_dir / src.name
        if src.exists() and not dst.exists():
            os.symlink(src.resolve(), dst)
    for modality, array in random_features(n_items, seed=seed).items():
        write_npy(out_dir / FEATURE_FILES[modality], array)
    return out_dir
