"""VBPR (He & McAuley, 2016): matrix factorisation whose items also carry a linear projection of
their content features, as MMRec implements it.

- Item vector: [ID embedding (d) | W x_i + b (d)], with x_i the frozen raw features concatenated
  text first, then image (MMRec's order); user vector: one ID embedding of size 2d. The score is
  their dot product, so the user's second half is VBPR's visual preference vector.
- Initialisation: both ID tables Xavier-uniform; W Xavier-normal and b zero (MMRec applies its
  Xavier-normal initialiser to the linear layer only, its ID tables being bare parameters).
- Loss: BPR + reg_weight * (||u|| + ||p|| + ||n||) / batch, plain (not squared) Frobenius norms of
  the batch's full 2d-wide vectors, projection included (MMRec's EmbLoss).
- MMRec's forward applies dropout with p = 0 (a no-op), and its BPR adds 1e-10 inside the log;
  both are left out: they change the loss only for score gaps below about -23.
- Only the batch's items are projected in training (MMRec projects all of them each batch): the
  loss and its gradients are the same.
- CLIPER's MLP fusion: when the text features are concatenated views, a fusion layer trained here
  turns them into one text vector before the concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cliper_prod.device import CPU
from cliper_prod.backbones.base import Backbone, bpr_loss, feature_tensors, require_features
from cliper_prod.data.mmrec import InteractionData


@dataclass(frozen=True)
class VBPRConfig:
    """VBPR's ``[model]`` hyper-parameters (``models/vbpr.toml``: MMRec's defaults).

    Args:
        embedding_size (int): Width of the item ID embeddings and of the projected features;
            user vectors and the served tables are twice as wide.
        reg_weight (float): Weight of the plain L2 norms of the batch's vectors (MMRec's
            EmbLoss); MMRec's grid: 2.0 .. 1e-5.
    """

    embedding_size: int
    reg_weight: float


class VBPR(Backbone):
    r"""The VBPR model from the `"VBPR: Visual Bayesian Personalized Ranking from Implicit
    Feedback" <https://arxiv.org/abs/1510.01784>`_ paper (He and McAuley, AAAI 2016), as MMRec
    implements it.

    The score of user :math:`u` for item :math:`i` is

    .. math::
        \hat{y}_{ui} = \mathbf{p}_u^\top [\mathbf{e}_i \,|\, W \mathbf{x}_i + \mathbf{b}],

    :math:`\mathbf{p}_u` a :math:`2d`-wide user embedding, :math:`\mathbf{e}_i` the item ID
    embedding and :math:`\mathbf{x}_i` the item's text then image features; the loss is BPR
    plus ``reg_weight`` times the batch's L2 norms.

    """

    config_class = VBPRConfig

    def __init__(self, data: InteractionData, config: VBPRConfig,
                 device: torch.device = CPU) -> None:
        super().__init__(device)
        require_features(data, "VBPR")
        self.config = config
        self.n_users, self.n_items = data.n_users, data.n_items
        dim = config.embedding_size
        self.user_embedding = nn.Embedding(self.n_users, 2 * dim)
        self.item_embedding = nn.Embedding(self.n_items, dim)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)

        # frozen inputs (MMRec never trains them), text first as MMRec concatenates them
        self.features = feature_tensors(data, ("text", "image"), self.device)
        self.init_text_fusion(data)
        in_dim = sum(self.modality_dim(m) for m in self.features)
        self.item_linear = nn.Linear(in_dim, dim)
        nn.init.xavier_normal_(self.item_linear.weight)
        nn.init.zeros_(self.item_linear.bias)

    def _content(self, items: Tensor) -> Tensor:
        """The items' content features, text (fused, with MLP fusion) then image."""
        return torch.cat([self.modality(m, items) for m in self.features], 1)

    def _items(self, items: Tensor) -> Tensor:
        return torch.cat([self.item_embedding(items), self.item_linear(self._content(items))], 1)

    def propagate(self) -> tuple[Tensor, Tensor]:
        return (self.user_embedding(torch.arange(self.n_users, device=self.device)),  # a copy
                self._items(torch.arange(self.n_items, device=self.device)))

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        items, inverse = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        p, n = self._items(items)[inverse].split(len(pos))
        u = self.user_embedding(users)
        reg = (u.norm(p=2) + p.norm(p=2) + n.norm(p=2)) / len(users)
        return bpr_loss(u, p, n) + self.config.reg_weight * reg
