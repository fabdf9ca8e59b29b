"""A non-finite value in one sequence never reaches another sequence (issue 13).

The rule, on every backend and entry point: a NaN or inf in the q, k or v of one sequence
(a batch row, a packed varlen sequence, a left-padded decode row, the padding of a KV
cache, one branch of a draft tree) leaves every *other* sequence's outputs and gradients
exactly as they are without it; and finite inputs give finite outputs and gradients
wherever dense SDPA does. Masks replace values (``torch.where``), so ``0 * NaN`` never
happens.

Backends here: "torch" and "reference" on CPU. The Triton kernels run the same checks under
the Triton interpreter through ``test_triton_interpret_cases.py``, which imports the
``check_*`` functions of tests/_helpers.py (they take the backend as an argument).
"""

from __future__ import annotations

import pytest
import torch

import moba
from moba.decode import BlockMeanState, decode_attention_torch
from moba.decode.tree import moba_tree_attention
from moba.nn import MoBASelfAttention
from tests._helpers import (
    POISONS,
    assert_same,
    backend_param,
    check_decode_padding,
    check_fixed_batch,
    check_float16_large_inputs,
    check_invisible_poison,
    check_large_negative_self_score,
    check_varlen,
    run_with_grads,
)

CPU_BACKENDS = ["torch", "reference"]


# ---------------------------------------------------------------------------------------------
# Checks shared with the Triton interpreter cases (backend as an argument)


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
@pytest.mark.parametrize("backend", [backend_param(b) for b in CPU_BACKENDS])
def test_fixed_batch_backward(backend, poison, where):
    for token in (0, 9):
        check_fixed_batch(backend, poison=poison, where=where, token=token)


@pytest.mark.parametrize("backend", [backend_param(b) for b in CPU_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_batch_backward_gqa_and_tail_blocks(backend, dtype):
    """S = 13 with block_size 5 (a tail block), GQA 6:2, every query selects 3 blocks."""
    check_fixed_batch(backend, dtype=dtype, s=13, hq=6, hkv=2, block_size=5, top_k=3, token=0)


@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("backend", [backend_param(b) for b in CPU_BACKENDS])
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
    for g, c in zip(run_with_grads(fn, *bad, dout), run_with_grads(fn, q, k, v, dout), strict=True):
        assert_same(g[1], c[1], "full_attn_func")
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32)
    flat = lambda t: t.reshape(b * s, *t.shape[2:])  # noqa: E731
    fn = lambda q_, k_, v_: moba.full_attn_varlen_func(q_, k_, v_, cu, s, causal=causal)  # noqa: E731
    got = run_with_grads(fn, *map(flat, bad), flat(dout))
    clean = run_with_grads(fn, *map(flat, (q, k, v)), flat(dout))
    for g, c in zip(got, clean, strict=True):
        assert_same(g[s:], c[s:], "full_attn_varlen_func")


# ---------------------------------------------------------------------------------------------
# Inside one sequence: a non-finite key or value a query cannot see (a later key in causal mode,
# the right padding of a row, a block it did not select) never reaches that query's output or dq

# Shapes that reach every formulation of the torch backend (moba.ops.torch_impl.gated_path).
INVISIBLE_CASES = {
    "tile": dict(),
    "dense_mask": dict(s=48, block_size=16, top_k=2, first=30),
    "dense": dict(top_k=9),
    "flash": dict(b=1, s=1024, block_size=64, top_k=2, first=700, hq=2, hkv=1, d=8),
    "right-padding": dict(s=300, block_size=64, top_k=3, first=256, hq=2, hkv=1, d=8),
    "noncausal": dict(causal=False, first=12),
}


@pytest.mark.parametrize("case", list(INVISIBLE_CASES))
@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_invisible_non_finite_key_or_value(backend, where, poison, case):
    if backend == "reference" and case in ("flash", "right-padding"):
        pytest.skip("the reference has one formulation; the small cases cover it")
    check_invisible_poison(backend, where=where, poison=poison, **INVISIBLE_CASES[case])


@pytest.mark.parametrize("which", ["func", "varlen"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_dense_fallbacks_invisible_non_finite(which, where):
    """full_attn_func / full_attn_varlen_func, causal: later NaN keys/values (and a NaN right
    padding) leave the earlier queries' outputs and dq finite and as without them."""
    b, s, hq, hkv, d = 2, 40, 4, 2, 8
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, s, h, d, generator=gen) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32)

    def fn(q_, k_, v_):
        if which == "func":
            return moba.full_attn_func(q_, k_, v_, causal=True)
        flat = [t.reshape(b * s, *t.shape[2:]) for t in (q_, k_, v_)]
        return moba.full_attn_varlen_func(*flat, cu, s, causal=True).reshape(b, s, hq, d)

    runs = []
    for value in (float("nan"), 0.5):
        kk, vv = k.clone(), v.clone()
        (kk if where == "k" else vv)[0, [20, 21, 33]] = value
        (kk if where == "k" else vv)[1, 30:] = value  # right padding
        runs.append(run_with_grads(fn, q, kk, vv, torch.ones(b, s, hq, d)))
    for name, got, clean in zip(["out", "dq"], runs[0][:2], runs[1][:2], strict=True):
        for row, end in ((0, 20), (1, 30)):
            assert torch.isfinite(got[row, :end]).all(), f"{which}: {name} of row {row}"
            torch.testing.assert_close(got[row, :end], clean[row, :end])


# ---------------------------------------------------------------------------------------------
# Finite inputs: finite outputs and gradients wherever dense SDPA gives them


@pytest.mark.parametrize("backend", [backend_param(b) for b in CPU_BACKENDS])
def test_large_negative_score_stays_finite(backend):
    check_large_negative_self_score(backend)


@pytest.mark.parametrize("backend", [backend_param(b) for b in CPU_BACKENDS])
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
    out, dq, dk, dv = run_with_grads(fn, *bad, dout)
    alone = run_with_grads(lambda *t: moba.full_attn_func(*t, causal=True), *(t[:1, pad:] for t in (q, k, v)), dout[:1, pad:])
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
    assert_same(got[keep], clean[keep], "tree branch B")


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
    assert_same(out_bad[1], out_clean[1], "layer output of row 1")
    assert_same(g_bad[1], g_clean[1], "input gradient of row 1")
