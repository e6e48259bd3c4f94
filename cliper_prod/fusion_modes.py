"""The one table of CLIPER's fusion modes (paper Sec. 3.3): name -> what extraction computes,
how wide the text feature is, and whether the recommender trains the fusion.

Torch-free, so the command line builds its choices from it and a serving host reads a bundle's
mode without torch. The torch implementations live in :mod:`cliper_prod.features.fusion`:
``FUSE`` for what extraction computes and ``TRAINED_FUSIONS`` for the layers a backbone trains
(a test holds both against this table). Adding a mode is an entry here and its implementation
there.
"""

from __future__ import annotations

from dataclasses import dataclass

from cliper_prod.errors import ConfigError


@dataclass(frozen=True)
class FusionMode:
    """One fusion mode.

    Attributes:
        name: the mode's name on the command line and in ``embed_summary.json``.
        extracted_as: the fusion the extraction graph computes (a mode trained with the
            recommender is extracted as the concatenation it learns from).
        concatenates: the extracted text feature is the V view embeddings side by side,
            [N, V * D], instead of one [N, D] vector.
        trained_with_recommender: the backbone owns and trains the fusion layer.
        help: one line for ``--help``.
    """

    name: str
    extracted_as: str
    concatenates: bool
    trained_with_recommender: bool
    help: str

    def text_width(self, n_views: int, dim: int) -> int:
        """Width of the extracted text feature for ``n_views`` views of width ``dim``."""
        return n_views * dim if self.concatenates else dim


FUSION_MODES: dict[str, FusionMode] = {mode.name: mode for mode in (
    FusionMode("sa", "sa", False, False,
               "views weighted by softmax of their image similarity / tau (the paper's default)"),
    FusionMode("sum", "sum", False, False, "views summed"),
    FusionMode("concat", "concat", True, False, "views concatenated, V x D wide"),
    FusionMode("mlp", "concat", True, True,
               "views concatenated at extraction, fused by a layer trained with the recommender"),
)}

#: Every mode, in table order (``--fusion`` choices).
FUSION_NAMES: tuple[str, ...] = tuple(FUSION_MODES)

#: Modes whose fusion is fixed at extraction (what ``ablate-fusion`` compares by default: a
#: trained mode needs a backbone setting to train it, see FREEDOM's reg_weight).
EXTRACTION_FUSIONS: tuple[str, ...] = tuple(
    name for name, mode in FUSION_MODES.items() if not mode.trained_with_recommender)


def fusion_mode(name: str) -> FusionMode:
    """The mode called ``name``; an unknown name is a configuration error."""
    try:
        return FUSION_MODES[name]
    except KeyError:
        raise ConfigError(f"unknown fusion {name!r}; available: {', '.join(FUSION_NAMES)}"
                          ) from None
