"""Bad input raises the documented error with a message that names the argument; odd but
legal input (empty sequences, T = 0, non-finite values) works."""

from __future__ import annotations

import pytest
import torch

import moba
from moba.ops.registry import REFERENCE_MAX_SEQLEN
from tests._helpers import cu_seqlens_of, random_qkv, random_varlen


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


# --------------------------------------------------------------------------- block sizes beyond the sequences


@pytest.mark.parametrize("block_size", [2**40, 2**62, 2**64 + 3])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_any_block_size_costs_what_dense_costs(backend, block_size):
    """Issue 13 item 4: 16 tokens with block_size 2**40 needed TiBs (buffers of block_size
    slots), 2**62 overflowed a storage size. A block size above every sequence is one block
    per sequence: the same result as block_size = the longest sequence, bit for bit."""
    q, k, v = (t.requires_grad_() for t in qkv(b=2, s=16))
    dout = torch.randn(q.shape)
    results = []
    for bs in (16, block_size):
        out = fixed_call(q, k, v, block_size=bs, top_k=3, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        results.append([out, *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert (moba.select_blocks(q, k, block_size, 3) == 0).all()
    qv, kv, vv, cu, m = random_varlen([5, 0, 11], 4, 2, 8)
    dense = varlen_call(qv, kv, vv, cu, m, block_size=11, top_k=2, backend=backend)
    torch.testing.assert_close(varlen_call(qv, kv, vv, cu, m, block_size=block_size, backend=backend), dense,
                               rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [2**40, 2**62, 2**64 + 3])
def test_any_block_size_decode_tree_and_modules(block_size):
    from moba.decode import BlockMeanState
    from moba.decode.tree import moba_tree_attention
    from moba.nn import MoBAAttention

    q, k, v = qkv(b=2, s=16)
    dense = fixed_call(q, k, v, block_size=16, top_k=1)
    state = BlockMeanState(block_size)
    out = moba.moba_decode(q[:, -3:], k, v, state, block_size, 2, backend="torch")
    torch.testing.assert_close(out, dense[:, -3:], rtol=1e-6, atol=1e-6)
    out = moba.moba_decode(q[:, -2:], k, v, state, block_size, 2, starts=[0, 5], backend="torch")
    alone = moba.moba_decode(q[1:, -2:], k[1:, 5:], v[1:, 5:], BlockMeanState(11), 11, 2, backend="torch")
    torch.testing.assert_close(out[1], alone[0], rtol=1e-6, atol=1e-6)
    tree = moba_tree_attention(q[0, -2:], k[0, -2:], v[0, -2:], [-1, 0], k[:1, :14], v[:1, :14],
                               BlockMeanState(block_size), block_size, 3, 8**-0.5)
    torch.testing.assert_close(tree, dense[0, -2:], rtol=1e-6, atol=1e-6)
    core = MoBAAttention(block_size=block_size, top_k=2, backend="torch")
    torch.testing.assert_close(core(q, k, v), dense, rtol=0, atol=0)


# --------------------------------------------------------------------------- zero-sized batches


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_zero_sized_batches_give_zero_sized_gradients(backend):
    """As SDPA does: q, k and v all get (empty) gradients, not None."""
    cases = [
        lambda q, k, v: fixed_call(q, k, v, backend=backend),
        lambda q, k, v: moba.full_attn_func(q, k, v),
    ]
    for shape_b, shape_s in ((0, 5), (2, 0)):
        for fn in cases:
            q, k, v = (t.requires_grad_() for t in qkv(b=shape_b, s=shape_s))
            out = fn(q, k, v)
            assert out.shape == q.shape
            out.sum().backward()
            for name, t in (("q", q), ("k", k), ("v", v)):
                assert t.grad is not None and t.grad.shape == t.shape, name
    for fn in (lambda *t: varlen_call(*t, backend=backend), moba.full_attn_varlen_func):
        q, k, v, cu, m = random_varlen([0, 0], 4, 2, 8, requires_grad=True)
        fn(q, k, v, cu, m).sum().backward()
        for name, t in (("q", q), ("k", k), ("v", v)):
            assert t.grad is not None and t.grad.shape == t.shape, name


# --------------------------------------------------------------------------- moba_decode, BlockMeanState


def _decode_inputs(b=2, lq=1, lk=12, hq=4, hkv=2, d=8, dtype=torch.float32):
    return (torch.randn(b, lq, hq, d).to(dtype), torch.randn(b, lk, hkv, d).to(dtype),
            torch.randn(b, lk, hkv, d).to(dtype))


def _decode(q, kc, vc, state=None, **kw):
    from moba.decode import BlockMeanState

    args = dict(block_size=4, top_k=2)
    args.update(kw)
    state = BlockMeanState(args["block_size"]) if state is None else state
    return moba.moba_decode(q, kc, vc, state, **args)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


@pytest.mark.parametrize(
    "edit,kw,exc,pattern",
    [
        (lambda q, k, v: (q.long(), k, v), {}, TypeError, "^q must be float16, bfloat16, float32 or float64"),
        (lambda q, k, v: (q, k.int(), v), {}, TypeError, "^k_cache must be float16"),
        (lambda q, k, v: (q, k, v.double()), {}, TypeError, "q, k_cache and v_cache must share one dtype"),
        (lambda q, k, v: (q, _meta(k), _meta(v)), {}, ValueError, "q, k_cache and v_cache must be on one device"),
        (lambda q, k, v: (q[:, :0], k, v), {}, ValueError, r"^q must hold at least one query token"),
        (lambda q, k, v: (q[:, :, :0], k, v), {}, ValueError, r"query heads \(0\).*q \(2, 1, 0, 8\)"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), {}, ValueError, r"key/value heads \(0\).*k_cache \("),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), {}, ValueError, "q, k_cache and v_cache must have head_dim >= 1"),
        (lambda q, k, v: (q[:1], k, v), {}, ValueError, "q and k_cache must have the same batch size"),
        (lambda q, k, v: (q.expand(2, 13, 4, 8), k, v), {}, ValueError, r"^q has more queries \(13\) than k_cache"),
        (lambda q, k, v: (q, k, v[:, :5]), {}, ValueError, "k_cache and v_cache must have the same shape"),
        (lambda q, k, v: (q[0], k, v), {}, ValueError, "^q must have 4 dimensions"),
        (lambda q, k, v: (q, k.numpy(), v), {}, TypeError, "^k_cache must be a torch.Tensor"),
        (None, dict(starts=[0, -1]), ValueError, r"^starts must lie in \[0, Lk = 12\].*-1"),
        (None, dict(starts=[0, 13]), ValueError, r"^starts must lie in \[0, Lk = 12\].*13"),
        (None, dict(starts=[0, 12]), ValueError, r"needs at least Lq = 1 real cache tokens.*starts"),
        (None, dict(starts=[0, 1.5]), TypeError, "^starts must hold ints"),
        (None, dict(starts=[0]), ValueError, r"^starts must have one entry per row \(2\)"),
        (None, dict(starts=torch.tensor([0.0, 1.0])), TypeError, "^starts must be a list of ints"),
        (None, dict(starts="01"), TypeError, "^starts must be a list of ints"),
        (None, dict(block_size=0), ValueError, "^block_size must be >= 1"),
        (None, dict(top_k=1.0), TypeError, "^top_k must be an int"),
        (None, dict(softmax_scale=-1.0), ValueError, "^softmax_scale"),
        (None, dict(softmax_scale=float("inf")), ValueError, "^softmax_scale"),
        (None, dict(backend="cuda-magic"), ValueError, "backend must be 'auto', 'torch' or 'triton'"),
        (None, dict(backend=None), TypeError, "^backend must be a str"),
    ],
)
def test_moba_decode_bad_input(edit, kw, exc, pattern):
    q, kc, vc = _decode_inputs()
    if edit is not None:
        q, kc, vc = edit(q, kc, vc)
    with pytest.raises(exc, match=pattern):
        _decode(q, kc, vc, **kw)


