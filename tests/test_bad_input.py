"""Bad input raises the documented error with a message that names the argument; odd but
legal input (empty sequences, T = 0, non-finite values) works."""

from __future__ import annotations

import pytest
import torch
from _helpers import cu_seqlens_of, random_qkv, random_varlen

import moba
from moba.backends import REFERENCE_MAX_SEQLEN


def qkv(b=1, s=12, hq=4, hkv=2, d=8, dtype=torch.float32):
    return random_qkv(b, s, hq, hkv, d, dtype)


def fixed_call(q, k, v, **kw):
    args = dict(block_size=4, top_k=2)
    args.update(kw)
    return moba.moba_attn_func(q, k, v, **args)


def varlen_call(q, k, v, cu, max_seqlen, **kw):
    args = dict(block_size=4, top_k=2)
    args.update(kw)
    return moba.moba_attn_varlen_func(q, k, v, cu, max_seqlen, **args)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank_fixed(which):
    t = dict(zip("qkv", qkv(), strict=True))
    t[which] = t[which][0]  # drop the batch dimension
    with pytest.raises(ValueError, match=rf"^{which} must have 4 dimensions"):
        fixed_call(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank_varlen(which):
    q, k, v, cu, m = random_varlen([5, 7], 4, 2, 8)
    t = dict(q=q, k=k, v=v)
    t[which] = t[which][None]
    with pytest.raises(ValueError, match=rf"^{which} must have 3 dimensions"):
        varlen_call(t["q"], t["k"], t["v"], cu, m)


def test_gate_wrong_rank():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        moba.select_blocks(q[0], k, 4, 2)
    with pytest.raises(ValueError, match="k must have 3 dimensions"):
        moba.select_blocks_varlen(q[0], k, cu_seqlens_of([12]), 12, 4, 2)


def test_mismatched_batch():
    q, _, _ = qkv(b=2)
    _, k, v = qkv(b=1)
    with pytest.raises(ValueError, match="q and k must agree on batch"):
        fixed_call(q, k, v)


def test_mismatched_seqlen():
    q, _, _ = qkv(s=12)
    _, k, v = qkv(s=10)
    with pytest.raises(ValueError, match=r"q has more tokens \(12\) than k \(10\)"):
        fixed_call(q, k, v)  # fewer queries than keys is legal (bottom-right aligned), more is not


def test_mismatched_total_tokens_varlen():
    q, k, v, cu, m = random_varlen([5, 7], 4, 2, 8)
    with pytest.raises(ValueError, match="q and k must agree on total tokens"):
        varlen_call(q[:-1], k, v, cu, m)


def test_mismatched_head_dim():
    q, _, _ = qkv(d=8)
    _, k, v = qkv(d=16)
    with pytest.raises(ValueError, match="head_dim"):
        fixed_call(q, k, v)


def test_k_v_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fixed_call(q, k, v[..., :4])


@pytest.mark.parametrize("hq,hkv", [(4, 3), (2, 4), (3, 2)])
def test_heads_not_divisible(hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match=rf"query heads \({hq}\).*key/value heads \({hkv}\)"):
        fixed_call(q, k, v)
    with pytest.raises(ValueError, match="heads"):
        moba.select_blocks(q, k, 4, 2)


# --------------------------------------------------------------------------- dtypes, devices


@pytest.mark.parametrize("which", ["k", "v"])
def test_mismatched_dtype(which):
    t = dict(zip("qkv", qkv(), strict=True))
    t[which] = t[which].double()
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        fixed_call(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype(dtype):
    q, k, v = (x.to(dtype) for x in qkv())
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        fixed_call(q, k, v)
    with pytest.raises(TypeError, match="q must be float16"):
        moba.select_blocks(q, k, 4, 2)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        fixed_call(q, k.numpy(), v)


def test_mismatched_device():
    q, k, v = qkv()
    try:
        k_meta = torch.empty(k.shape, dtype=k.dtype, device="meta")
    except Exception as exc:  # pragma: no cover - meta tensors exist in every supported torch
        pytest.skip(f"meta device unavailable: {exc}")
    with pytest.raises(ValueError, match="must be on one device"):
        fixed_call(q, k_meta, k_meta)


# --------------------------------------------------------------------------- scalar arguments


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(block_size=0), ValueError, "block_size must be >= 1"),
        (dict(block_size=-3), ValueError, "block_size must be >= 1"),
        (dict(block_size=4.0), TypeError, "block_size must be an int"),
        (dict(block_size="4"), TypeError, "block_size must be an int"),
        (dict(block_size=True), TypeError, "block_size must be an int"),
        (dict(top_k=0), ValueError, "top_k must be >= 1"),
        (dict(top_k=-1), ValueError, "top_k must be >= 1"),
        (dict(top_k=2.5), TypeError, "top_k must be an int"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
        (dict(softmax_scale="x"), TypeError, "softmax_scale"),
        (dict(backend="cuda-magic"), ValueError, "unknown backend 'cuda-magic'"),
        (dict(backend=3), TypeError, "backend must be a str"),
    ],
)
def test_bad_scalar_arguments(kw, exc, pattern):
    q, k, v = qkv()
    with pytest.raises(exc, match=pattern):
        fixed_call(q, k, v, **kw)
    qv, kv, vv, cu, m = random_varlen([5, 7], 4, 2, 8)
    with pytest.raises(exc, match=pattern):
        varlen_call(qv, kv, vv, cu, m, **kw)


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=2.0), TypeError, "block_size"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(causal="yes"), TypeError, "causal"),
    ],
)
def test_gate_bad_scalar_arguments(kw, exc, pattern):
    q, k, _ = qkv()
    args = dict(block_size=4, top_k=2, causal=True)
    args.update(kw)
    with pytest.raises(exc, match=pattern):
        moba.select_blocks(q, k, **args)
    qv, kv, _, cu, m = random_varlen([5, 7], 4, 2, 8)
    with pytest.raises(exc, match=pattern):
        moba.select_blocks_varlen(qv, kv, cu, m, **args)


