"""What every backbone offers the trainer, the evaluator and the exporter, and the modality
inputs they share.

A backbone keeps its modality matrices in ``self.features`` in the form its paper needs
(:func:`feature_tensors`: fixed inputs, not saved; :func:`trained_features`: Parameters), calls
:meth:`Backbone.init_text_fusion` at the point where it builds its text modules, and reads
them through :meth:`Backbone.modality`, which fuses the text views in CLIPER's MLP mode:
MMRec's abstract recommender likewise loads the feature matrices once for every model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cliper_prod.device import CPU
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.errors import ConfigError
from cliper_prod.fold_in_state import FoldInState  # noqa: F401  (the backbones import it from here)
from cliper_prod.features.fusion import TRAINED_FUSIONS


def bpr_loss(users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """-mean log sigmoid(u.p - u.n): Bayesian personalised ranking on dot-product scores."""
    return -F.logsigmoid((users * pos).sum(1) - (users * neg).sum(1)).mean()


#: triples per chunk of a chunked step: its gathered rows and their gradients take about
#: 6 x LOSS_CHUNK x d floats, whatever the batch
LOSS_CHUNK = 1 << 19


def chunks(n: int, size: int | None = None) -> list[slice]:
    """Consecutive slices of ``size`` (default :data:`LOSS_CHUNK`) covering ``range(n)``."""
    size = size or LOSS_CHUNK
    return [slice(start, start + size) for start in range(0, n, size)]


def add_grad(param: Tensor, grad: Tensor) -> None:
    """Accumulate ``grad`` (no graph) into ``param.grad`` as backward would."""
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def require_features(data: InteractionData, backbone: str) -> None:
    """Multi-modal backbones cannot train on interactions alone: say which files are missing."""
    if not data.features:
        raise ConfigError(f"{backbone} needs image_feat.npy and/or text_feat.npy in the data "
                          f"folder")


def check_knn_k(k: int, n_items: int) -> None:
    """An item kNN graph needs at least one neighbour and fewer than all items."""
    if not 0 < k < n_items:
        raise ConfigError(f"knn_k={k} must be between 1 and the number of items minus one "
                          f"({n_items - 1})")


def train_edges(data: InteractionData, device: torch.device = CPU
                ) -> tuple[Tensor, Tensor]:
    """The training interactions as (users, items) index tensors on ``device``, where the
    graphs built from them are then built."""
    train = torch.from_numpy(data.train).to(device)
    return train[:, 0].contiguous(), train[:, 1].contiguous()


def feature_tensors(data: InteractionData, names: Iterable[str] | None = None,
                    device: torch.device = CPU) -> dict[str, Tensor]:
    """The modality matrices on ``device`` (on the CPU: over the loaded arrays, no copy), in
    ``names`` order (default: the data's), absent ones skipped: fixed inputs, rebuilt from the
    data rather than saved."""
    return {m: torch.from_numpy(data.features[m]).to(device) for m in names or data.features
            if m in data.features}


def trained_features(data: InteractionData, names: Iterable[str] | None = None
                     ) -> nn.ParameterDict:
    """Trained copies of the modality matrices, saved with the model (MMRec's
    ``nn.Embedding.from_pretrained(freeze=False)``); on the CPU, as every Parameter until
    :func:`~cliper_prod.backbones.create_model` moves the model."""
    # pairs, not a dict: ParameterDict sorts a plain dict's keys
    return nn.ParameterDict([(m, nn.Parameter(t.clone()))
                             for m, t in feature_tensors(data, names).items()])


NO_ITEM_GRAPH = ("it has no item graph, so an item without interactions has no "
                 "representation; add items to a FREEDOM or LATTICE model, or export "
                 "this one with --cold-student")


def user_fold_in_arrays(layers: list[Tensor], n_users: int, items: Tensor, n_items: int
                        ) -> dict[str, np.ndarray]:
    """The arrays a LightGCN-style user fold-in reads: the items' layers 0..L-1 [L, n, D] of the
    user-item propagation (``layers``: its outputs 0..L over users then items) and the items'
    training degrees (``items``: the item of each training interaction)."""
    return {"item_layers": torch.stack([x[n_users:] for x in layers[:-1]]).cpu().numpy(),
            "item_degree": torch.bincount(items, minlength=n_items).cpu().numpy()
            .astype(np.float32)}


class Backbone(nn.Module, ABC):
    """A backbone: trained with BPR triples; serves final user and item embedding tables whose
    dot product is the ranking score.

    A subclass is built as ``Model(data, config, device)``, then moved to ``device``
    (:func:`~cliper_prod.backbones.create_model` does both). Its Parameters are initialised on
    the CPU, from the CPU generator in the same order on every device, so that a seed gives the
    same initial weights everywhere; its fixed inputs (feature matrices, edge lists, graphs),
    which ``nn.Module.to`` does not move, are built on ``self.device`` from the start.

    Args:
        data (InteractionData): The training interactions and the image and/or text features.
        config: An instance of the subclass's :attr:`config_class`, the dataclass of its
            ``[model]`` hyper-parameters.
        device (torch.device): Where the fixed inputs are built and the model runs.
    """

    config_class: ClassVar[type]
    #: the loss splits into chunks of triples (:meth:`train_tables`, :meth:`chunk_loss`)
    chunked_loss: ClassVar[bool] = False
    #: the model reads the modality features (False: a memory-lean run loads none)
    reads_features: ClassVar[bool] = True

    def __init__(self, device: torch.device = CPU) -> None:
        super().__init__()
        self.device = device
        self.features: Mapping[str, Tensor] = {}  # modality -> [n_items, d], as the model keeps it
        self.text_fusion: nn.Module | None = None  # CLIPER's trained fusion of the text views
        # light_propagate's lean mode (train.memory_lean): a training choice, not a
        # hyper-parameter of the saved model, so the trainer sets it after building the model
        self.lean_propagation = False

    def init_id_embeddings(self, data: InteractionData, dim: int) -> None:
        """User and item ID embeddings, Xavier-uniform as MMRec initialises them."""
        self.n_users, self.n_items = data.n_users, data.n_items
        self.user_embedding = nn.Embedding(self.n_users, dim)
        self.item_embedding = nn.Embedding(self.n_items, dim)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)

    def init_text_fusion(self, data: InteractionData) -> None:
        """In a fusion mode trained with the recommender (``data.text_views`` set: text_feat.npy
        holds V concatenated view embeddings; ``data.text_fusion`` names the mode, CLIPER's
        ``mlp``) create the layer trained here that fuses them into one; :meth:`modality_dim`
        then says the fused width. It draws random numbers, so each backbone calls it where its
        construction order puts it."""
        if data.text_views:
            views = data.text_views
            self.text_fusion = TRAINED_FUSIONS[data.text_fusion](
                views, data.features["text"].shape[1] // views)

    def is_fused(self, name: str) -> bool:
        """Whether :meth:`modality` passes modality ``name`` through the trained fusion."""
        return name == "text" and self.text_fusion is not None

    def modality(self, name: str, items: Tensor | None = None) -> Tensor:
        """The feature matrix of modality ``name`` (its rows ``items``, default all) with the text
        views fused by the trained layer."""
        feat = self.features[name] if items is None else self.features[name][items]
        return self.text_fusion(feat) if self.is_fused(name) else feat

    def modality_dim(self, name: str) -> int:
        """The width of :meth:`modality`'s matrix for ``name``."""
        return self.text_fusion.dim if self.is_fused(name) else self.features[name].shape[1]

    def pre_epoch(self, generator: torch.Generator) -> None:
        """Per-epoch work before the batches (FREEDOM prunes its graph here)."""

    @abstractmethod
    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """Training loss of one batch of (user, positive item, negative item) triples."""

    def train_tables(self) -> tuple[Tensor, Tensor]:
        """Where :attr:`chunked_loss`: the propagated user and item tables a training batch
        reads, built once per step (without a graph) whatever the number of chunks."""
        raise NotImplementedError(f"{type(self).__name__} has no chunked loss")

    def batch_context(self, users: Tensor, pos: Tensor, neg: Tensor) -> Any:
        """Where :attr:`chunked_loss`: what :meth:`chunk_loss` and :meth:`backward_tables` need
        of the whole batch (e.g. a norm over all of it), without gradient; None when nothing."""
        return None

    def chunk_loss(self, rows: tuple[Tensor, Tensor, Tensor], users: Tensor, pos: Tensor,
                   neg: Tensor, batch: int, context: Any) -> Tensor:
        """Where :attr:`chunked_loss`: the share of one chunk of the triples in the loss of a
        batch of ``batch`` triples, from ``rows``, the chunk's rows of the tables (users[u],
        items[pos], items[neg]); with :meth:`backward_tables` the shares add up to
        :meth:`loss` of the batch in value and gradient (up to rounding)."""
        raise NotImplementedError(f"{type(self).__name__} has no chunked loss")

    def backward_tables(self, grad: Tensor, context: Any) -> None:
        """Where :attr:`chunked_loss`: add to the parameters' gradients those of
        ``<[users; items], grad>`` for the tables of :meth:`train_tables` (``grad``: [users +
        items, d], which this may overwrite), and what the chunks' losses left out of their
        graphs; by hand, so that no layer of the propagation is kept."""
        raise NotImplementedError(f"{type(self).__name__} has no chunked loss")

    @abstractmethod
    def propagate(self) -> tuple[Tensor, Tensor]:
        """Final user and item embeddings from the full (unpruned) graph."""

    def fold_in_state(self, data: InteractionData) -> FoldInState:
        """How new users and items enter this trained model (``data``: its training data, for
        the features the item graph was built from). Default: neither can."""
        return FoldInState(None, None, {
            "no_user_rule": "its users are not a propagation of item representations (user "
                            "fold-in: LightGCN, FREEDOM, LATTICE)",
            "no_item_rule": NO_ITEM_GRAPH})

    @torch.no_grad()
    def embedding_tables(self) -> tuple[Tensor, Tensor]:
        """The tables that serving uses: score(u, i) = user[u] . item[i]."""
        was_training = self.training
        self.eval()
        try:
            return self.propagate()
        finally:
            self.train(was_training)