def test_moba_decode_state_is_checked():
    from moba.decode import BlockMeanState

    q, kc, vc = _decode_inputs()
    with pytest.raises(TypeError, match="^state must be a moba.BlockMeanState"):
        moba.moba_decode(q, kc, vc, None, 4, 2)
    with pytest.raises(ValueError, match=r"state.block_size \(5\) != block_size \(4\)"):
        moba.moba_decode(q, kc, vc, BlockMeanState(5), 4, 2)
    state = BlockMeanState(4)
    with pytest.raises(ValueError, match="starts"):
        moba.moba_decode(q, kc, vc, state, 4, 2, starts=[0, -3])
    assert state.sums is None  # a refused call leaves the state as it was


def test_block_mean_state_bad_input():
    import json

    import numpy as np

    from moba.decode import BlockMeanState

    for bad, exc in ((0, ValueError), (-4, ValueError), (4.0, TypeError), ("4", TypeError), (None, TypeError)):
        with pytest.raises(exc, match="^block_size must be"):
            BlockMeanState(bad)
    state = BlockMeanState(np.int64(4))
    assert type(state.block_size) is int and json.dumps({"block_size": state.block_size})
    keys = torch.randn(2, 9, 2, 8)
    with pytest.raises(TypeError, match="^k_cache must be float16"):
        state.update(keys.long(), [0, 0], 9)
    with pytest.raises(ValueError, match="^k_cache must be a 4-d tensor"):
        state.update(keys[0], [0, 0], 9)
    with pytest.raises(ValueError, match="^starts must lie in"):
        state.update(keys, [0, -1], 9)
    with pytest.raises(ValueError, match="^starts must have one entry per row"):
        state.update(keys, [0], 9)
    with pytest.raises(ValueError, match="^n_new must be >= 0"):
        state.update(keys, [0, 0], -1)
    with pytest.raises(TypeError, match="^n_new must be an int"):
        state.update(keys, [0, 0], 1.5)
    assert state.update(keys, [0, 2], 9) == [9, 7]
    with pytest.raises(ValueError, match=r"^index holds a row outside \[0, 2\)"):
        state.select_rows(torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="^index must be a 1-d int32/int64 tensor"):
        state.select_rows(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="^repeats must be >= 1"):
        state.repeat_rows(0)


