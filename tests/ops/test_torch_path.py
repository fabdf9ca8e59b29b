"""Attention backends against the dense-mask reference (docs/design.md section 1, tolerance rule of
section 3): forward and gradients of q, k, v, fixed length and varlen.

Both sides get the SAME block indices (from ``moba.select_blocks`` / ``select_blocks_varlen``),
so a float32 rounding difference can never flip a top-k choice. Truth = the reference in
float64; low precision = the reference in the test dtype.

Parametrized over the attention backends usable on the CPU (``moba.available_backends``):
always "torch"; "triton" only when it is available on the CPU (TRITON_INTERPRET=1), and then
only in float32/float16 (the interpreter has no float64 / bfloat16 ``tl.dot``; the Triton
backend has its own tests).
"""

from __future__ import annotations

import pytest
import torch

import moba
from tests._helpers import (
    OUT_FACTOR,
    assert_close_by_rule,
    assert_grads_close_by_rule,
    detached_copies,
    forward_backward,
    random_qkv,
    random_varlen,
    usable_backends,
)

BACKENDS = usable_backends("cpu")

# (B, S, Hq, Hkv, D, block_size, top_k): S not a multiple of block_size, block sizes that
# are not powers of two, top_k = 1, 2, 3 and >= n_blocks, GQA (4/2) and MQA (Hkv = 1).
FIXED_CASES = [
    pytest.param(2, 50, 4, 2, 16, 7, 3, id="gqa-bs7-k3"),
    pytest.param(1, 64, 2, 1, 8, 16, 1, id="mqa-bs16-k1"),
    pytest.param(2, 37, 4, 4, 8, 5, 2, id="mha-bs5-k2"),
    pytest.param(1, 40, 4, 1, 32, 12, 99, id="mqa-bs12-kall"),
    pytest.param(3, 29, 2, 2, 8, 3, 3, id="mha-bs3-k3"),
    pytest.param(1, 11, 2, 1, 4, 1, 3, id="bs1"),
    pytest.param(1, 9, 2, 1, 8, 16, 2, id="bs-gt-S"),
    pytest.param(1, 150, 4, 2, 32, 12, 3, id="medium-gqa-bs12"),
]


def _dtypes_for(backend):
    if backend == "torch":
        return [torch.float32, torch.float64]
    return [torch.float32]


BACKEND_DTYPE = [
    pytest.param(b, dt, id=f"{b}-{str(dt).split('.')[-1]}") for b in BACKENDS for dt in _dtypes_for(b)
]


def _check_fixed(backend, dtype, b, s, hq, hkv, d, bs, top_k, causal, softmax_scale=None):
    q, k, v = random_qkv(b, s, hq, hkv, d, dtype)
    idx = moba.select_blocks(q, k, bs, top_k, causal)
    dout = torch.randn(b, s, hq, d, dtype=torch.float64)

    def run(be):
        return lambda q_, k_, v_: moba.moba_attn_func(
            q_, k_, v_, bs, top_k, causal, softmax_scale, backend=be, block_indices=idx
        )

    out, grads = forward_backward(run(backend), detached_copies(q, k, v), dout)
    out_lo, grads_lo = forward_backward(run("reference"), detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(run("reference"), detached_copies(q, k, v, dtype=torch.float64), dout)
    assert out.dtype == dtype and out.shape == (b, s, hq, d)
    assert_close_by_rule(out, out_lo, out_t, OUT_FACTOR, name="out")
    assert_grads_close_by_rule(grads, grads_lo, grads_t)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPE)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("b,s,hq,hkv,d,bs,top_k", FIXED_CASES)