def test_unavailable_backend_is_a_clear_error():
    reasons = moba.available_backends("cpu")
    unavailable = [name for name, why in reasons.items() if why is not None]
    if not unavailable:
        pytest.skip("every backend is available on the CPU here")
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=f"backend '{unavailable[0]}' is not available"):
        fixed_call(q, k, v, backend=unavailable[0])


# --------------------------------------------------------------------------- cu_seqlens


def test_cu_seqlens_not_int32():
    q, k, v, cu, m = random_varlen([5, 7], 4, 2, 8)
    for bad in (cu.long(), cu.float()):
        with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor"):
            varlen_call(q, k, v, bad, m)
        with pytest.raises(TypeError, match="cu_seqlens"):
            moba.select_blocks_varlen(q, k, bad, m, 4, 2)


def test_cu_seqlens_not_a_tensor():
    q, k, v, _, m = random_varlen([5, 7], 4, 2, 8)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        varlen_call(q, k, v, [0, 5, 12], m)


@pytest.mark.parametrize(
    "bounds,pattern",
    [
        ([0, 7, 5, 12], "cu_seqlens must be non-decreasing"),
        ([1, 5, 12], r"cu_seqlens\[0\] must be 0"),
        ([0, 5, 11], r"cu_seqlens\[-1\] must equal the total number of tokens 12"),
        ([0, 5, 13], r"cu_seqlens\[-1\]"),
        ([0], r"cu_seqlens must have shape"),
        ([[0, 5], [5, 12]], r"cu_seqlens must have shape"),
    ],
)
def test_bad_cu_seqlens_values(bounds, pattern):
    q, k, v, _, m = random_varlen([5, 7], 4, 2, 8)
    cu = torch.tensor(bounds, dtype=torch.int32)
    with pytest.raises(ValueError, match=pattern):
        varlen_call(q, k, v, cu, m)
    with pytest.raises(ValueError, match=pattern):
        moba.select_blocks_varlen(q, k, cu, m, 4, 2)


