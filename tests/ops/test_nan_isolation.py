"""A non-finite value in one sequence never reaches another sequence (issue 13).

The rule, on every backend and entry point: a NaN or inf in the q, k or v of one sequence
(a batch row, a packed varlen sequence, a left-padded decode row, the padding of a KV
cache, one branch of a draft tree) leaves every *other* sequence's outputs and gradients
exactly as they are without it; and finite inputs give finite outputs and gradients
wherever dense SDPA does. Masks replace values (``torch.where``), so ``0 * NaN`` never
happens.

Backends here: "torch" and "reference" on CPU. The Triton kernels run the same checks under
the Triton interpreter through ``test_triton_interpret_cases.py``, which imports the
``check_*`` functions of this file (they take the backend as an argument).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moba
from moba.decode import BlockMeanState, decode_attention_torch, moba_decode
from moba.decode.tree import moba_tree_attention
from moba.nn import MoBASelfAttention

CPU_BACKENDS = ["torch", "reference"]
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}

def _backward_param(backend: str):
    return pytest.param(backend, id=backend)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _run(fn, q, k, v, dout):
    """Output and the gradients of q, k, v of ``fn(q, k, v)`` for the output gradient ``dout``."""
    q, k, v = _leaves(q, k, v)
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _assert_same(got, clean, what):
    """Bitwise equal (the other sequences' computation is the same), and finite."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values leaked in"
    torch.testing.assert_close(got, clean, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# Checks shared with the Triton interpreter cases (backend as an argument)


def check_fixed_batch(backend, dtype=torch.float32, poison="nan", where="q", token=0, backward=True,
                      b=3, s=16, hq=4, hkv=2, d=16, block_size=4, top_k=2):
    """Poison ``where``[0, token] of batch row 0: rows 1.. keep their outputs and gradients."""
    q, k, v = (torch.randn(b, s, h, d).to(dtype) for h in (hq, hkv, hkv))
    dout = torch.randn(b, s, hq, d).to(dtype)
    bad = dict(q=q.clone(), k=k.clone(), v=v.clone())
    bad[where][0, token] = POISONS[poison]

    def fn(q_, k_, v_):
        return moba.moba_attn_func(q_, k_, v_, block_size, top_k, backend=backend)

    if not backward:
        clean, got = fn(q, k, v), fn(bad["q"], bad["k"], bad["v"])
        _assert_same(got[1:], clean[1:], "out")
        return
    clean = _run(fn, q, k, v, dout)
    got = _run(fn, bad["q"], bad["k"], bad["v"], dout)
    for name, g, c in zip(["out", "dq", "dk", "dv"], got, clean, strict=True):
        _assert_same(g[1:], c[1:], f"{backend} {poison} in {where}[0, {token}]: {name} of rows 1..")


def check_varlen(backend, dtype=torch.float32, poison="nan", backward=True, lengths=(7, 0, 9, 5), poisoned=2,
                 hq=2, hkv=1, d=16, block_size=4, top_k=2):
    """Poison q, k and v of the first token of packed sequence ``poisoned``: the others keep
    their outputs and gradients (empty sequences included)."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    total = cu[-1]
    q, k, v = (torch.randn(total, h, d).to(dtype) for h in (hq, hkv, hkv))
    dout = torch.randn(total, hq, d).to(dtype)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    a, e = cu[poisoned], cu[poisoned + 1]
    bad = [t.clone() for t in (q, k, v)]
    for t in bad:
        t[a] = POISONS[poison]
    others = torch.ones(total, dtype=torch.bool)
    others[a:e] = False

    def fn(q_, k_, v_):
        return moba.moba_attn_varlen_func(q_, k_, v_, cu_t, max(lengths), block_size, top_k, backend=backend)

    if not backward:
        _assert_same(fn(*bad)[others], fn(q, k, v)[others], "out")
        return
    clean = _run(fn, q, k, v, dout)
    got = _run(fn, *bad, dout)
    for name, g, c in zip(["out", "dq", "dk", "dv"], got, clean, strict=True):
        _assert_same(g[others], c[others], f"{backend} varlen {poison}: {name} of the other sequences")


def check_decode_padding(backend, dtype=torch.float32, poison="nan"):
    """Left-padded decode: garbage in row 0's padding, and in every token of row 2, changes
    nothing of row 0's and row 1's outputs (they equal an unpadded decode of their own)."""
    b, lk, hq, hkv, d, bs, top_k = 3, 24, 4, 2, 16, 4, 2
    starts = [5, 0, 3]
    kc, vc = (torch.randn(b, lk, hkv, d).to(dtype) for _ in range(2))
    q = torch.randn(b, 2, hq, d).to(dtype)  # two newest tokens per row (a chunk)
    kc_bad, vc_bad = kc.clone(), vc.clone()
    kc_bad[0, : starts[0]] = POISONS[poison]
    vc_bad[0, : starts[0]] = POISONS[poison]
    kc_bad[2], vc_bad[2] = POISONS[poison], POISONS[poison]
    out = moba_decode(q, kc_bad, vc_bad, BlockMeanState(bs), bs, top_k, starts=starts, backend=backend)
    for row in (0, 1):
        s0 = starts[row]
        alone = moba_decode(q[row : row + 1], kc[row : row + 1, s0:], vc[row : row + 1, s0:], BlockMeanState(bs),
                            bs, top_k, backend=backend)
        assert torch.isfinite(out[row]).all(), f"{backend} decode: row {row} got non-finite values"
        torch.testing.assert_close(out[row], alone[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fixed-length batches, varlen packing


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fixed_batch_forward(backend, poison, where):
    for token in (0, 9, 15):
        check_fixed_batch(backend, poison=poison, where=where, token=token, backward=False)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("backend", [_backward_param(b) for b in CPU_BACKENDS])
def test_fixed_batch_backward(backend, poison, where):
    for token in (0, 9):
        check_fixed_batch(backend, poison=poison, where=where, token=token)


@pytest.mark.parametrize("backend", [_backward_param(b) for b in CPU_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_batch_backward_gqa_and_tail_blocks(backend, dtype):
    """S = 13 with block_size 5 (a tail block), GQA 6:2, every query selects 3 blocks."""
    check_fixed_batch(backend, dtype=dtype, s=13, hq=6, hkv=2, block_size=5, top_k=3, token=0)


@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("backend", [_backward_param(b) for b in CPU_BACKENDS])
def test_varlen_packing(backend, poison):
    check_varlen(backend, poison=poison, backward=False)
    check_varlen(backend, poison=poison, poisoned=0)
    check_varlen(backend, poison=poison, poisoned=3)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_fallbacks_isolate_rows(causal):
    """full_attn_func / full_attn_varlen_func (the "full" mode of the modules)."""
    b, s, hq, hkv, d = 2, 9, 4, 2, 8
    q, k, v = (torch.randn(b, s, h, d) for h in (hq, hkv, hkv))
    dout = torch.randn(b, s, hq, d)
    bad = [t.clone() for t in (q, k, v)]
    for t in bad:
        t[0, 0] = float("nan")
    fn = lambda q_, k_, v_: moba.full_attn_func(q_, k_, v_, causal=causal)  # noqa: E731
    for g, c in zip(_run(fn, *bad, dout), _run(fn, q, k, v, dout), strict=True):
        _assert_same(g[1], c[1], "full_attn_func")
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32)
    flat = lambda t: t.reshape(b * s, *t.shape[2:])  # noqa: E731
    fn = lambda q_, k_, v_: moba.full_attn_varlen_func(q_, k_, v_, cu, s, causal=causal)  # noqa: E731
    got = _run(fn, *map(flat, bad), flat(dout))
    clean = _run(fn, *map(flat, (q, k, v)), flat(dout))
    for g, c in zip(got, clean, strict=True):
        _assert_same(g[s:], c[s:], "full_attn_varlen_func")


# ---------------------------------------------------------------------------------------------
# Finite inputs: finite outputs and gradients wherever dense SDPA gives them


def _sdpa(q, k, v):
    g = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2),
        is_causal=True,
    )
    return out.transpose(1, 2)


def check_large_negative_self_score(backend, dtype=torch.float32):
    """Token 0 sees only itself; its scaled score is -200 (exp underflows to 0 in float32),
    a large but finite input. Dense top_k: MoBA must match SDPA in float64, and be finite."""
    b, s, hq, d = 2, 13, 2, 16  # uneven selections: tiles / chunks with padding rows
    q, k, v = (torch.randn(b, s, hq, d, dtype=torch.float64) for _ in range(3))
    k0 = k[0, 0, 0]
    q[0, 0, 0] = -200.0 * d**0.5 * k0 / k0.dot(k0)  # scale * q.k = -200
    dout = torch.randn(b, s, hq, d, dtype=torch.float64)
    truth = _run(_sdpa, q, k, v, dout)
    fn = lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, 4, s, backend=backend)  # noqa: E731
    got = _run(fn, q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype))
    for name, g, t in zip(["out", "dq", "dk", "dv"], got, truth, strict=True):
        assert torch.isfinite(t).all()
        assert torch.isfinite(g).all(), f"{backend}: {name} is not finite where SDPA's is"
        torch.testing.assert_close(g.double(), t, rtol=1e-3, atol=1e-3, msg=lambda m, name=name: f"{backend} {name}: {m}")


@pytest.mark.parametrize("backend", [_backward_param(b) for b in CPU_BACKENDS])
def test_large_negative_score_stays_finite(backend):
    check_large_negative_self_score(backend)


def check_float16_large_inputs(backend):
    """float16 q, k with entries ~30 (scores of several thousand): finite wherever SDPA (which
    computes in float32 on CPU) is finite."""
    b, s, h, d = 2, 13, 2, 16
    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    q, k = (30 * t.clamp(-1, 1) for t in (q, k))
    q[:, 0] = -k[:, 0]  # token 0 sees only itself: score -|k|^2 / 4, thousands below 0
    q, k, v = (t.half() for t in (q, k, v))
    dout = torch.randn(b, s, h, d).half()
    ref = _run(lambda *t: _sdpa(*(x.float() for x in t)).half(), q, k, v, dout)
    got = _run(lambda *t: moba.moba_attn_func(*t, 4, 2, backend=backend), q, k, v, dout)
    for name, g, r in zip(["out", "dq", "dk", "dv"], got, ref, strict=True):
        if torch.isfinite(r).all():
            assert torch.isfinite(g).all(), f"{backend}: {name} is not finite where SDPA's is"


@pytest.mark.parametrize("backend", [_backward_param(b) for b in CPU_BACKENDS])
def test_float16_large_inputs_stay_finite(backend):
    check_float16_large_inputs(backend)


# ---------------------------------------------------------------------------------------------
# Decoding with a KV cache (left padding), full attention with a padding mask


@pytest.mark.parametrize("poison", list(POISONS))
def test_decode_left_padding_and_other_rows(poison):
    check_decode_padding("torch", poison=poison)


def test_decode_attention_masked_slots_do_not_read_padding():
    """The PyTorch decode path points masked slots at cache position 0: left padding."""
    b, lk, hq, hkv, d, bs = 1, 12, 2, 1, 8, 4
    q = torch.randn(b, 1, hq, d)
    kc, vc = torch.randn(b, lk, hkv, d), torch.randn(b, lk, hkv, d)
    vc[:, :2] = float("nan")  # two padding tokens
    idx = torch.tensor([[[[0, 2], [2, -1]]]])  # head 0: own block 2 + block 0 (padding in it); head 1: own only
    out = decode_attention_torch(q, kc, vc, idx, torch.tensor([2]), torch.tensor([lk - 2]), bs, d**-0.5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("poison", list(POISONS))
def test_full_attn_with_kvcache_padding_mask(poison):
    """Garbage in row 0's left padding (keys, values and queries) and in all of row 1: row 0's
    real outputs and gradients equal an unpadded run; padding queries give 0."""
    b, lk, hq, hkv, d, pad = 2, 12, 4, 2, 8, 3
    q, k, v = (torch.randn(b, lk, h, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(b, lk, hq, d, dtype=torch.float64)
    mask = torch.ones(b, lk, dtype=torch.bool)
    mask[0, :pad] = False
    bad = [t.clone() for t in (q, k, v)]
    for t in bad:
        t[0, :pad] = POISONS[poison]
        t[1, 4] = POISONS[poison]
    fn = lambda q_, k_, v_: moba.full_attn_with_kvcache(q_, k_, v_, key_padding_mask=mask)  # noqa: E731
    out, dq, dk, dv = _run(fn, *bad, dout)
    alone = _run(lambda *t: moba.full_attn_func(*t), *(t[:1, pad:] for t in (q, k, v)), dout[:1, pad:])
    assert (out[0, :pad] == 0).all()
    for name, g, a in zip(["out", "dq", "dk", "dv"], (out, dq, dk, dv), alone, strict=True):
        assert torch.isfinite(g[0]).all(), f"{name} of row 0 is not finite"
        torch.testing.assert_close(g[0, pad:], a[0], rtol=1e-12, atol=1e-12)
    # newest queries only (decoding step)
    out = moba.full_attn_with_kvcache(bad[0][:, -2:], bad[1], bad[2], key_padding_mask=mask)
    torch.testing.assert_close(out[0], alone[0][0, -2:], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Draft trees: every branch is its own sequence


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("top_k", [2, 99])
def test_tree_branches_are_isolated(poison, top_k):
    """Branch A (nodes 1, 2) gets non-finite q, k, v; branch B (nodes 3, 4) and the root
    keep exactly their outputs. Cache of 6 tokens, block 4: the tree reaches into block 1
    and block 2, so block means mix cached keys with each branch's own nodes."""
    hq, hkv, d, bs = 4, 2, 8, 4
    parents = [-1, 0, 1, 0, 3]
    kc, vc = torch.randn(2, 1, 6, hkv, d, dtype=torch.float64)
    q = torch.randn(5, hq, d, dtype=torch.float64)
    k, v = torch.randn(2, 5, hkv, d, dtype=torch.float64)

    def run(q_, k_, v_):
        return moba_tree_attention(q_, k_, v_, parents, kc, vc, BlockMeanState(bs), bs, top_k, d**-0.5)

    clean = run(q, k, v)
    bad = [t.clone() for t in (q, k, v)]
    for t in bad:
        t[1:3] = POISONS[poison]
    got = run(*bad)
    keep = torch.tensor([0, 3, 4])
    _assert_same(got[keep], clean[keep], "tree branch B")


# ---------------------------------------------------------------------------------------------
# A model layer: a NaN in sequence 0 of a batch never reaches sequence 1's input gradient


@pytest.mark.parametrize(
    "backend,mode",
    [("torch", "moba"), ("reference", "moba"), ("torch", "full")],
)
def test_self_attention_layer_isolates_batch_rows(backend, mode):
    torch.manual_seed(0)
    layer = MoBASelfAttention(32, 4, 2, block_size=4, top_k=2, backend=backend, mode=mode)
    x = torch.randn(2, 16, 32)
    x_bad = x.clone()
    x_bad[0, 0, 0] = float("nan")
    grads = []
    for inp in (x, x_bad):
        leaf = inp.clone().requires_grad_()
        out = layer(leaf)
        out.sum().backward()  # row 0's loss is NaN; row 1's input gradient must not see it
        grads.append((out.detach(), leaf.grad))
    (out_clean, g_clean), (out_bad, g_bad) = grads
    _assert_same(out_bad[1], out_clean[1], "layer output of row 1")
    _assert_same(g_bad[1], g_clean[1], "input gradient of row 1")
