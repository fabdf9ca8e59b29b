"""A ``BlockMeanState`` belongs to one cache: reusing it with another cache raises (issue 17).

Before the check, a state filled from cache A and then given cache B silently produced the
gate means of A's keys for B's queries.
"""

from __future__ import annotations

import pytest
import torch

import moba
from moba.decode import BlockMeanState


def _decode_steps(state, k, v, q, start, stop):
    outs = []
    for t in range(start, stop):
        outs.append(moba.moba_decode(q[:, t:t + 1], k[:, : t + 1], v[:, : t + 1], state, 4, 2, backend="torch"))
    return outs


def test_state_reused_with_another_cache_raises():
    k_a, v_a, q = (torch.randn(2, 12, 2, 8) for _ in range(3))
    k_b, v_b = torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    state = BlockMeanState(4)
    _decode_steps(state, k_a, v_a, q, 0, 9)
    with pytest.raises(ValueError, match="filled from another cache"):
        _decode_steps(state, k_b, v_b, q, 9, 10)
    # same first token (e.g. a shared BOS), different later keys: still caught
    k_c = k_a.clone()
    k_c[:, 1:] = k_b[:, 1:]
    with pytest.raises(ValueError, match="filled from another cache"):
        _decode_steps(state, k_c, v_b, q, 9, 10)
    state.clear()  # an explicit reset makes it reusable, and correct for the new cache
    out = _decode_steps(state, k_b, v_b, q, 9, 10)[0]
    want = moba.moba_attn_func(q[:, :10], k_b[:, :10], v_b[:, :10], 4, 2, backend="reference")[:, 9:10]
    assert (out - want).abs().max() < 1e-5


def test_normal_use_never_raises_crops_beams_and_nan():
    k, v, q = (torch.randn(3, 20, 2, 8) for _ in range(3))
    k[1, 5] = float("nan")  # a NaN key is still the same key (bytes are compared)
    state = BlockMeanState(4)
    _decode_steps(state, k, v, q, 0, 14)
    # a crop (rejected speculative tokens): shorter cache, then growing again
    moba.moba_decode(q[:, 9:11], k[:, :11], v[:, :11], state, 4, 2, backend="torch")
    _decode_steps(state, k, v, q, 11, 13)
    # beam search: rows reordered / repeated in the state and the cache alike
    order = torch.tensor([2, 0, 1])
    state.select_rows(order)
    k, v, q = k[order], v[order], q[order]
    _decode_steps(state, k, v, q, 13, 15)
    state.repeat_rows(2)
    k, v, q = (x.repeat_interleave(2, dim=0) for x in (k, v, q))
    _decode_steps(state, k, v, q, 15, 17)
    # a fresh prefill of the same cache object after clear() (what integrations do on a new prompt)
    state.clear()
    _decode_steps(state, k, v, q, 0, 3)
