"""SLMRec (Tao et al., 2022): self-supervised learning for multimedia recommendation, as MMRec
runs it by default (ssl_task FAC, mm_fusion_mode concat, adj_type pre, init xavier).

- Encoder: three LightGCN passes (mean of layers 0..n_layers) over the D^-1/2 A D^-1/2 user-item
  graph, one per view: item ID embeddings, and each modality's L2-normalised raw features through
  a trainable linear layer; the users' ID embeddings start all three. Concat fusion joins the
  three outputs into [ID | image | text] rows, and one linear layer per side maps them to the
  final user and item tables. (Three 64-wide passes measured faster on CPU than one 192-wide.)
- Main loss: in-batch InfoNCE, not BPR: softmax over the batch of cos(user_b, pos_j) / temp with
  target j = b. The sampled negatives are unused.
- FAC ("fine and coarse") contrast, on the batch's positive items (duplicates kept): the item's
  propagated ID block is projected into an ID-image space and contrasted with the projected
  image block; that projection goes on through an ID-image-audio layer (no audio: MMRec keeps the
  layer but comments out its contrast) into a half-width space, contrasted with the projected
  text block. Both are InfoNCE over raw dot products / ssl_temp, without normalisation.
  Loss = main + ssl_alpha * (image term + text term). FAC has no augmentation, hence no dropout.
- Score: user . item of the final tables, unnormalised although training scores cosines (as
  MMRec, which ranks by sigmoid of it: the same order unless float32 saturates, |score| > ~16;
  scores on Baby stay far below that).

MMRec quirks and what this module does:
- ``reg`` is in MMRec's grid but its SLMRec never reads it; kept so grid points read the same,
  with no effect (only Adam's weight_decay regularises). Followed, as it changes nothing.
- In-batch InfoNCE counts a user's second positive in the batch, or a repeated item, as a
  negative (targets are the diagonal). Followed.
- MMRec also builds an audio projection (g_a_iva) that nothing uses; it never gets a gradient,
  so Adam never touches it: omitted.
- MMRec evaluates with the tables cached by the last training batch's forward, i.e. one optimizer
  step old. Not followed: tables are recomputed from the weights, so they stay a function of the
  saved checkpoint (the trainer restores the best epoch's weights before testing); one Adam step
  apart, the two differ negligibly.
With CLIPER's MLP text fusion the fused text (not the raw concatenation) is L2-normalised and
projected, so the fusion layer trains through every term of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cliper_prod.backbones.base import Recommender, train_edges
from cliper_prod.backbones.lightgcn import light_propagate
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.errors import ConfigError
from cliper_prod.features.fusion import MLPFusion
from cliper_prod.graph import bipartite_edge_index, normalized_adjacency

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class SLMRecConfig:
    embedding_size: int
    n_layers: int
    temp: float
    ssl_temp: float
    ssl_alpha: float
    reg: float  # MMRec's grid axis that its SLMRec ignores (see the module docstring)


def info_nce(anchors: Tensor, targets: Tensor, temp: float) -> Tensor:
    """Mean cross-entropy of row b of anchors . targets^T / temp against column b."""
    logits = (anchors / temp) @ targets.T  # scaling the [B, d] side, not the [B, B] logits
    return F.cross_entropy(logits, torch.arange(len(anchors), device=logits.device))


def _linear(n_in: int, n_out: int) -> nn.Linear:
    """A linear layer with MMRec's Xavier-uniform weights (torch's default bias)."""
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    return layer


class SLMRec(Recommender):
    def __init__(self, data: InteractionData, config: SLMRecConfig) -> None:
        super().__init__()
        missing = [m for m in MODALITIES if m not in data.features]
        if missing:
            raise ConfigError(f"SLMRec needs both image_feat.npy and text_feat.npy; missing "
                              f"{', '.join(missing)}")
        if min(config.temp, config.ssl_temp) <= 0:
            raise ConfigError("temp and ssl_temp must be positive")
        if config.embedding_size < 2 or config.embedding_size % 2 or config.n_layers < 0:
            raise ConfigError("embedding_size must be even and >= 2, n_layers >= 0")
        self.config = config
        d = config.embedding_size
        self.init_id_embeddings(data, d)

        self.text_fusion: MLPFusion | None = None
        self.features: dict[str, Tensor] = {}
        self.dense = nn.ModuleDict()
        for modality in MODALITIES:
            feat = torch.from_numpy(data.features[modality])
            if modality == "text" and data.text_views:
                self.text_fusion = MLPFusion(data.text_views, feat.shape[1] // data.text_views)
                self.features[modality] = feat  # normalised after the trained fusion
                self.dense[modality] = _linear(self.text_fusion.dim, d)
            else:
                self.features[modality] = F.normalize(feat, dim=1)
                self.dense[modality] = _linear(feat.shape[1], d)
        width = d * (1 + len(MODALITIES))
        self.user_head, self.item_head = _linear(width, d), _linear(width, d)
        # FAC projections, named after the spaces they map into (MMRec's g_i_iv ... g_t_ivat)
        self.id_to_iv, self.image_to_iv = _linear(d, d), _linear(d, d)
        self.iv_to_iva = _linear(d, d)
        self.iva_to_ivat, self.text_to_ivat = _linear(d, d // 2), _linear(d, d // 2)

        users, items = train_edges(data)
        self.adj = normalized_adjacency(bipartite_edge_index(users, items, self.n_users),
                                        self.n_users + self.n_items)

    def _modality(self, modality: str) -> Tensor:
        feat = self.features[modality]
        if modality == "text" and self.text_fusion is not None:
            feat = F.normalize(self.text_fusion(feat), dim=1)
        return self.dense[modality](feat)

    def _views(self) -> list[tuple[Tensor, Tensor]]:
        """(user rows, item rows) of each propagated view: ID, then the modalities."""
        users = self.user_embedding.weight
        items = [self.item_embedding.weight] + [self._modality(m) for m in MODALITIES]
        out = [light_propagate(self.adj, torch.cat([users, view]), self.config.n_layers)
               for view in items]
        return [(o[:self.n_users], o[self.n_users:]) for o in out]

    def propagate(self) -> tuple[Tensor, Tensor]:
        views = self._views()
        return (self.user_head(torch.cat([u for u, _ in views], dim=1)),
                self.item_head(torch.cat([i for _, i in views], dim=1)))

    def fac_loss(self, ids: Tensor, image: Tensor, text: Tensor) -> Tensor:
        """FAC contrast of a batch's propagated ID, image and text item rows."""
        iv = self.id_to_iv(ids)
        image_term = info_nce(iv, self.image_to_iv(image), self.config.ssl_temp)
        ivat = self.iva_to_ivat(self.iv_to_iva(iv))
        return image_term + info_nce(ivat, self.text_to_ivat(text), self.config.ssl_temp)

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        views = self._views()  # only the batch's rows go through the heads
        user_rows = torch.cat([u[users] for u, _ in views], dim=1)
        item_rows = [i[pos] for _, i in views]
        main = info_nce(F.normalize(self.user_head(user_rows), dim=1),
                        F.normalize(self.item_head(torch.cat(item_rows, dim=1)), dim=1),
                        self.config.temp)
        return main + self.config.ssl_alpha * self.fac_loss(*item_rows)
