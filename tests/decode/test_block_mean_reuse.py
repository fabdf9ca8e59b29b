"""Reusing a ``BlockMeanState`` with another cache is caught at every block's last key, not only
at the first and last cached keys: a second prompt sharing its first and last token (so layer-0
keys agree there) used to get the first prompt's block means silently."""

from __future__ import annotations

import pytest
import torch

import moba
from moba.decode import BlockMeanState


def test_reuse_with_same_first_and_last_key_is_caught():
    g = torch.Generator().manual_seed(0)
    k_a, v_a = torch.randn(1, 40, 2, 8, generator=g), torch.randn(1, 40, 2, 8, generator=g)
    q = torch.randn(1, 1, 4, 8, generator=g)
    state = BlockMeanState(8)
    moba.moba_decode(q, k_a, v_a, state, 8, 2, backend="torch")  # the state now holds A's 40 keys
    k_b = torch.randn(1, 41, 2, 8, generator=g)
    k_b[:, 0], k_b[:, 39] = k_a[:, 0], k_a[:, 39]  # same first and last key as A
    v_b = torch.randn(1, 41, 2, 8, generator=g)
    with pytest.raises(ValueError, match="filled from another cache"):
        moba.moba_decode(q, k_b, v_b, state, 8, 2, backend="torch")


@pytest.mark.parametrize("changed", [7, 15, 23, 31])
def test_a_change_at_any_block_end_is_caught(changed):
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 40, 2, 8, generator=g), torch.randn(2, 40, 2, 8, generator=g)
    q = torch.randn(2, 1, 4, 8, generator=g)
    state = BlockMeanState(8)
    moba.moba_decode(q, k[:, :39], v[:, :39], state, 8, 2, backend="torch")
    other = k.clone()
    other[1, changed] += 1.0
    with pytest.raises(ValueError, match="filled from another cache"):
        moba.moba_decode(q, other, v, state, 8, 2, backend="torch")
    state.clear()
    out = moba.moba_decode(q, other, v, state, 8, 2, backend="torch")  # after clear(): exact again
    want = moba.moba_attn_func(torch.cat([torch.zeros(2, 39, 4, 8), q], 1), other, v, 8, 2,
                               backend="reference")[:, -1:]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_crop_and_left_padding_still_pass():
    """Legitimate edits (a crop, left padding, growth) never trip the check."""
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 30, 2, 8, generator=g), torch.randn(2, 30, 2, 8, generator=g)
    q = torch.randn(2, 30, 4, 8, generator=g)
    state = BlockMeanState(4)
    for t in range(10, 20):
        moba.moba_decode(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], state, 4, 2, starts=[0, 3], backend="torch")
    moba.moba_decode(q[:, 13:15], k[:, :15], v[:, :15], state, 4, 2, starts=[0, 3], backend="torch")  # crop
    for t in range(15, 25):
        out = moba.moba_decode(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], state, 4, 2, starts=[0, 3],
                               backend="torch")
    want = moba.moba_attn_func(q[:1, :25], k[:1, :25], v[:1, :25], 4, 2, backend="reference")[:, -1:]
    torch.testing.assert_close(out[:1], want, rtol=1e-5, atol=1e-5)
