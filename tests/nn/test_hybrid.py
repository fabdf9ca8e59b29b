"""The one hybrid rule (moba.nn.hybrid): every caller that decides "which layers are full" uses it."""

from __future__ import annotations

import pytest

from moba.nn import HybridSchedule, hybrid
from scaling_runs.config import ModelConfig


def test_full_layers_counts_negative_indices_from_the_end():
    assert hybrid.full_layers(4, [0, -1]) == {0, 3}
    assert hybrid.full_layers(4, last_n=2) == {2, 3}
    assert hybrid.layer_modes(4, [1], last_n=1) == ["moba", "full", "moba", "full"]
    assert hybrid.layer_modes(3) == ["moba"] * 3


@pytest.mark.parametrize("layers,last_n", [([4], 0), ([-5], 0), ([], 5)])
def test_out_of_range_is_a_value_error(layers, last_n):
    with pytest.raises(ValueError, match="out of range|full_last_n"):
        hybrid.full_layers(4, layers, last_n)


def test_callers_agree():
    schedule = HybridSchedule(full_layers=(0,), full_last_n=1)
    assert schedule.modes(n_layers=4, step=0) == hybrid.layer_modes(4, [0], 1)
    cfg = ModelConfig(n_layer=4, attention="hybrid", n_full_layers=2)
    assert cfg.layer_modes() == hybrid.layer_modes(4, last_n=2) == ["moba", "moba", "full", "full"]
    assert ModelConfig(n_layer=3, attention="moba").layer_modes() == ["moba"] * 3
    assert ModelConfig(n_layer=3, attention="full").layer_modes() == ["full"] * 3