def test_max_seqlen_too_small():
    q, k, v, cu, _ = random_varlen([5, 7], 4, 2, 8)
    with pytest.raises(ValueError, match=r"max_seqlen \(6\) is smaller than the longest sequence \(7\)"):
        varlen_call(q, k, v, cu, 6)
    with pytest.raises(TypeError, match="max_seqlen must be an int"):
        varlen_call(q, k, v, cu, 7.0)
    varlen_call(q, k, v, cu, 100)  # an upper bound is fine


# --------------------------------------------------------------------------- block_indices


def _idx_fixed():
    q, k, v = qkv(b=1, s=12)  # block_size 4 -> 3 blocks
    idx = moba.select_blocks(q, k, 4, 2)
    return q, k, v, idx


def test_block_indices_wrong_shape():
    q, k, v, idx = _idx_fixed()
    with pytest.raises(ValueError, match=r"block_indices must have shape \(1, 12, 4, 'n_slots'\)"):
        fixed_call(q, k, v, block_indices=idx[:, :-1])
    with pytest.raises(ValueError, match="block_indices must have shape"):
        fixed_call(q, k, v, block_indices=idx[..., 0])
    with pytest.raises(ValueError, match="block_indices"):
        fixed_call(q, k, v, block_indices=idx[..., :0])


def test_block_indices_wrong_dtype():
    q, k, v, idx = _idx_fixed()
    with pytest.raises(TypeError, match="block_indices must be an int32 or int64 tensor"):
        fixed_call(q, k, v, block_indices=idx.float())


@pytest.mark.parametrize("value", [3, 100, -2])
def test_block_indices_out_of_range(value):
    q, k, v, idx = _idx_fixed()
    bad = idx.clone()
    bad[0, 5, 1, -1] = value
    with pytest.raises(ValueError, match="block_indices holds a value outside"):
        fixed_call(q, k, v, block_indices=bad, causal=False)