# --------------------------------------------------------------------------- full attention entry points


def _full_calls():
    """(name, call) for the three dense entry points on fixed-layout inputs (B, S, H, D)."""
    def varlen(q, k, v, **kw):
        b, s = q.shape[:2]
        cu = torch.arange(b + 1, dtype=torch.int32) * s
        flat = [t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)]
        return moba.full_attn_varlen_func(*flat, cu, s, **kw)

    return [
        ("full_attn_func", moba.full_attn_func),
        ("full_attn_varlen_func", varlen),
        ("full_attn_with_kvcache", moba.full_attn_with_kvcache),
    ]


@pytest.mark.parametrize("name,call", _full_calls(), ids=[n for n, _ in _full_calls()])
@pytest.mark.parametrize(
    "edit,exc,pattern",
    [
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, r"query heads \(0\).*: q \("),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, r"key/value heads \(0\).*, k \("),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, "q, k and v must have head_dim >= 1"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "^q must be float16, bfloat16, float32 or float64"),
        (lambda q, k, v: (q, k.int(), v), TypeError, "^k must be float16"),
        (lambda q, k, v: (q.half(), k, v), TypeError, "q, k and v must share one dtype"),
        (lambda q, k, v: (q, k, v.double()), TypeError, "q, k and v must share one dtype"),
        (lambda q, k, v: (q, _meta(k), _meta(v)), ValueError, "q, k and v must be on one device"),
        (lambda q, k, v: (q, k, v[..., :4]), ValueError, "k and v must have the same shape"),
    ],
)
def test_full_attention_bad_input(name, call, edit, exc, pattern):
    q, k, v = edit(*qkv())
    with pytest.raises(exc, match=pattern):
        call(q, k, v)