def test_fixed_matches_reference(backend, dtype, causal, b, s, hq, hkv, d, bs, top_k):
    _check_fixed(backend, dtype, b, s, hq, hkv, d, bs, top_k, causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_fixed_custom_softmax_scale(backend, causal):
    _check_fixed(backend, torch.float32, 2, 33, 4, 2, 8, 6, 2, causal, softmax_scale=0.9)


# Ragged lengths with an empty sequence and a length-1 sequence.
VARLEN_CASES = [
    pytest.param([23, 0, 1, 40, 7], 4, 2, 8, 5, 3, id="gqa-bs5-k3"),
    pytest.param([1, 17, 0, 30], 2, 1, 16, 7, 2, id="mqa-bs7-k2"),
    pytest.param([12, 0, 1, 25], 4, 4, 8, 4, 1, id="mha-bs4-k1"),
    pytest.param([0, 31, 1, 9], 4, 1, 8, 3, 50, id="mqa-bs3-kall"),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPE)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("lengths,hq,hkv,d,bs,top_k", VARLEN_CASES)
def test_varlen_matches_reference(backend, dtype, causal, lengths, hq, hkv, d, bs, top_k):
    q, k, v, cu, max_s = random_varlen(lengths, hq, hkv, d, dtype)
    idx = moba.select_blocks_varlen(q, k, cu, max_s, bs, top_k, causal)
    dout = torch.randn(q.shape, dtype=torch.float64)

    def run(be):
        return lambda q_, k_, v_: moba.moba_attn_varlen_func(
            q_, k_, v_, cu, max_s, bs, top_k, causal, backend=be, block_indices=idx
        )

    out, grads = forward_backward(run(backend), detached_copies(q, k, v), dout)
    out_lo, grads_lo = forward_backward(run("reference"), detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(run("reference"), detached_copies(q, k, v, dtype=torch.float64), dout)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_by_rule(out, out_lo, out_t, OUT_FACTOR, name="out")
    assert_grads_close_by_rule(grads, grads_lo, grads_t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "b,s,hq,hkv,d,bs,top_k",
    [
        pytest.param(2, 50, 4, 2, 16, 7, 3, id="gqa-bs7-k3"),
        pytest.param(1, 45, 2, 1, 32, 12, 99, id="mqa-bs12-kall"),
        pytest.param(1, 30, 4, 4, 8, 5, 1, id="mha-bs5-k1"),
    ],
)
def test_half_precision_torch_path(dtype, causal, b, s, hq, hkv, d, bs, top_k):
    """float16/bfloat16 through the PyTorch path: output dtype = input dtype, tolerance rule
    with the reference run in float16/bfloat16 as the low-precision reference."""
    _check_fixed("torch", dtype, b, s, hq, hkv, d, bs, top_k, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_varlen_torch_path(dtype):
    q, k, v, cu, max_s = random_varlen([20, 0, 1, 33], 4, 2, 16, dtype)
    idx = moba.select_blocks_varlen(q, k, cu, max_s, 6, 2)
    dout = torch.randn(q.shape, dtype=torch.float64)

    def run(be):
        return lambda q_, k_, v_: moba.moba_attn_varlen_func(
            q_, k_, v_, cu, max_s, 6, 2, backend=be, block_indices=idx
        )

    out, grads = forward_backward(run("torch"), detached_copies(q, k, v), dout)
    out_lo, grads_lo = forward_backward(run("reference"), detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(run("reference"), detached_copies(q, k, v, dtype=torch.float64), dout)
    assert out.dtype == dtype
    assert_close_by_rule(out, out_lo, out_t, OUT_FACTOR, name="out")
    assert_grads_close_by_rule(grads, grads_lo, grads_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_inside_backend_equals_given_indices(backend):
    """block_indices=None runs the gate: same result as passing select_blocks' indices."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v = random_qkv(2, 41, 4, 2, 8, dtype)
    idx = moba.select_blocks(q, k, 6, 3)
    a = moba.moba_attn_func(q, k, v, 6, 3, backend=backend)
    b = moba.moba_attn_func(q, k, v, 6, 3, backend=backend, block_indices=idx)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    # and a different selection really gives a different output (the indices are used)
    c = moba.moba_attn_func(q, k, v, 6, 1, backend=backend)
    assert (a - c).abs().max() > 1e-3


def test_torch_path_handles_many_tiles():
    """More rows per (block, KV head) than one tile holds (> 128 rows) and GQA sharing."""
    q, k, v = random_qkv(1, 160, 8, 1, 8, torch.float64)
    idx = moba.select_blocks(q, k, 80, 2)
    dout = torch.randn(q.shape, dtype=torch.float64)

    def run(be):
        return lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, 80, 2, backend=be, block_indices=idx)

    out, grads = forward_backward(run("torch"), detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(run("reference"), detached_copies(q, k, v), dout)
    assert_close_by_rule(out, out_t, out_t, name="out")
    assert_grads_close_by_rule(grads, grads_t, grads_t)


@pytest.mark.parametrize("rows_per_set", [1, 6, 40])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_tiles_built_over_query_ranges_match_reference(monkeypatch, rows_per_set, causal):
    """Tiles grouped a few (query, head) rows at a time (as long sequences are): ranges that cut
    sequences, blocks and GQA groups in the middle give the same output and gradients."""
    import moba.ops.torch_impl as impl

    monkeypatch.setattr(impl, "_ROWS_PER_TILE_SET", rows_per_set)
    q, k, v, cu, max_s = random_varlen([13, 1, 30, 22], 4, 2, 8, torch.float64)
    idx = moba.select_blocks_varlen(q, k, cu, max_s, 5, 3, causal)
    dout = torch.randn(q.shape, dtype=torch.float64)

    def run(be):
        return lambda q_, k_, v_: moba.moba_attn_varlen_func(q_, k_, v_, cu, max_s, 5, 3, causal, backend=be,
                                                             block_indices=idx)

    out, grads = forward_backward(run("torch"), detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(run("reference"), detached_copies(q, k, v), dout)
    assert_close_by_rule(out, out_t, out_t, name="out")
    assert_grads_close_by_rule(grads, grads_t, grads_t)


@pytest.mark.parametrize(
    "s,hq,d,bs,top_k,scale,seed",
    [
        pytest.param(19, 1, 1, 1, 3, 2.0, 2, id="d1-bs1"),
        pytest.param(48, 2, 8, 2, 6, 1.5, 2, id="d8-bs2"),
        pytest.param(48, 2, 4, 1, 5, 2.0, 0, id="d4-bs1"),
    ],
)
def test_large_logits_float32(s, hq, d, bs, top_k, scale, seed):
    """float32, non-causal, logits several times larger than with the default scale.

    Regression: the PyTorch path once merged normalized slot partials with a float32
    logaddexp, which left the row normalization off by ~|lse| * eps (up to 2.6x over the
    tolerance bound here); a flash-style running-max merge stays at <= 0.7x."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(1, s, hq, 1, d, torch.float32, generator=gen)
    idx = moba.select_blocks(q, k, bs, top_k, causal=False)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=gen)

    def run(be):
        return lambda q_, k_, v_: moba.moba_attn_func(
            q_, k_, v_, bs, top_k, False, scale, backend=be, block_indices=idx
        )

    out, grads = forward_backward(run("torch"), detached_copies(q, k, v), dout)
    out_lo, grads_lo = forward_backward(run("reference"), detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(run("reference"), detached_copies(q, k, v, dtype=torch.float64), dout)
    assert_close_by_rule(out, out_lo, out_t, OUT_FACTOR, name="out")
    assert_grads_close_by_rule(grads, grads_lo, grads_t)


# ---------------------------------------------------------------------------------------
# Non-finite isolation (issue 13 item 1): padding rows of a tile point at row 0
# ---------------------------------------------------------------------------------------


def _large_negative_self_score(b, s, hq, hkv, d, seed=0):
    """Random q, k, v (float32) where query 0 of batch element 0 scores -100 against its own key
    (its lse is then about -100: exp(0 - lse) overflows float32)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(b, s, hq, hkv, d, torch.float32, generator=gen)
    k0 = k[0, 0, 0]
    q[0, 0, 0] = -100 * k0 / k0.dot(k0) * d**0.5
    return q, k, v


@pytest.fixture(params=["tile", "dense_mask"])
def gated_path(request, monkeypatch):
    """Force the formulation ``moba_attn_func(..., backend="torch")`` runs without block_indices."""
    import moba.ops.torch_impl as impl

    monkeypatch.setattr(impl, "_DENSE_MASK_MAX_PAIR_RATIO", 0.0 if request.param == "tile" else float("inf"))
    return request.param


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_large_negative_score_at_token_0_keeps_grads_finite(top_k, gated_path):
    """Regression: padding rows read row 0's lse; exp(0 - lse) = inf times a zero mask was NaN
    in dK / dV of other tokens. Causal: token 0 sees only itself, so its lse is exactly -100."""
    q, k, v = _large_negative_self_score(1, 16, 2, 1, 8)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(be):
        return lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, 4, top_k, backend=be)

    out, grads = forward_backward(run("torch"), detached_copies(q, k, v), dout)
    out_lo, grads_lo = forward_backward(run("reference"), detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(run("reference"), detached_copies(q, k, v, dtype=torch.float64), dout)
    for name, g in zip("qkv", grads, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
    assert_close_by_rule(out, out_lo, out_t, OUT_FACTOR, name="out")
    assert_grads_close_by_rule(grads, grads_lo, grads_t)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "large"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_non_finite_in_batch_0_does_not_reach_batch_1(bad, causal, gated_path):
    """A NaN / inf / huge negative score at token 0 of batch element 0 leaves batch element 1's
    output and gradients equal to those of batch element 1 run alone."""
    q, k, v = _large_negative_self_score(2, 24, 4, 2, 8, seed=3)
    if bad != "large":
        q[0, 0, 0, 0] = bad
        k[0, 0, 0, 0] = bad
        v[0, 0, 0, 0] = bad
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))

    def run(q_, k_, v_):
        return moba.moba_attn_func(q_, k_, v_, 5, 2, causal, backend="torch")

    out, grads = forward_backward(run, detached_copies(q, k, v), dout)
    alone_out, alone_grads = forward_backward(run, detached_copies(q[1:], k[1:], v[1:]), dout[1:])
    torch.testing.assert_close(out[1:], alone_out, rtol=0, atol=1e-6)
    for g, g_alone in zip(grads, alone_grads, strict=True):
        assert torch.isfinite(g[1:]).all()
        torch.testing.assert_close(g[1:], g_alone, rtol=0, atol=1e-5)


def test_non_finite_in_one_sequence_stays_there_varlen(gated_path):
    """Packed sequences: a NaN at the first token of sequence 0 reaches no other sequence."""
    q, k, v, cu, max_s = random_varlen([9, 13, 1, 20], 4, 2, 8, torch.float32)
    q[0, 0, 0] = float("nan")
    v[0, 0, 0] = float("nan")
    dout = torch.randn(q.shape)

    def run(q_, k_, v_):
        return moba.moba_attn_varlen_func(q_, k_, v_, cu, max_s, 4, 2, backend="torch")

    out, grads = forward_backward(run, detached_copies(q, k, v), dout)
    rest = slice(int(cu[1]), None)
    assert torch.isfinite(out[rest]).all()
    for g in grads:
        assert torch.isfinite(g[rest]).all()


# ---------------------------------------------------------------------------------------
# The formulations behind moba_attn_func(backend="torch") without block_indices
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "b,s,hq,hkv,d,bs,top_k",
    [
        pytest.param(2, 50, 4, 2, 16, 7, 3, id="gqa-bs7-k3-tail"),
        pytest.param(1, 64, 2, 1, 8, 16, 1, id="mqa-bs16-k1"),
        pytest.param(3, 37, 4, 4, 8, 5, 2, id="mha-bs5-k2-tail"),
        pytest.param(2, 96, 3, 1, 8, 8, 3, id="mqa-chunked-causal"),
    ],
)
def test_gated_paths_match_reference(gated_path, dtype, causal, b, s, hq, hkv, d, bs, top_k):
    """The gate inside the backend, then the tile or the dense-mask formulation, against the
    reference fed the same gate's indices (select_blocks)."""
    q, k, v = random_qkv(b, s, hq, hkv, d, dtype)
    idx = moba.select_blocks(q, k, bs, top_k, causal)
    dout = torch.randn(b, s, hq, d, dtype=torch.float64)
    ours = lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, bs, top_k, causal, backend="torch")  # noqa: E731

    def ref(q_, k_, v_):
        return moba.moba_attn_func(q_, k_, v_, bs, top_k, causal, backend="reference", block_indices=idx)

    out, grads = forward_backward(ours, detached_copies(q, k, v), dout)
    out_lo, grads_lo = forward_backward(ref, detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(ref, detached_copies(q, k, v, dtype=torch.float64), dout)
    assert out.dtype == dtype
    assert_close_by_rule(out, out_lo, out_t, OUT_FACTOR, name="out")
    assert_grads_close_by_rule(grads, grads_lo, grads_t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dense_mask_half_precision(dtype, monkeypatch):
    import moba.ops.torch_impl as impl

    monkeypatch.setattr(impl, "_DENSE_MASK_MAX_PAIR_RATIO", float("inf"))
    q, k, v = random_qkv(2, 64, 4, 2, 16, dtype)
    idx = moba.select_blocks(q, k, 8, 3)
    dout = torch.randn(q.shape, dtype=torch.float64)
    ours = lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, 8, 3, backend="torch")  # noqa: E731
    ref = lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, 8, 3, backend="reference", block_indices=idx)  # noqa: E731
    out, grads = forward_backward(ours, detached_copies(q, k, v), dout)
    out_lo, grads_lo = forward_backward(ref, detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(ref, detached_copies(q, k, v, dtype=torch.float64), dout)
    assert out.dtype == dtype
    assert_close_by_rule(out, out_lo, out_t, OUT_FACTOR, name="out")
    assert_grads_close_by_rule(grads, grads_lo, grads_t)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_top_k_covering_all_blocks_is_dense_sdpa(causal):
    """top_k >= n_blocks dispatches to dense attention: bitwise SDPA's output and gradients."""
    import torch.nn.functional as F

    q, k, v = random_qkv(2, 40, 4, 2, 8, torch.float32)
    dout = torch.randn(q.shape)

    def sdpa(q_, k_, v_):
        t = [x.transpose(1, 2) for x in (q_, k_, v_)]
        return F.scaled_dot_product_attention(*t, is_causal=causal, enable_gqa=True).transpose(1, 2)

    out, grads = forward_backward(lambda *x: moba.moba_attn_func(*x, 8, 5, causal, backend="torch"),
                                  detached_copies(q, k, v), dout)
    out_d, grads_d = forward_backward(sdpa, detached_copies(q, k, v), dout)
    assert torch.equal(out, out_d)
    for g, g_d in zip(grads, grads_d, strict=True):
        assert torch.equal(g, g_d)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_top_k_covering_all_blocks_varlen_matches_reference(causal):
    q, k, v, cu, max_s = random_varlen([23, 0, 1, 40, 7], 4, 2, 8, torch.float64)
    idx = moba.select_blocks_varlen(q, k, cu, max_s, 5, 8, causal)
    dout = torch.randn(q.shape, dtype=torch.float64)
    out, grads = forward_backward(lambda *x: moba.moba_attn_varlen_func(*x, cu, max_s, 5, 8, causal, backend="torch"),
                                  detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(
        lambda *x: moba.moba_attn_varlen_func(*x, cu, max_s, 5, 8, causal, backend="reference", block_indices=idx),
        detached_copies(q, k, v), dout)
    assert_close_by_rule(out, out_t, out_t, name="out")
    assert_grads_close_by_rule(grads, grads_t, grads_t)


def test_path_choice():
    """Dense when top_k covers every block; the dense mask at short contexts (the cpu-tiny
    preset: context 256, block 32, top-3); the tile path at long contexts and for varlen."""
    from moba.ops.torch_impl import gated_path

    assert gated_path([0, 256, 512], [0, 256, 512], 3, 32, 8) == "dense"
    assert gated_path([0, 256, 512], [0, 256, 512], 3, 32, 3) == "dense_mask"
    assert gated_path([0, 16384], [0, 16384], 8, 512, 3) == "tile"
    assert gated_path([0, 200, 456], [0, 200, 456], 3, 32, 3) == "tile"  # two lengths


def test_layout_is_cached_per_lengths_and_block_size():
    from moba.ops import torch_impl as impl

    a = impl._static_layout([0, 30, 60], [0, 30, 60], 8, "cpu")
    assert impl._static_layout([0, 30, 60], [0, 30, 60], 8, "cpu") is a
    assert impl._static_layout([0, 30, 60], [0, 30, 60], 4, "cpu") is not a


# ---------------------------------------------------------------------------------------
# torch.compile: the PyTorch path as custom ops, fullgraph, dynamic lengths
# ---------------------------------------------------------------------------------------


def _compiled_matches_eager(fn, inputs, dout):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    out, grads = forward_backward(fn, detached_copies(*inputs), dout)
    out_c, grads_c = forward_backward(compiled, detached_copies(*inputs), dout)
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-6)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, rtol=0, atol=1e-6)
    return compiled


@pytest.mark.parametrize("s,top_k,path", [(50, 3, "dense_mask"), (120, 2, "tile"), (12, 3, "dense")])
def test_compile_fullgraph_moba_attn_func(s, top_k, path):
    from moba.ops.torch_impl import gated_path

    assert gated_path([0, s, 2 * s], [0, s, 2 * s], 4, 8, top_k) == path
    q, k, v = random_qkv(2, s, 4, 2, 8, torch.float32)
    fn = lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, 8, top_k, backend="torch")  # noqa: E731
    _compiled_matches_eager(fn, (q, k, v), torch.randn(q.shape))


@pytest.mark.parametrize("s", [64, 200], ids=["dense_mask", "tile"])
def test_compile_fullgraph_self_attention_module(s):
    """A model built from moba.nn: MoBASelfAttention (rotary, GQA) twice, compiled fullgraph."""
    from moba.nn import MoBASelfAttention

    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[MoBASelfAttention(32, 4, 2, block_size=8, top_k=3, backend="torch")
                                   for _ in range(2)])
    x = torch.randn(2, s, 32)
    _compiled_matches_eager(lambda x_: layers(x_), (x,), torch.randn(x.shape))


@pytest.mark.parametrize("s1,s2", [(64, 72), (200, 232)], ids=["dense_mask", "tile"])
def test_compile_dynamic_lengths_do_not_recompile(s1, s2):
    """dynamic=True: a second sequence length (same formulation) reuses the compiled graph."""
    torch._dynamo.reset()
    fn = torch.compile(lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, 8, 3, backend="torch"),
                       fullgraph=True, backend="aot_eager", dynamic=True)
    q, k, v = random_qkv(2, s1, 4, 2, 8, torch.float32, requires_grad=True)
    fn(q, k, v).sum().backward()
    q, k, v = random_qkv(2, s2, 4, 2, 8, torch.float32, requires_grad=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = fn(q, k, v)
        out.sum().backward()
    eager = moba.moba_attn_func(q, k, v, 8, 3, backend="torch")
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The flash formulation of the tile path (CPU flash kernels; used from block size 64 and
# 1024 key tokens on): own blocks as one batched causal call, other blocks per row group.
# ---------------------------------------------------------------------------------------


@pytest.fixture
def flash_calls(monkeypatch):
    """Counts the flash formulation's forward / backward calls; lets it run from 256 keys on
    (the tests' references stay cheap)."""
    from moba.ops import torch_impl as impl

    monkeypatch.setattr(impl, "_FLASH_MIN_KEYS", 256)
    calls = {"fwd": 0, "bwd": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(impl, "_flash_forward", counted("fwd", impl._flash_forward))
    monkeypatch.setattr(impl, "_flash_backward", counted("bwd", impl._flash_backward))
    return calls


def _check_varlen_by_rule(lengths, hq, hkv, d, bs, causal, dtype, idx=None, top_k=3):
    q, k, v, cu, max_s = random_varlen(lengths, hq, hkv, d, dtype)
    if idx is None:
        idx = moba.select_blocks_varlen(q, k, cu, max_s, bs, top_k, causal)
    dout = torch.randn(q.shape, dtype=torch.float64)

    def run(be):
        return lambda q_, k_, v_: moba.moba_attn_varlen_func(q_, k_, v_, cu, max_s, bs, top_k, causal, backend=be,
                                                             block_indices=idx)

    out, grads = forward_backward(run("torch"), detached_copies(q, k, v), dout)
    out_lo, grads_lo = forward_backward(run("reference"), detached_copies(q, k, v), dout)
    out_t, grads_t = forward_backward(run("reference"), detached_copies(q, k, v, dtype=torch.float64), dout)
    assert out.dtype == dtype
    assert_close_by_rule(out, out_lo, out_t, OUT_FACTOR, name="out")
    assert_grads_close_by_rule(grads, grads_lo, grads_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("lengths", [[300], [150, 0, 1, 90, 64]], ids=["tail", "varlen-empty"])
def test_flash_formulation_matches_reference(flash_calls, lengths, causal, dtype):
    """Ragged tail block (300 = 4 * 64 + 44), varlen with an empty and a one-token sequence,
    GQA, float64 / bfloat16 (run in float64 / float32)."""
    _check_varlen_by_rule(lengths, 4, 2, 16, 64, causal, dtype)
    assert flash_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_flash_formulation_block_chosen_by_every_row_and_unchosen_blocks(flash_calls, causal):
    """Every query selects block 0 (plus its own block when causal): one group holds every row
    (cut into several calls), and the other blocks' groups are empty."""
    from moba.ops import torch_impl as impl

    lengths, bs = [400], 64
    pos = torch.arange(lengths[0])
    own = (pos // bs)[:, None].expand(-1, 2)
    zero = torch.zeros_like(own)
    if causal:  # own block first; block 0 again for its own rows would be a duplicate: pad it
        idx = torch.stack([own, torch.where(own == 0, -1, zero)], dim=-1)
    else:
        idx = torch.stack([zero, torch.full_like(own, 5)], dim=-1)
    rows = impl._FLASH_ROWS
    impl._FLASH_ROWS = 150
    try:
        _check_varlen_by_rule(lengths, 2, 1, 16, bs, causal, torch.float32, idx=idx.to(torch.int32), top_k=2)
    finally:
        impl._FLASH_ROWS = rows
    assert flash_calls == {"fwd": 1, "bwd": 1}


def test_flash_formulation_without_own_block_uses_tiles(flash_calls):
    """User indices in which a causal row skips its own block: the tiles run (the flash
    formulation assumes the own block), and agree with the reference."""
    lengths, bs = [300], 64
    pos = torch.arange(lengths[0])
    own = (pos // bs)[:, None].expand(-1, 2)
    idx = torch.where(own > 0, own - 1, own)[..., None]  # the previous block only (block 0: own)
    _check_varlen_by_rule(lengths, 2, 2, 16, bs, True, torch.float32, idx=idx.to(torch.int32), top_k=1)
    assert flash_calls == {"fwd": 0, "bwd": 0}


def test_flash_formulation_chunking_is_exact(flash_calls, monkeypatch):
    """Own blocks cut into several calls (two sequences, a tail between them) and small row
    chunks give the same result as the default chunking."""
    from moba.ops import torch_impl as impl

    q, k, v, cu, max_s = random_varlen([200, 190], 4, 2, 16, torch.float64)
    dout = torch.randn(q.shape, dtype=torch.float64)

    def run():
        fn = lambda *x: moba.moba_attn_varlen_func(*x, cu, max_s, 64, 3, backend="torch")  # noqa: E731
        return forward_backward(fn, detached_copies(q, k, v), dout)

    out, grads = run()
    monkeypatch.setattr(impl, "_FLASH_ROWS", 37)
    monkeypatch.setattr(impl, "_FLASH_OWN_BLOCKS", 3)
    out_c, grads_c = run()
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-12)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, rtol=0, atol=1e-12)
    assert flash_calls == {"fwd": 2, "bwd": 2}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_flash_formulation_nan_stays_in_its_sequence(flash_calls, causal):
    """A NaN in the queries, keys and values of sequence 0 reaches no value or gradient of
    sequence 1, which equals a run of sequence 1 alone."""
    lengths, bs = [200, 190], 64
    q, k, v, cu, max_s = random_varlen(lengths, 4, 2, 16, torch.float32)
    dout = torch.randn(q.shape)
    for x in (q, k, v):
        x.data[5, 0, 3] = float("nan")
    out, grads = forward_backward(
        lambda *x: moba.moba_attn_varlen_func(*x, cu, max_s, bs, 3, causal, backend="torch"), detached_copies(q, k, v),
        dout)
    a = lengths[0]
    cu1 = torch.tensor([0, lengths[1]], dtype=torch.int32)
    out1, grads1 = forward_backward(
        lambda *x: moba.moba_attn_varlen_func(*x, cu1, lengths[1], bs, 3, causal, backend="torch"),
        detached_copies(q[a:], k[a:], v[a:]), dout[a:])
    assert torch.isnan(out[:a]).any()
    torch.testing.assert_close(out[a:], out1, rtol=0, atol=1e-6)
    for g, g1 in zip(grads, grads1, strict=True):
        assert torch.isfinite(g[a:]).all()
        torch.testing.assert_close(g[a:], g1, rtol=0, atol=1e-5)
    assert flash_calls["fwd"] == 1  # sequence 1 alone is below the size limit: the tiles
