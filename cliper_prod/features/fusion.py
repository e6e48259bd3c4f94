"""Similarity and fusion (CLIPER, Eq. 2-3), as torch modules the exporter can trace.

s_v = cos(t_v, v_img) / tau for each view v. The modes (their table is
:mod:`cliper_prod.fusion_modes`) fuse the view embeddings t_v [B, V, D]:
  - ``sa`` (default): softmax over views of s_v weights the views: sum_v softmax(s)_v t_v;
  - ``sum``: sum_v t_v;
  - ``concat``: [t_1 | ... | t_V], dimension V * D;
  - ``mlp``: trained with the recommender: extraction writes the concatenation, and the backbone
    owns an :class:`MLPFusion` (one linear layer, LeakyReLU; the paper's activation symbol is
    lost in its text) that it trains.
The image embedding is used as is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cliper_prod.fusion_modes import FUSION_MODES

#: Extraction-time fusions: (views [B, V, D], scores [B, V]) -> fused text feature.
FUSE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sa": lambda views, scores: (torch.softmax(scores, dim=1).unsqueeze(-1) * views).sum(1),
    "sum": lambda views, scores: views.sum(1),
    "concat": lambda views, scores: views.flatten(1),
}


class ViewFusion(nn.Module):
    def __init__(self, mode: str = "sa", tau: float = 0.1) -> None:
        super().__init__()
        if mode not in FUSE:
            raise ValueError(f"fusion must be one of {tuple(FUSE)}, got {mode!r}")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.mode = mode
        self.tau = float(tau)

    def similarity(self, views: Tensor, image: Tensor) -> Tensor:
        """s [B, V]: cosine of each view with the image, over tau."""
        return F.cosine_similarity(views, image.unsqueeze(1), dim=-1, eps=1e-8) / self.tau

    def forward(self, views: Tensor, image: Tensor, has_image: Tensor | None = None,
                has_text: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(fused text feature, similarity scores [B, V], image feature).

        The per-item fallbacks of the embed policy live here, so the exported graph applies
        them exactly as the PyTorch path does: without an image (``has_image`` false) the image
        feature is the mean of the item's views; without text (``has_text`` false) the fused
        feature is the image feature (except for concat, whose width differs).
        """
        if has_image is not None:
            image = torch.where(has_image.unsqueeze(1), image, views.mean(1))
        scores = self.similarity(views, image)
        fused = FUSE[self.mode](views, scores)
        if has_text is not None and not FUSION_MODES[self.mode].concatenates:
            fused = torch.where(has_text.unsqueeze(1), fused, image)
        return fused, scores, image


class MLPFusion(nn.Module):
    """[t_1 | ... | t_V] (V * D) -> D, trained with the recommender.

    Args:
        n_views: V, the views concatenated in each input row.
        dim: D, the width of one view embedding and of the output (``self.dim``).
    """

    def __init__(self, n_views: int, dim: int) -> None:
        super().__init__()
        self.n_views, self.dim = n_views, dim
        self.layer = nn.Linear(n_views * dim, dim)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, concatenated: Tensor) -> Tensor:
        return self.act(self.layer(concatenated))


#: Fusions trained with the recommender: mode name -> module built as ``cls(n_views, dim)``,
#: whose ``dim`` is its output width.
TRAINED_FUSIONS: dict[str, type[nn.Module]] = {"mlp": MLPFusion}
