"""Consequences of the contract (docs/design.md section 1) checked against independent code:

* top_k >= n_blocks is dense attention (``F.scaled_dot_product_attention``);
* top_k = 1 is block-diagonal causal attention (explicit mask);
* a padded fixed-length batch equals the same sequences packed as varlen (real tokens);
* decoding a suffix of queries against a key prefix equals the rows of the full prefill.

All in float64 so the comparisons can be tight; the gate runs inside the op (no given
indices) unless stated.
"""

from __future__ import annotations

import pytest
import torch

import moba
from moba._core.layout import build_layout
from moba.ops.gate import select_packed
from moba.ops.torch_impl import sparse_attention_packed
from tests._helpers import (
    OUT_FACTOR,
    assert_close_by_rule,
    assert_grads_close_by_rule,
    block_diagonal_causal_mask,
    cu_seqlens_of,
    dense_sdpa_causal,
    detached_copies,
    forward_backward,
    masked_attention,
    random_qkv,
    usable_backends,
)

BACKENDS = usable_backends("cpu", exclude=())  # the reference must meet these too
F64 = torch.float64


def _dtype_ok(backend, dtype):
    return backend in ("torch", "reference") or dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "b,s,hq,hkv,d,bs,top_k",
    [
        pytest.param(2, 37, 4, 2, 8, 5, 8, id="gqa-k=nb"),
        pytest.param(1, 50, 2, 1, 16, 7, 100, id="mqa-k>nb"),
        pytest.param(1, 24, 2, 2, 8, 12, 2, id="mha-2blocks"),
    ],
)
def test_top_k_all_blocks_is_dense_attention(backend, causal, b, s, hq, hkv, d, bs, top_k):
    dtype = F64 if _dtype_ok(backend, F64) else torch.float32
    q, k, v = random_qkv(b, s, hq, hkv, d, dtype)
    dout = torch.randn(b, s, hq, d, dtype=F64)
    moba_fn = lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, bs, top_k, causal, backend=backend)
    dense_fn = lambda q_, k_, v_: dense_sdpa_causal(q_, k_, v_, causal=causal)
    out, grads = forward_backward(moba_fn, detached_copies(q, k, v), dout)
    out_d, grads_d = forward_backward(dense_fn, detached_copies(q, k, v, dtype=F64), dout)
    if dtype == F64:
        torch.testing.assert_close(out, out_d, rtol=0, atol=1e-12)
        for g, g_d in zip(grads, grads_d, strict=True):
            torch.testing.assert_close(g, g_d, rtol=0, atol=1e-12)
    else:
        out_lo, grads_lo = forward_backward(dense_fn, detached_copies(q, k, v), dout)
        assert_close_by_rule(out, out_lo, out_d, OUT_FACTOR)
        assert_grads_close_by_rule(grads, grads_lo, grads_d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "s,hq,hkv,bs",
    [
        pytest.param(37, 4, 2, 5, id="gqa-bs5"),
        pytest.param(30, 2, 1, 12, id="mqa-bs12"),
        pytest.param(9, 2, 2, 1, id="bs1"),
    ],
)
def test_top_k_1_is_block_diagonal_attention(backend, causal, s, hq, hkv, bs):
    dtype = F64 if _dtype_ok(backend, F64) else torch.float32
    q, k, v = random_qkv(2, s, hq, hkv, 8, dtype)
    dout = torch.randn(q.shape, dtype=F64)
    mask = block_diagonal_causal_mask(s, bs, causal)
    moba_fn = lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, bs, 1, causal, backend=backend)
    dense_fn = lambda q_, k_, v_: masked_attention(q_, k_, v_, mask)
    out, grads = forward_backward(moba_fn, detached_copies(q, k, v), dout)
    out_d, grads_d = forward_backward(dense_fn, detached_copies(q, k, v, dtype=F64), dout)
    if dtype == F64:
        torch.testing.assert_close(out, out_d, rtol=0, atol=1e-12)
        for g, g_d in zip(grads, grads_d, strict=True):
            torch.testing.assert_close(g, g_d, rtol=0, atol=1e-12)
    else:
        out_lo, grads_lo = forward_backward(dense_fn, detached_copies(q, k, v), dout)
        assert_close_by_rule(out, out_lo, out_d, OUT_FACTOR)
        assert_grads_close_by_rule(grads, grads_lo, grads_d)


def test_softmax_scale_matches_dense():
    q, k, v = random_qkv(1, 20, 2, 1, 8, F64)
    out = moba.moba_attn_func(q, k, v, 4, 5, softmax_scale=0.37, backend="torch")
    torch.testing.assert_close(out, dense_sdpa_causal(q, k, v, softmax_scale=0.37), rtol=0, atol=1e-12)


