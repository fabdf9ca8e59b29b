"""``moba.flex_block_mask``: FlexAttention with the MoBA BlockMask equals our operator.

FlexAttention runs forward on CPU in eager mode (it materialises the scores per call), so
the shapes are small. The same block indices go to both sides where the tolerance rule is
used; the gate-driven mask is also checked against ``moba_attn_func`` with its own gate.
"""

from __future__ import annotations

import pytest
import torch

import moba
from tests._helpers import assert_close_by_rule, random_qkv

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
flex_attention = flex_mod.flex_attention


def _flex(q, k, v, mask, scale=None):
    """flash layout in and out around flex_attention's (B, H, S, D)."""
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    "b,sq,sk,hq,hkv,bs,top_k,causal,q_block",
    [
        (2, 37, 37, 4, 2, 5, 3, True, 8),     # tail block, partial last query tile, GQA
        (1, 64, 64, 2, 2, 8, 2, True, 16),    # aligned: full blocks exist
        (1, 40, 40, 2, 1, 6, 3, False, 8),    # bidirectional
        (2, 9, 33, 2, 2, 4, 2, True, 4),      # queries = the last 9 of 33 keys (bottom-right)
        (1, 30, 30, 2, 2, 7, 100, True, 8),   # top_k >= blocks: dense causal
        (1, 70, 70, 2, 2, 2, 4, True, 8),     # 35 blocks: the bitset needs two words
    ],
)
def test_flex_block_mask_equals_moba(b, sq, sk, hq, hkv, bs, top_k, causal, q_block):
    q, k, v = random_qkv(b, sk, hq, hkv, 16)
    q = q[:, sk - sq:].contiguous()
    scale = 0.3
    mask = moba.flex_block_mask(q, k, bs, top_k, causal, q_block=q_block, layout="bshd")
    assert mask.shape == (b, hq, sq, sk)
    out = _flex(q, k, v, mask, scale)
    # Same gate on our side: compare with the tolerance rule against the float64 reference.
    ours = moba.moba_attn_func(q, k, v, bs, top_k, causal, scale, backend="torch")
    lowp = moba.moba_attn_func(q, k, v, bs, top_k, causal, scale, backend="reference")
    truth = moba.moba_attn_func(q.double(), k.double(), v.double(), bs, top_k, causal, scale, backend="reference")
    assert_close_by_rule(out, lowp, truth)
    assert_close_by_rule(ours, lowp, truth)


def test_flex_block_mask_float64_given_indices_and_layouts():
    q, k, v = random_qkv(2, 45, 4, 2, 8, dtype=torch.float64)
    idx = moba.select_blocks(q, k, 6, 3)
    idx = idx.flip(-1)  # any slot order, padding anywhere: the mask is a set of blocks
    mask = moba.flex_block_mask(q, k, 6, config=moba.MoBAConfig(6, 3), block_indices=idx, layout="bshd")
    want = moba.moba_attn_func(q, k, v, 6, block_indices=idx, backend="reference")
    assert (_flex(q, k, v, mask) - want).abs().max() < 1e-12
    # FlexAttention's own layout (the default) gives the same mask
    mask_bhsd = moba.flex_block_mask(q.transpose(1, 2), k.transpose(1, 2), config=moba.MoBAConfig(6, 3))
    assert (_flex(q, k, v, mask_bhsd) - want).abs().max() < 1e-12


