"""The torch device that training and evaluation run on, from a ``--device`` choice."""

from __future__ import annotations

import torch

from cliper_prod.errors import RuntimeSetupError

CPU = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when torch sees one, else the CPU; ``cuda`` without one is refused
    here, before any data is read or output written."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeSetupError("--device cuda: torch sees no CUDA device (no GPU, no driver, or "
                                "a CPU-only torch build); run with --device cpu")
    return torch.device(name)
