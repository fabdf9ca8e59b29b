"""Full-attention fallback: equals SDPA, reports what ran, override and errors."""

import pytest
import torch
import torch.nn.functional as F

import moba
import moba.ops.full as full


def _dense(q, k, v, causal=True, scale=None):
    """Plain SDPA reference in (B, S, H, D) layout, GQA by repeating K/V."""
    g = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2),
        is_causal=causal, scale=scale,
    )
    return out.transpose(1, 2)


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    return torch.randn(2, 17, 4, 8), torch.randn(2, 17, 2, 8), torch.randn(2, 17, 2, 8)


@pytest.mark.parametrize("causal", [True, False])
def test_full_attn_func_equals_sdpa_and_reports(qkv, monkeypatch, causal):
    monkeypatch.setattr(full, "_last_implementation", None)
    assert moba.last_full_attn_implementation() is None
    q, k, v = qkv
    out = moba.full_attn_func(q, k, v, causal=causal, softmax_scale=0.3)
    torch.testing.assert_close(out, _dense(q, k, v, causal, 0.3))
    assert moba.last_full_attn_implementation() == "sdpa"
    assert moba.full_attn_implementation(q) == "sdpa"  # CPU: flash-attn never applies


def test_full_attn_varlen_equals_per_sequence(qkv):
    q, k, v = (x.reshape(34, *x.shape[2:]) for x in qkv)
    cu = torch.tensor([0, 5, 5, 34], dtype=torch.int32)
    out = moba.full_attn_varlen_func(q, k, v, cu, 29, causal=True, implementation="sdpa")
    for a, b in [(0, 5), (5, 34)]:
        ref = _dense(q[None, a:b], k[None, a:b], v[None, a:b])[0]
        torch.testing.assert_close(out[a:b], ref)
    assert moba.last_full_attn_implementation() == "sdpa"


def test_implementation_override_and_errors(qkv):
    q, k, v = qkv
    torch.testing.assert_close(moba.full_attn_func(q, k, v, implementation="sdpa"), _dense(q, k, v, causal=False))
    with pytest.raises(ValueError, match="implementation must be one of"):
        moba.full_attn_func(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="implementation must be one of"):
        moba.full_attn_implementation(q, "xformers")
    # flash-attn needs the package and CUDA fp16/bf16 tensors: a clear error instead of a silent fallback
    with pytest.raises(RuntimeError, match="flash-attn package and CUDA"):
        moba.full_attn_func(q, k, v, implementation="flash_attn")


def test_full_with_kvcache_queries_at_the_end_and_padding(qkv):
    q, k, v = qkv
    ref = _dense(q, k, v)
    out = full.full_attn_with_kvcache(q[:, -3:], k, v)  # 3 newest queries over the whole cache
    torch.testing.assert_close(out, ref[:, -3:])
    assert moba.last_full_attn_implementation() == "sdpa"
    # left padding: row 1 has 5 pad tokens; its real outputs equal the unpadded run, pads give 0
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, :5] = False
    out = full.full_attn_with_kvcache(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, 5:], _dense(q[1:, 5:], k[1:, 5:], v[1:, 5:])[0])
    assert (out[1, :5] == 0).all()
    with pytest.raises(ValueError, match="Lq <= Lk"):
        full.full_attn_with_kvcache(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="key_padding_mask"):
        full.full_attn_with_kvcache(q[:, -1:], k, v, key_padding_mask=mask, implementation="flash_attn")


# -- flash-attn's call forms and defaults -----------------------------------------------------------


def test_defaults_and_positional_order_follow_flash_attn(qkv):
    """flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False): causal is off
    by default, and the 4th/5th/6th positional arguments are dropout_p, softmax_scale, causal."""
    q, k, v = qkv
    torch.testing.assert_close(moba.full_attn_func(q, k, v), _dense(q, k, v, causal=False))
    torch.testing.assert_close(moba.full_attn_func(q, k, v, 0.0, 0.3, True), _dense(q, k, v, True, 0.3))
    with pytest.raises(TypeError, match="4th positional argument is dropout_p.*causal=True"):
        moba.full_attn_func(q, k, v, True)  # the old (q, k, v, causal) order: refused, not read as dropout


def test_fewer_queries_than_keys_is_bottom_right_aligned(qkv):
    """flash-attn aligns the causal mask bottom-right: the last Sq queries of the keys."""
    q, k, v = qkv
    torch.testing.assert_close(moba.full_attn_func(q[:, -5:], k, v, causal=True), _dense(q, k, v)[:, -5:])
    torch.testing.assert_close(moba.full_attn_func(q[:, -5:], k, v), _dense(q[:, -5:], k, v, causal=False))
    with pytest.raises(ValueError, match="more tokens"):
        moba.full_attn_func(q, k[:, :5], v[:, :5], causal=True)


def test_varlen_flash_attn_positional_form(qkv):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
    causal) as flash_attn_varlen_func, with fewer queries than keys per sequence."""
    q, k, v = qkv
    lq = 4
    qv = q[:, -lq:].reshape(2 * lq, 4, 8)
    kv_, vv = (x.reshape(34, 2, 8) for x in (k, v))
    cu_q = torch.tensor([0, lq, 2 * lq], dtype=torch.int32)
    cu_k = torch.tensor([0, 17, 34], dtype=torch.int32)
    out = moba.full_attn_varlen_func(qv, kv_, vv, cu_q, cu_k, lq, 17, 0.0, 0.3, True)
    torch.testing.assert_close(out.reshape(2, lq, 4, 8), _dense(q, k, v, True, 0.3)[:, -lq:])
    by_name = moba.full_attn_varlen_func(qv, kv_, vv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=lq,
                                         max_seqlen_k=17, softmax_scale=0.3, causal=True)
    torch.testing.assert_close(by_name, out)
    # causal is False by default, as in flash-attn
    out = moba.full_attn_varlen_func(qv, kv_, vv, cu_q, cu_k, lq, 17)
    torch.testing.assert_close(out.reshape(2, lq, 4, 8), _dense(q[:, -lq:], k, v, causal=False))
    with pytest.raises(ValueError, match="sequence 0 has more queries"):
        moba.full_attn_varlen_func(kv_.repeat(1, 2, 1), qv[:, :2], qv[:, :2], cu_k, cu_q, 17, lq, causal=True)
    # the short self-attention form takes the rest by keyword; a stray positional is refused clearly
    with pytest.raises(TypeError, match="by keyword"):
        moba.full_attn_varlen_func(kv_.repeat(1, 2, 1), kv_, vv, cu_k, 17, True)


def test_dropout_is_applied_and_checked(qkv):
    q, k, v = qkv
    torch.manual_seed(0)
    dropped = moba.full_attn_func(q, k, v, 0.5)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, moba.full_attn_func(q, k, v))
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout_p must be a float in"):
            moba.full_attn_func(q, k, v, bad)
