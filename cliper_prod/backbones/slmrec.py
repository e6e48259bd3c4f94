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

from cliper_prod.device import CPU
from cliper_prod.backbones.base import Backbone, feature_tensors, train_edges
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.errors import ConfigError
from cliper_prod.graph import bipartite_edge_index, light_propagate, normalized_adjacency

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class SLMRecConfig:
    """SLMRec's ``[model]`` hyper-parameters (``models/slmrec.toml``: MMRec's defaults, FAC
    task).

    Args:
        embedding_size (int): Width of every view's embeddings and of the served tables (MMRec's
            recdim); even, the last FAC space being half of it.
        n_layers (int): LightGCN layers over the user-item graph (MMRec's layer_num).
        temp (float): Temperature of the main in-batch InfoNCE loss over cosine scores.
        ssl_temp (float): Temperature of the FAC contrast; MMRec's grid: 0.1, 0.2, 0.5, 1.0.
        ssl_alpha (float): Weight of the FAC contrast; MMRec's grid: 0.01, 0.05, 0.1, 0.5, 1.0.
        reg (float): An axis of MMRec's grid (1e-4 ... 0.1) that its SLMRec never reads: kept
            so that grid points read the same, with no effect.
    """

    embedding_size: int
    n_layers: int
    temp: float
    ssl_temp: float
    ssl_alpha: float
    reg: float


def info_nce(anchors: Tensor, targets: Tensor, temp: float) -> Tensor:
    """Mean cross-entropy of row b of anchors . targets^T / temp against column b."""
    logits = (anchors / temp) @ targets.T  # scaling the [B, d] side, not the [B, B] logits
    return F.cross_entropy(logits, torch.arange(len(anchors), device=logits.device))


def _linear(n_in: int, n_out: int) -> nn.Linear:
    """A linear layer with MMRec's Xavier-uniform weights (torch's default bias)."""
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    return layer


class SLMRec(Backbone):
    r"""The SLMRec model from the `"Self-supervised Learning for Multimedia Recommendation"
    <https://doi.org/10.1109/TMM.2022.3187556>`_ paper (Tao et al., IEEE Transactions on
    Multimedia 2022), with its FAC task and concat fusion, as MMRec runs it.

    Each view :math:`v` (item IDs, then :math:`\mathrm{Linear}_m(\hat{\mathbf{x}}_m)` of each
    modality's L2-normalised features) goes through its own LightGCN pass with the user IDs,
    :math:`[\mathbf{U}_v; \mathbf{I}_v] = \frac{1}{L + 1} \sum_{l=0}^{L} \hat{A}^l
    [\mathbf{E}_u; \mathbf{V}_v]`, and the tables are

    .. math::
        \mathbf{U} = \mathrm{Linear}_u([\mathbf{U}_{\mathrm{id}} | \mathbf{U}_{\mathrm{image}}
            | \mathbf{U}_{\mathrm{text}}]), \qquad
        \mathbf{I} = \mathrm{Linear}_i([\mathbf{I}_{\mathrm{id}} | \mathbf{I}_{\mathrm{image}}
            | \mathbf{I}_{\mathrm{text}}]).

    The loss is the in-batch InfoNCE of the cosines :math:`\cos(\mathbf{u}_b, \mathbf{i}_j) /
    \tau` (target :math:`j = b`, :math:`\tau` = ``temp``) plus ``ssl_alpha`` times the FAC
    contrast of the batch items' ID, image and text blocks (temperature ``ssl_temp``).

    Args:
        data (InteractionData): The training interactions and both the image and the text
            features.
        config (SLMRecConfig): The hyper-parameters.
    """

    config_class = SLMRecConfig

    def __init__(self, data: InteractionData, config: SLMRecConfig,
                 device: torch.device = CPU) -> None:
        super().__init__(device)
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

        # L2-normalised once; in MLP fusion mode the fused text is normalised instead
        self.features = {m: f if m == "text" and data.text_views else F.normalize(f, dim=1)
                         for m, f in feature_tensors(data, MODALITIES, self.device).items()}
        self.dense = nn.ModuleDict({"image": _linear(self.modality_dim("image"), d)})
        self.init_text_fusion(data)
        self.dense["text"] = _linear(self.modality_dim("text"), d)
        width = d * (1 + len(MODALITIES))
        self.user_head, self.item_head = _linear(width, d), _linear(width, d)
        # FAC projections, named after the spaces they map into (MMRec's g_i_iv ... g_t_ivat)
        self.id_to_iv, self.image_to_iv = _linear(d, d), _linear(d, d)
        self.iv_to_iva = _linear(d, d)
        self.iva_to_ivat, self.text_to_ivat = _linear(d, d // 2), _linear(d, d // 2)

        users, items = train_edges(data, self.device)
        self.adj = normalized_adjacency(bipartite_edge_index(users, items, self.n_users),
                                        self.n_users + self.n_items)

    def _view(self, modality: str) -> Tensor:
        """A modality's item rows entering the propagation: its normalised features, projected."""
        feat = self.modality(modality)
        if self.is_fused(modality):
            feat = F.normalize(feat, dim=1)
        return self.dense[modality](feat)

    def _views(self) -> list[tuple[Tensor, Tensor]]:
        """(user rows, item rows) of each propagated view: ID, then the modalities."""
        users = self.user_embedding.weight
        items = [self.item_embedding.weight] + [self._view(m) for m in MODALITIES]
        out = [light_propagate(self.adj, torch.cat([users, view]), self.config.n_layers,
                               self.lean_propagation) for view in items]
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