def test_block_indices_out_of_range_of_own_sequence_varlen():
    """Block 2 exists in sequence 1 (9 tokens) but not in sequence 0 (5 tokens, 2 blocks)."""
    q, k, v, cu, m = random_varlen([5, 9], 2, 1, 8)
    idx = moba.select_blocks_varlen(q, k, cu, m, 4, 3, causal=False)
    bad = idx.clone()
    bad[0, 0] = torch.tensor([0, 2, -1], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_indices holds a value outside"):
        varlen_call(q, k, v, cu, m, causal=False, block_indices=bad)


def test_block_indices_future_block_causal():
    q, k, v, idx = _idx_fixed()
    bad = idx.clone()
    bad[0, 1, 0] = torch.tensor([0, 2], dtype=torch.int32)  # query 1 is in block 0
    with pytest.raises(ValueError, match="future block"):
        fixed_call(q, k, v, block_indices=bad, causal=True)
    fixed_call(q, k, v, block_indices=bad, causal=False)  # fine without causality


def test_block_indices_duplicates():
    q, k, v, idx = _idx_fixed()
    bad = idx.clone()
    bad[0, 11, 2] = torch.tensor([2, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="the same block twice"):
        fixed_call(q, k, v, block_indices=bad)


def test_block_indices_all_pad_row():
    q, k, v, idx = _idx_fixed()
    bad = idx.clone()
    bad[0, 7, 3] = moba.PAD_INDEX
    with pytest.raises(ValueError, match="no selected block"):
        fixed_call(q, k, v, block_indices=bad)


def test_block_indices_varlen_wrong_shape():
    q, k, v, cu, m = random_varlen([5, 9], 4, 2, 8)
    idx = moba.select_blocks_varlen(q, k, cu, m, 4, 2)
    with pytest.raises(ValueError, match="block_indices must have shape"):
        varlen_call(q, k, v, cu, m, block_indices=idx[:, :2])


# --------------------------------------------------------------------------- reference limit


def test_reference_backend_rejects_long_sequences():
    s = REFERENCE_MAX_SEQLEN + 1
    q = torch.zeros(1, s, 1, 1)
    with pytest.raises(ValueError, match="reference"):
        moba.moba_attn_func(q, q, q, s, 1, backend="reference")
    cu = cu_seqlens_of([3, s])
    qv = torch.zeros(s + 3, 1, 1)
    with pytest.raises(ValueError, match="reference"):
        moba.moba_attn_varlen_func(qv, qv, qv, cu, s, s, 1, backend="reference")


# --------------------------------------------------------------------------- legal edge cases


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_sequences_inside_varlen(backend):
    q, k, v, cu, m = random_varlen([0, 6, 0, 0, 9, 0], 4, 2, 8, requires_grad=True)
    out = varlen_call(q, k, v, cu, m, backend=backend)
    assert out.shape == q.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_zero_tokens_in_total(backend):
    q, k, v, cu, m = random_varlen([0, 0], 4, 2, 8, requires_grad=True)
    out = varlen_call(q, k, v, cu, m, backend=backend)
    assert out.shape == (0, 4, 8)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fixed_zero_batch(backend):
    q, k, v = qkv(b=0, s=5)
    assert fixed_call(q, k, v, backend=backend).shape == q.shape


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fixed_zero_seqlen(backend):
    """S = 0 should give an empty output (as varlen T = 0 does), or at least a clear ValueError."""
    q, k, v = qkv(b=2, s=0)
    try:
        out = fixed_call(q, k, v, backend=backend)
    except ValueError as exc:
        assert "seqlen" in str(exc)
    else:
        assert out.shape == q.shape


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_nan_query_row_stays_in_its_row(backend):
    q, k, v = qkv(b=2, s=16)
    idx = moba.select_blocks(q, k, 4, 2)
    clean = fixed_call(q, k, v, backend=backend, block_indices=idx)
    q_bad = q.clone()
    q_bad[1, 9, 2, 3] = float("nan")
    out = fixed_call(q_bad, k, v, backend=backend, block_indices=idx)
    assert torch.isnan(out[1, 9, 2]).all()
    keep = torch.ones(out.shape[:3], dtype=torch.bool)
    keep[1, 9, 2] = False
    assert torch.isfinite(out[keep]).all()
    torch.testing.assert_close(out[keep], clean[keep], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_nan_key_affects_only_queries_that_select_its_block(backend):
    """NaN in key 5 (block 1, KV head 0): queries that do not select block 1 stay exact."""
    bs = 4
    q, k, v = qkv(b=1, s=16, hq=4, hkv=2)
    s = 16
    # query head h: local attention (own block only) for even t, own + block 1 for odd t >= 8
    idx = torch.full((1, s, 4, 2), moba.PAD_INDEX, dtype=torch.int32)
    own = torch.arange(s) // bs
    idx[0, :, :, 0] = own[:, None].to(torch.int32)
    odd_late = (torch.arange(s) % 2 == 1) & (torch.arange(s) >= 8)
    idx[0, odd_late, :, 0] = 1
    idx[0, odd_late, :, 1] = own[odd_late, None].to(torch.int32)
    clean = fixed_call(q, k, v, backend=backend, block_indices=idx)
    k_bad = k.clone()
    k_bad[0, 5, 0, 0] = float("nan")
    out = fixed_call(q, k_bad, v, backend=backend, block_indices=idx)
    # poisoned: heads 0, 1 (KV head 0) of queries whose selected blocks include block 1 and
    # that can see key 5 (causal: position >= 5)
    sees = ((own == 1) & (torch.arange(s) >= 5)) | odd_late
    assert torch.isnan(out[0, sees][:, :2]).all()
    # untouched: KV head 1, and every query of KV head 0 that does not see key 5
    torch.testing.assert_close(out[0, :, 2:], clean[0, :, 2:], rtol=0, atol=0)
    torch.testing.assert_close(out[0, ~sees][:, :2], clean[0, ~sees][:, :2], rtol=0, atol=0)