@pytest.mark.parametrize("name,call", _full_calls(), ids=[n for n, _ in _full_calls()])
@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(causal=1), TypeError, "^causal must be a bool"),
        (dict(softmax_scale=-0.5), ValueError, "^softmax_scale"),
        (dict(softmax_scale=float("nan")), ValueError, "^softmax_scale"),
        (dict(implementation="xformers"), ValueError, "^implementation must be one of"),
    ],
)
def test_full_attention_bad_scalars(name, call, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(*qkv(), **kw)


@pytest.mark.parametrize(
    "mask,exc,pattern",
    [
        (torch.ones(1, 11, dtype=torch.bool), ValueError, r"^key_padding_mask must have shape \(batch, seqlen_k\) = \(1, 12\)"),
        (torch.ones(12, dtype=torch.bool), ValueError, "^key_padding_mask must have shape"),
        (torch.ones(1, 12), TypeError, "^key_padding_mask must be a bool tensor"),
        (torch.ones(1, 12, dtype=torch.bool, device="meta"), ValueError, "^key_padding_mask must be on the device"),
        ([[True] * 12], TypeError, "^key_padding_mask must be a torch.Tensor"),
    ],
)
def test_full_attn_with_kvcache_bad_mask(mask, exc, pattern):
    q, k, v = qkv()
    with pytest.raises(exc, match=pattern):
        moba.full_attn_with_kvcache(q[:, -2:], k, v, key_padding_mask=mask)


def test_full_attn_with_kvcache_bad_query_length():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^q has more queries \(12\) than k has keys \(3\); need Lq <= Lk"):
        moba.full_attn_with_kvcache(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="^q and k must have the same batch size"):
        moba.full_attn_with_kvcache(q, torch.cat([k, k]), torch.cat([v, v]))


# --------------------------------------------------------------------------- tree attention


def test_tree_attention_bad_input():
    from moba.decode import BlockMeanState
    from moba.decode.tree import moba_tree_attention

    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    kc, vc = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    parents = [-1, 0, 1]

    def call(**kw):
        args = dict(q=q, k=k, v=v, parents=parents, k_cache=kc, v_cache=vc, state=BlockMeanState(4),
                    block_size=4, top_k=2, softmax_scale=0.3)
        args.update(kw)
        return moba_tree_attention(**args)

    call()
    with pytest.raises(TypeError, match="^state must be a moba.BlockMeanState"):
        call(state=None)
    with pytest.raises(TypeError, match="^q must be float16"):
        call(q=q.long())
    with pytest.raises(TypeError, match="q, k_cache and v_cache must share one dtype"):
        call(k_cache=kc.double())
    with pytest.raises(ValueError, match="^softmax_scale"):
        call(softmax_scale=-1.0)
    with pytest.raises(ValueError, match="^top_k must be >= 1"):
        call(top_k=0)
    with pytest.raises(ValueError, match="^k_cache: tree attention needs a cache of one non-empty sequence"):
        call(k_cache=kc[:, :0], v_cache=vc[:, :0])
    with pytest.raises(ValueError, match="parents"):
        call(parents=[-1, 0, 5])


# --------------------------------------------------------------------------- moba.nn modules


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(backend="cuda-magic"), ValueError, "^unknown backend 'cuda-magic'"),
        (dict(backend=3), TypeError, "^backend must be a str"),
        (dict(softmax_scale=-1.0), ValueError, "^softmax_scale"),
        (dict(softmax_scale=0.0), ValueError, "^softmax_scale"),
        (dict(softmax_scale=float("nan")), ValueError, "^softmax_scale"),
        (dict(softmax_scale=float("inf")), ValueError, "^softmax_scale"),
        (dict(softmax_scale="0.1"), TypeError, "^softmax_scale"),
        (dict(mode="sparse"), ValueError, "^mode must be one of"),
        (dict(block_size=0), ValueError, "^block_size must be >= 1"),
        (dict(top_k=2.0), TypeError, "^top_k must be an int"),
    ],
)
def test_moba_attention_module_checks_at_construction(kw, exc, pattern):
    from moba.nn import MoBAAttention

    with pytest.raises(exc, match=pattern):
        MoBAAttention(**kw)


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(rope_theta=0.0), ValueError, "^rope_theta must be a finite number > 0"),
        (dict(rope_theta=-10000.0), ValueError, "^rope_theta"),
        (dict(rope_theta=float("nan")), ValueError, "^rope_theta"),
        (dict(rope_theta=float("inf")), ValueError, "^rope_theta"),
        (dict(rope_theta="1e4"), TypeError, "^rope_theta must be a float"),
        (dict(rope_theta=0.0, rotary=False), ValueError, "^rope_theta"),
        (dict(backend="cuda-magic"), ValueError, "^unknown backend"),
        (dict(hidden_size=0), ValueError, "^hidden_size must be >= 1"),
        (dict(num_heads=0), ValueError, "^num_heads must be >= 1"),
        (dict(num_kv_heads=0), ValueError, "^num_kv_heads must be >= 1"),
        (dict(num_kv_heads=3), ValueError, r"^num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        (dict(head_dim=0), ValueError, "^head_dim must be >= 1"),
        (dict(rotary=1), TypeError, "^rotary must be a bool"),
        (dict(bias="no"), TypeError, "^bias must be a bool"),
    ],
)
def test_self_attention_module_checks_at_construction(kw, exc, pattern):
    from moba.nn import MoBASelfAttention

    args = dict(hidden_size=32, num_heads=4, num_kv_heads=2)
    args.update(kw)
    with pytest.raises(exc, match=pattern):
        MoBASelfAttention(**args)