def test_flex_block_mask_structure_is_sparse_and_not_quadratic():
    s, bs, q_block = 2048, 64, 128
    q, k, _ = random_qkv(1, s, 2, 2, 8)
    mask = moba.flex_block_mask(q, k, bs, 3, q_block=q_block, layout="bshd")
    nq, nb = s // q_block, s // bs
    assert mask.kv_indices.shape == (1, 2, nq, nb) and mask.full_kv_indices.shape == (1, 2, nq, nb)
    # every bit of state the mask holds is far below S * S
    held = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices]
    held += [c.cell_contents for c in mask.mask_mod.__closure__ if isinstance(c.cell_contents, torch.Tensor)]
    assert sum(t.numel() for t in held) < s * s // 16
    # a query tile of 128 rows touches at most its own 2 blocks + 2 * 128 picked past blocks,
    # and the tile at the start sees only causal blocks
    blocks_per_tile = mask.kv_num_blocks + mask.full_kv_num_blocks
    assert int(blocks_per_tile[0, :, 0].max()) <= 2
    # sparsity: far fewer (tile, block) pairs than the dense causal count
    dense_pairs = sum(min(nb, (t + 1) * q_block // bs) for t in range(nq)) * 2
    assert int(blocks_per_tile.sum()) < dense_pairs


def test_flex_block_mask_errors():
    q, k, _ = random_qkv(1, 16, 2, 2, 8)
    with pytest.raises(TypeError, match="needs block_size"):
        moba.flex_block_mask(q, k)
    with pytest.raises(ValueError, match="layout must be"):
        moba.flex_block_mask(q, k, 4, 2, layout="sbhd")
    with pytest.raises(ValueError, match="q has more tokens"):
        moba.flex_block_mask(q, k[:, :8], 4, 2, layout="bshd")
    with pytest.raises(ValueError, match="q_block must be >= 1"):
        moba.flex_block_mask(q, k, 4, 2, q_block=0)
    with pytest.raises(ValueError, match="future block"):
        idx = torch.full((1, 16, 2, 1), 3, dtype=torch.int32)
        moba.flex_block_mask(q, k, 4, block_indices=idx, layout="bshd")


def _truth_mask(idx, sq, sk, bs, causal):
    """(B, Hq, Sq, Sk) bool: key block selected by the query (and causal: key pos <= query pos)."""
    chosen = (idx.long()[..., None] == (torch.arange(sk) // bs)).any(dim=-2).permute(0, 2, 1, 3)
    if causal:
        chosen &= torch.arange(sk)[None, :] <= torch.arange(sk - sq, sk)[:, None]
    return chosen


def _pairs_to_elements(num, ind, q_block, bs, sq, sk):
    """(B, H, nq) counts + (B, H, nq, nb) indices -> (B, H, Sq, Sk) bool cover of those blocks."""
    nb = ind.shape[-1]
    listed = torch.arange(nb)[None, None, None, :] < num[..., None]
    pairs = torch.zeros(*ind.shape, dtype=torch.bool)
    pairs.scatter_(-1, ind.long(), listed)  # (B, H, nq, nb)
    el = pairs.repeat_interleave(q_block, dim=2).repeat_interleave(bs, dim=3)
    return el[:, :, :sq, :sk]


@pytest.mark.parametrize(
    "sq,sk,bs,top_k,causal,q_block",
    [(37, 37, 5, 3, True, 8), (64, 64, 8, 2, True, 16), (64, 64, 4, 100, True, 8), (40, 40, 6, 3, False, 8),
     (9, 33, 4, 2, True, 4), (24, 56, 8, 3, True, 8)],
)
def test_flex_block_structure_is_exact(sq, sk, bs, top_k, causal, q_block):
    """Compiled FlexAttention skips blocks not listed and never calls mask_mod on *full* blocks
    (the eager CPU path ignores both and applies mask_mod everywhere), so check the structure
    itself: full blocks are entirely allowed, and full | (partial & mask_mod) is exactly MoBA."""
    q, k, _ = random_qkv(2, sk, 4, 2, 8)
    q = q[:, sk - sq:]
    # the gate of the last sq queries (select_blocks takes Sq == Sk: pad in front, keep the tail)
    idx = moba.select_blocks(torch.cat([q.new_zeros(2, sk - sq, 4, 8), q], 1), k, bs, top_k, causal)[:, sk - sq:]
    mask = moba.flex_block_mask(q, k, bs, top_k, causal, q_block=q_block, layout="bshd", block_indices=idx)
    truth = _truth_mask(idx, sq, sk, bs, causal)
    full = _pairs_to_elements(mask.full_kv_num_blocks, mask.full_kv_indices, q_block, bs, sq, sk)
    partial = _pairs_to_elements(mask.kv_num_blocks, mask.kv_indices, q_block, bs, sq, sk)
    assert not (full & partial).any()
    assert truth[full].all(), "a block marked full holds a masked element"
    b_, h_, q_, k_ = (torch.arange(n).view(*[-1 if i == d else 1 for i in range(4)]) for d, n in
                      enumerate(truth.shape))
    element = mask.mask_mod(b_, h_, q_, k_)
    assert torch.equal(full | (partial & element), truth)
    if top_k >= 100:  # dense: every past block of a tile is full, so the structure is used
        assert full.any()
