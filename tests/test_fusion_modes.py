"""The fusion table agrees with what the torch fusion computes."""

from __future__ import annotations

import pytest
import torch

from cliper_prod.errors import ConfigError
from cliper_prod.features.fusion import FUSE, TRAINED_FUSIONS, ViewFusion
from cliper_prod.fusion_modes import EXTRACTION_FUSIONS, FUSION_MODES, fusion_mode


def test_every_fusion_has_an_implementation() -> None:
    assert set(FUSE) == {mode.extracted_as for mode in FUSION_MODES.values()}
    assert set(TRAINED_FUSIONS) == {name for name, mode in FUSION_MODES.items()
                                    if mode.trained_with_recommender}


@pytest.mark.parametrize("name", list(TRAINED_FUSIONS))
def test_a_trained_fusion_maps_its_concatenation_to_one_view_width(name: str) -> None:
    layer = TRAINED_FUSIONS[name](5, 8)
    assert layer(torch.randn(3, fusion_mode(name).text_width(5, 8))).shape == (3, layer.dim)
    assert layer.dim == 8


@pytest.mark.parametrize("name", list(FUSION_MODES))
def test_text_width_is_the_width_extraction_writes(name: str) -> None:
    mode = fusion_mode(name)
    views, image = torch.randn(3, 5, 8), torch.randn(3, 8)
    fused, _, _ = ViewFusion(mode.extracted_as)(views, image)
    assert fused.shape == (3, mode.text_width(5, 8))


def test_trained_modes_are_not_in_the_default_ablation() -> None:
    assert "mlp" not in EXTRACTION_FUSIONS and fusion_mode("mlp").trained_with_recommender


def test_unknown_fusion_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="available: sa, sum, concat, mlp"):
        fusion_mode("max")