def test_rotary_checks_theta():
    from moba.nn import RotaryEmbedding

    with pytest.raises(ValueError, match="^rope_theta"):
        RotaryEmbedding(8, theta=0.0)
    with pytest.raises(ValueError, match="^head_dim must be >= 1"):
        RotaryEmbedding(0)


def test_numpy_scalars_become_python_numbers():
    """Settings given as numpy scalars are stored as Python ints / floats / strs, so a run
    record or config made from them is JSON-serialisable."""
    import dataclasses
    import json

    import numpy as np

    from moba.nn import HybridSchedule, MoBAAttention, MoBASelfAttention

    core = MoBAAttention(block_size=np.int64(4), top_k=np.int32(2), softmax_scale=np.float32(0.5),
                         mode=np.str_("full"), backend=np.str_("torch"))
    settings = dict(block_size=core.block_size, top_k=core.top_k, softmax_scale=core.softmax_scale,
                    mode=core.mode, backend=core.backend)
    assert [type(x) for x in settings.values()] == [int, int, float, str, str]
    assert json.loads(json.dumps(settings)) == dict(block_size=4, top_k=2, softmax_scale=0.5, mode="full",
                                                   backend="torch")
    layer = MoBASelfAttention(np.int64(32), np.int64(4), np.int64(2), block_size=np.int64(8), top_k=np.int64(3),
                              rope_theta=np.float64(500.0))
    sizes = dict(num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim,
                 block_size=layer.attn.block_size, top_k=layer.attn.top_k)
    assert all(type(x) is int for x in sizes.values()) and json.dumps(sizes)
    schedule = HybridSchedule(full_layers=np.array([0, -1]), full_last_n=np.int64(1), switch_to_full_at_step=np.int64(7))
    record = dataclasses.asdict(schedule)
    assert json.loads(json.dumps(record)) == dict(full_layers=[0, -1], full_last_n=1, switch_to_full_at_step=7)
    with pytest.raises(TypeError, match="^full_layers must hold ints"):
        HybridSchedule(full_layers=(0.5,))