def _pad_and_pack(lengths, hq, hkv, d, dtype):
    """Padded fixed-length batch (pad at the end) and the same real tokens packed."""
    s = max(lengths)
    qp, kp, vp = random_qkv(len(lengths), s, hq, hkv, d, dtype)
    real = torch.zeros(len(lengths), s, dtype=torch.bool)
    for i, n in enumerate(lengths):
        real[i, :n] = True
    pack = lambda x: x[real]  # (T, H, D), sequence by sequence
    return (qp, kp, vp), (pack(qp), pack(kp), pack(vp)), real, cu_seqlens_of(lengths), s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lengths,bs,top_k",
    [
        pytest.param([37, 20, 5, 1], 6, 3, id="bs6-k3"),
        pytest.param([30, 11, 29], 7, 2, id="bs7-k2"),
        pytest.param([13, 1, 8], 5, 1, id="bs5-k1"),
        pytest.param([26, 25], 4, 99, id="bs4-kall"),
    ],
)
def test_padded_batch_equals_varlen(backend, lengths, bs, top_k):
    """Causal: real tokens never see the padding (it is at the end and in no complete past
    block), so outputs and the gradients of real tokens agree. Padded query rows get a zero
    output gradient so they add nothing to dK/dV of real tokens."""
    dtype = F64 if _dtype_ok(backend, F64) else torch.float32
    (qp, kp, vp), (q, k, v), real, cu, s = _pad_and_pack(lengths, 4, 2, 8, dtype)
    dout_p = torch.randn(qp.shape, dtype=F64) * real[..., None, None]
    dout = dout_p[real]
    fixed_fn = lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, bs, top_k, backend=backend)
    var_fn = lambda q_, k_, v_: moba.moba_attn_varlen_func(q_, k_, v_, cu, s, bs, top_k, backend=backend)
    out_p, grads_p = forward_backward(fixed_fn, detached_copies(qp, kp, vp), dout_p)
    out_v, grads_v = forward_backward(var_fn, detached_copies(q, k, v), dout)
    atol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(out_p[real], out_v, rtol=0, atol=atol)
    for g_p, g_v in zip(grads_p, grads_v, strict=True):
        torch.testing.assert_close(g_p[real], g_v, rtol=0, atol=atol)


@pytest.mark.parametrize("top_k", [1, 2, 3, 50])
def test_gate_padded_batch_equals_varlen(top_k):
    lengths = [37, 20, 5, 1, 36]
    (qp, kp, _), (q, k, _), real, cu, s = _pad_and_pack(lengths, 4, 2, 8, torch.float32)
    idx_p = moba.select_blocks(qp, kp, 6, top_k)
    idx_v = moba.select_blocks_varlen(q, k, cu, s, 6, top_k)
    assert torch.equal(idx_p[real], idx_v)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize(
    "t,n_queries", [(1, 1), (12, 1), (12, 3), (13, 1), (13, 3), (29, 1), (29, 3), (36, 3), (40, 1)]
)
def test_decode_suffix_equals_prefill_rows(n_queries, top_k, t):
    """Queries = the last n_queries positions of a t-token key prefix (KV-cache decoding):
    same block indices and same outputs as rows t - n_queries .. t - 1 of the full prefill
    over a longer sequence (the prefill's rows only see keys <= their position)."""
    s_full, hq, hkv, d, bs = 40, 4, 2, 8, 6
    q, k, v = random_qkv(1, s_full, hq, hkv, d, F64)
    full_idx = moba.select_blocks(q, k, bs, top_k)
    full_out = moba.moba_attn_func(q, k, v, bs, top_k, backend="torch")

    layout = build_layout([0, n_queries], [0, t], bs, "cpu")
    q_dec = q[0, t - n_queries : t]
    k_cache, v_cache = k[0, :t], v[0, :t]
    idx = select_packed(q_dec, k_cache, layout, top_k, True)
    # the decode gate sees only t keys; pad its width like the prefill's for comparison
    rows = full_idx[0, t - n_queries : t]
    width = idx.shape[-1]
    assert torch.equal(idx, rows[..., :width])
    assert (rows[..., width:] == moba.PAD_INDEX).all()
    out, _ = sparse_attention_packed(q_dec, k_cache, v_cache, layout, idx, True, d**-0.5)
    torch.testing.assert_close(out, full_out[0, t - n_queries : t], rtol=0, atol=1e-12)
