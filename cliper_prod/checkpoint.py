"""A trained model's folder: weights and settings, embedding tables, history, metrics, curve.

Layout (all written atomically):
  model.pt              {"backbone", "config", "data": {...}, "state_dict", "package_version"}
  user_embeddings.npy   float32 [n_users, d]   final tables: score(u, i) = user[u] . item[i]
  item_embeddings.npy   float32 [n_items, d]
  history.json          per-epoch loss, time and validation metrics
  metrics.json          best epoch, its validation metrics and the test metrics at that epoch
  training_curve.png

The files hold CPU tensors and arrays whatever device trained the model, and are read onto the
CPU before the model is moved where it is asked for: a checkpoint trained on a GPU evaluates
and exports on a machine without one, and the reverse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cliper_prod.device import CPU
from cliper_prod import __version__
from cliper_prod.backbones import Backbone, create_model
from cliper_prod.data.mmrec import InteractionData, load_dataset
from cliper_prod.errors import CheckpointError
from cliper_prod.io import atomic_path, write_npy

MODEL_FILE = "model.pt"


def data_fingerprint(data: InteractionData) -> dict[str, Any]:
    return {"name": data.name, "root": str(data.root.resolve()), "n_users": data.n_users,
            "n_items": data.n_items, "n_train": int(len(data.train)),
            "features": {m: list(a.shape) for m, a in data.features.items()},
            "features_dir": str(data.features_dir.resolve()) if data.features_dir else None}


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: readers never see half."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_model(out_dir: Path, backbone: str, config: dict, data: InteractionData,
               state_dict: dict[str, torch.Tensor]) -> None:
    payload = {"backbone": backbone, "config": config, "data": data_fingerprint(data),
               "state_dict": {k: v.cpu() for k, v in state_dict.items()},
               "package_version": __version__}
    save_torch(out_dir / MODEL_FILE, payload)


def save_embeddings(out_dir: Path, model: Backbone) -> None:
    users, items = model.embedding_tables()
    write_npy(out_dir / "user_embeddings.npy", users.cpu().numpy().astype("float32"))
    write_npy(out_dir / "item_embeddings.npy", items.cpu().numpy().astype("float32"))


def load_model(checkpoint: Path, data_dir: Path | None = None,
               device: torch.device = CPU) -> tuple[Backbone, InteractionData, dict]:
    """Rebuild a trained model on its data (or ``data_dir``) on ``device``, checking that the
    data fits; the file loads onto the CPU whatever device saved it."""
    path = checkpoint / MODEL_FILE if checkpoint.is_dir() else checkpoint
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (expected a folder written by "
                              f"`cliper-prod train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: "
                              f"{exc})") from None
    meta = payload["data"]
    data = load_dataset(data_dir or Path(meta["root"]), features_dir=meta.get("features_dir"))
    for key in ("n_users", "n_items", "n_train"):
        found = data.n_users if key == "n_users" else data.n_items if key == "n_items" \
            else len(data.train)
        if found != meta[key]:
            raise CheckpointError(f"{path}: trained on {meta[key]} {key[2:]} but {data.root} has "
                                  f"{found}; pass the training data with --data")
    model = create_model(payload["backbone"], data, payload["config"]["model"], device)
    model.load_state_dict(payload["state_dict"])
    return model, data, payload
