"""select_blocks / select_blocks_varlen take the argument forms of moba_attn_func /
moba_attn_varlen_func, and what they return is what those functions select; q/k in the
(batch, heads, seqlen, head_dim) layout get an error that says so."""

import pytest
import torch

import moba
from tests._helpers import cu_seqlens_of

BS, TOP_K = 4, 2


def _qkv(b=2, sq=10, sk=18, hq=4, hkv=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, s, h, d, generator=gen) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))


@pytest.mark.parametrize("causal", [True, False])
def test_fewer_queries_than_keys_match_the_attention(causal):
    """Queries are the last Sq key positions: the indices give moba_attn_func's own result."""
    q, k, v = _qkv()
    idx = moba.select_blocks(q, k, BS, TOP_K, causal)
    assert idx.shape[:3] == q.shape[:3]
    given = moba.moba_attn_func(q, k, v, BS, causal=causal, block_indices=idx, backend="reference")
    gated = moba.moba_attn_func(q, k, v, BS, TOP_K, causal, backend="reference")
    torch.testing.assert_close(given, gated, rtol=0, atol=0)
    # the last query sits at key position 17: its own block is 17 // 4 = 4
    assert (idx[:, -1, :, :] == 4).any(dim=-1).all()


def test_config_and_official_names():
    q, k, _ = _qkv(sq=18)
    ref = moba.select_blocks(q, k, BS, TOP_K)
    assert torch.equal(moba.select_blocks(q, k, config=moba.MoBAConfig(BS, TOP_K)), ref)
    assert torch.equal(moba.select_blocks(q, k, moba_chunk_size=BS, moba_topk=TOP_K), ref)
    assert torch.equal(moba.select_blocks(q, k, block_size=BS, top_k=TOP_K, causal=True), ref)
    non_causal = moba.select_blocks(q, k, config=moba.MoBAConfig(BS, TOP_K, causal=False))
    assert torch.equal(non_causal, moba.select_blocks(q, k, BS, TOP_K, False))
    with pytest.raises(ValueError, match="conflicts"):
        moba.select_blocks(q, k, 8, config=moba.MoBAConfig(BS, TOP_K))
    with pytest.raises(TypeError, match="needs top_k"):
        moba.select_blocks(q, k, BS)


def test_varlen_forms_match_the_attention():
    lq, lk = [3, 0, 5], [9, 4, 12]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lq), 4, 8, generator=gen)
    k, v = (torch.randn(sum(lk), 2, 8, generator=gen) for _ in range(2))
    cu_q, cu_k = cu_seqlens_of(lq), cu_seqlens_of(lk)
    flash = moba.select_blocks_varlen(q, k, cu_q, cu_k, 5, 12, BS, TOP_K)
    by_name = moba.select_blocks_varlen(q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5,
                                        max_seqlen_k=12, config=moba.MoBAConfig(BS, TOP_K))
    assert torch.equal(flash, by_name)
    out = moba.moba_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 12, BS, block_indices=flash, backend="reference")
    gated = moba.moba_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 12, BS, TOP_K, backend="reference")
    torch.testing.assert_close(out, gated, rtol=0, atol=0)
    # the self-attention form, positional and by keyword (the original signature)
    cu = cu_seqlens_of(lk)
    qs = torch.randn(sum(lk), 4, 8, generator=gen)
    assert torch.equal(moba.select_blocks_varlen(qs, k, cu, 12, BS, TOP_K),
                       moba.select_blocks_varlen(qs, k, cu_seqlens=cu, max_seqlen=12, block_size=BS, top_k=TOP_K))
    with pytest.raises(ValueError, match="more queries"):
        moba.select_blocks_varlen(k.repeat(1, 2, 1), q[:, :2], cu_k, cu_q, 12, 5, BS, TOP_K)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1), (6, 3)])
def test_bhsd_layout_gets_an_error_that_says_so(hq, hkv):
    """(B, H, S, D) tensors with different head counts fail the (B, S, H, D) checks; the error
    names the layout and the fix instead of a misleading length complaint."""
    q, k, _ = _qkv(sq=16, sk=16, hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match=r"look like the \(batch, heads, seqlen, head_dim\) layout.*transpose\(1, 2\)"):
        moba.select_blocks(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), BS, TOP_K)
    moba.select_blocks(q, k, BS, TOP_K)  # the right layout passes


def test_more_queries_than_keys_without_a_transposed_reading_has_no_layout_hint():
    q, k, _ = _qkv(sq=12, sk=8, hq=4, hkv=4)
    with pytest.raises(ValueError) as err:
        moba.select_blocks(q, k, BS, TOP_K)
    assert "more tokens" in str(err.value) and "layout" not in str(err.value)
