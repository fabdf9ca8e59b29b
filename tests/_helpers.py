"""Shared test helpers: the tolerance rule, random inputs, independent dense attention, a
brute-force gate, the NaN-isolation checks (run on every backend, the Triton interpreter's
too), the scaling runs' tiny corpus / config / plot capture, and the documentation pages' python
blocks, setups and shell commands.

Everything here is written independently of the library's internals (no import of
``moba.ops.gate`` / ``moba.ops.torch_impl``), so a test that compares a backend with one of these
helpers compares two separate implementations. Every test file imports shared code from here
(``from tests._helpers import ...``), never from another test file; keep the functions general
and documented.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moba
from moba.decode import BlockMeanState, moba_decode

#: The repository root.
ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------
# Tolerance rule (docs/design.md section 3, from flash-attention's tests)
# ---------------------------------------------------------------------------------------

#: factor of the rule for outputs and for gradients.
OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 over finite entries of ``b`` (0.0 for empty tensors)."""
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def default_floor(truth, dtype: torch.dtype) -> float:
    """A tiny absolute floor at the scale of ``truth``: 1e-12 for float64, 4 float32 rounding
    units (~5e-7) for the other dtypes, times ``max(1, max|truth|)``.

    ``truth`` is a tensor or a list of tensors (e.g. all gradients of one backward, which
    share one scale: dq of a query that sees a single key is exactly 0 in the truth, yet its
    float32 value is a difference of O(|dO| |V|) terms).

    It matters only when the low-precision reference is (almost) exact: for float64 runs the
    low-precision reference *is* the truth and the rule alone would demand a bit-exact
    kernel; float32 summation-order noise is of the order of the float32 reference's own
    error. For float16/bfloat16 the floor is far below the reference's error, so it never
    hides a real float16/bfloat16 discrepancy.
    """
    tensors = [truth] if isinstance(truth, torch.Tensor) else list(truth)
    scale = max([1.0] + [t.double().abs().max().item() for t in tensors if t.numel()])
    if dtype == torch.float64:
        return 1e-12 * scale
    return 4 * torch.finfo(torch.float32).eps * scale


def assert_close_by_rule(
    actual: torch.Tensor,
    ref_lowp: torch.Tensor,
    ref_truth: torch.Tensor,
    factor: float = OUT_FACTOR,
    atol_floor: float | None = None,
    name: str = "output",
) -> None:
    """docs/design.md tolerance rule.

    ``max|actual - truth| <= factor * max|ref_lowp - truth| + atol_floor``

    actual: the backend's result in the test dtype; ref_lowp: the reference run in the same
    (low) precision; ref_truth: the reference in float64 (the truth). NaN must appear in
    exactly the same places in ``actual`` and ``ref_truth`` and is otherwise ignored.
    ``atol_floor`` defaults to ``default_floor(ref_truth, actual.dtype)``.
    """
    if actual.shape != ref_truth.shape or ref_lowp.shape != ref_truth.shape:
        raise AssertionError(
            f"{name}: shapes differ: actual {tuple(actual.shape)}, lowp {tuple(ref_lowp.shape)}, "
            f"truth {tuple(ref_truth.shape)}"
        )
    nan_a, nan_t = torch.isnan(actual), torch.isnan(ref_truth)
    if not torch.equal(nan_a, nan_t):
        raise AssertionError(
            f"{name}: NaN pattern differs ({int(nan_a.sum())} NaN in actual, {int(nan_t.sum())} in truth)"
        )
    keep = ~nan_t
    a, lo, t = actual[keep], ref_lowp[keep], ref_truth[keep]
    if atol_floor is None:
        atol_floor = default_floor(t, actual.dtype)
    err = max_abs_err(a, t)
    ref_err = max_abs_err(lo.nan_to_num(), t)
    bound = factor * ref_err + atol_floor
    if not err <= bound:  # also catches err == nan
        raise AssertionError(
            f"{name}: max error vs truth {err:.3e} > {factor} x low-precision reference error "
            f"{ref_err:.3e} + floor {atol_floor:.1e} = {bound:.3e}"
        )


def assert_grads_close_by_rule(
    grads, grads_lowp, grads_truth, factor: float = GRAD_FACTOR, names=("dq", "dk", "dv")
) -> None:
    """``assert_close_by_rule`` for each gradient of one backward, with one shared floor
    (``default_floor`` over all truth gradients) and each gradient's dtype checked against
    the low-precision reference's."""
    assert len(grads) == len(grads_lowp) == len(grads_truth)
    floor = default_floor(grads_truth, grads[0].dtype)
    for name, g, g_lo, g_t in zip(names[: len(grads)], grads, grads_lowp, grads_truth, strict=True):
        assert g.dtype == g_lo.dtype, f"{name}: dtype {g.dtype}, expected {g_lo.dtype}"
        assert_close_by_rule(g, g_lo, g_t, factor, atol_floor=floor, name=name)


# ---------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------


def random_qkv(
    batch: int,
    seqlen: int,
    hq: int,
    hkv: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    *,
    generator: torch.Generator | None = None,
    requires_grad: bool = False,
):
    """Fixed-length q (B, S, Hq, D), k and v (B, S, Hkv, D), standard normal, leaf tensors.

    Values are drawn in float64 and rounded to ``dtype``, so ``x.double()`` is exactly the
    low-precision input and the float64 truth sees the same numbers.
    """
    shapes = [(batch, seqlen, hq, head_dim), (batch, seqlen, hkv, head_dim), (batch, seqlen, hkv, head_dim)]
    out = []
    for shape in shapes:
        x = torch.randn(shape, dtype=torch.float64, generator=generator).to(dtype)
        out.append(x.requires_grad_(requires_grad))
    return tuple(out)


def cu_seqlens_of(lengths) -> torch.Tensor:
    """int32 cu_seqlens (N + 1,) of a list of sequence lengths."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32)


def random_varlen(
    lengths,
    hq: int,
    hkv: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    *,
    generator: torch.Generator | None = None,
    requires_grad: bool = False,
):
    """Packed q (T, Hq, D), k, v (T, Hkv, D), cu_seqlens (int32), max_seqlen for ``lengths``.

    Lengths may contain 0 (empty sequences). max_seqlen is the longest length (0 if all empty).
    """
    total = int(sum(lengths))
    q, k, v = random_qkv(1, total, hq, hkv, head_dim, dtype, generator=generator)
    q, k, v = (x[0].clone().requires_grad_(requires_grad) for x in (q, k, v))
    return q, k, v, cu_seqlens_of(lengths), max([0, *lengths])


def detached_copies(*tensors, dtype: torch.dtype | None = None):
    """Fresh leaf copies (optionally cast) that require grad, for a second autograd run."""
    return tuple(t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors)


def forward_backward(fn, inputs, dout: torch.Tensor):
    """out = fn(*inputs); out.backward(dout). Returns (out, [grad of each input]).

    ``inputs`` are leaf tensors that require grad; ``dout`` is cast to out's dtype.
    """
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward(dout.to(out.dtype))
    return out.detach(), [x.grad.detach() for x in inputs]


# ---------------------------------------------------------------------------------------
# Independent dense attention
# ---------------------------------------------------------------------------------------


def expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """(..., Hkv, D) -> (..., Hq, D): query head h reads KV head h // (Hq // Hkv)."""
    hkv = x.shape[-2]
    assert hq % hkv == 0
    return x.repeat_interleave(hq // hkv, dim=-2)


def dense_sdpa_causal(q, k, v, causal: bool = True, softmax_scale: float | None = None):
    """Dense attention with ``F.scaled_dot_product_attention`` (GQA by repeating K/V).

    q: (B, S, Hq, D), k, v: (B, S, Hkv, D) -> (B, S, Hq, D). ``causal=False`` is full
    bidirectional attention.
    """
    hq = q.shape[-2]
    qt = q.transpose(1, 2)
    kt = expand_kv(k, hq).transpose(1, 2)
    vt = expand_kv(v, hq).transpose(1, 2)
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


def masked_attention(q, k, v, allowed: torch.Tensor, softmax_scale: float | None = None):
    """Dense attention with an explicit boolean mask, computed in q's dtype.

    q: (B, S, Hq, D), k, v: (B, S, Hkv, D), allowed: (S, S) or (B, Hq, S, S) with
    ``allowed[..., i, j]`` = query i may see key j. Every row must allow one key.
    """
    hq, d = q.shape[-2], q.shape[-1]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    qt = q.transpose(1, 2)
    kt = expand_kv(k, hq).transpose(1, 2)
    vt = expand_kv(v, hq).transpose(1, 2)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vt).transpose(1, 2)


def block_diagonal_causal_mask(seqlen: int, block_size: int, causal: bool = True) -> torch.Tensor:
    """(S, S) mask: same block, and (causal) key position <= query position."""
    i = torch.arange(seqlen)[:, None]
    j = torch.arange(seqlen)[None, :]
    mask = (i // block_size) == (j // block_size)
    if causal:
        mask &= j <= i
    return mask


# ---------------------------------------------------------------------------------------
# Backend helpers
# ---------------------------------------------------------------------------------------


def usable_backends(device="cpu", exclude=("reference",)) -> list[str]:
    """Names of the attention backends usable on ``device`` (the reference excluded)."""
    return [n for n, why in moba.available_backends(device).items() if why is None and n not in exclude]


def reference_fixed(q, k, v, block_indices, block_size, causal=True, softmax_scale=None):
    """The dense-mask reference backend with given block indices (fixed length)."""
    return moba.moba_attn_func(
        q, k, v, block_size, 1, causal, softmax_scale, backend="reference", block_indices=block_indices
    )


def reference_varlen(q, k, v, cu, max_seqlen, block_indices, block_size, causal=True, softmax_scale=None):
    """The dense-mask reference backend with given block indices (varlen)."""
    return moba.moba_attn_varlen_func(
        q,
        k,
        v,
        cu,
        max_seqlen,
        block_size,
        1,
        causal,
        softmax_scale,
        backend="reference",
        block_indices=block_indices,
    )


# ---------------------------------------------------------------------------------------
# Brute-force gate (plain Python loops, float64), docs/design.md section 1 steps 1-5
# ---------------------------------------------------------------------------------------


def brute_force_gate_scores(q_seq, k_seq, block_size: int, hq_index: int):
    """Gate scores of one sequence for one query head, in plain Python float64.

    q_seq: (S, Hq, D), k_seq: (S, Hkv, D) tensors of ONE sequence. Returns a list (per query)
    of lists (per block) of scores dot(q_t, mean of block j's keys).
    """
    s, hq, d = q_seq.shape
    hkv = k_seq.shape[1]
    kv_head = hq_index // (hq // hkv)
    keys = k_seq[:, kv_head].double().tolist()
    queries = q_seq[:, hq_index].double().tolist()
    n_blocks = math.ceil(s / block_size)
    means = []
    for j in range(n_blocks):
        members = keys[j * block_size : min((j + 1) * block_size, s)]
        means.append([sum(row[c] for row in members) / len(members) for c in range(d)])
    return [[sum(a * b for a, b in zip(qt, m, strict=True)) for m in means] for qt in queries]


def brute_force_candidates(t: int, seqlen: int, block_size: int, causal: bool) -> list[int]:
    """Candidate blocks of the query at position t (docs/design.md step 4)."""
    own = t // block_size
    n_blocks = math.ceil(seqlen / block_size)
    if causal:
        return list(range(own))  # complete blocks strictly before the own block
    return [j for j in range(n_blocks) if j != own]


def brute_force_select(q_seq, k_seq, block_size: int, top_k: int, causal: bool):
    """Brute-force selection of one sequence: list[t][h] -> (sorted set of blocks, scores).

    Own block + the top_k - 1 best candidates (all when fewer).
    """
    s, hq, _ = q_seq.shape
    result = [[None] * hq for _ in range(s)]
    for h in range(hq):
        scores = brute_force_gate_scores(q_seq, k_seq, block_size, h)
        for t in range(s):
            cands = brute_force_candidates(t, s, block_size, causal)
            best = sorted(cands, key=lambda j: -scores[t][j])[: top_k - 1]
            result[t][h] = (sorted({t // block_size, *best}), scores[t])
    return result


def assert_gate_matches_brute_force(
    idx, q_seq, k_seq, block_size: int, top_k: int, causal: bool, width: int, tie_tol: float = 1e-4
) -> None:
    """Check a gate result of ONE sequence against the brute-force gate.

    idx: (S, Hq, width) int tensor from the library. Row layout: ascending valid blocks then
    PAD_INDEX. The selected set must equal the brute-force set; where it differs, the
    difference must be explained by near-ties (scores within ``tie_tol`` relative to the
    scale of the scores, since the library scores in float32 and this helper in float64).
    """
    s, hq, _ = q_seq.shape
    assert idx.shape == (s, hq, width), (tuple(idx.shape), (s, hq, width))
    rows = idx.tolist()
    bf = brute_force_select(q_seq, k_seq, block_size, top_k, causal)
    for t in range(s):
        own = t // block_size
        cands = brute_force_candidates(t, s, block_size, causal)
        n_valid = 1 + min(top_k - 1, len(cands))
        for h in range(hq):
            row = rows[t][h]
            valid = [j for j in row if j != moba.PAD_INDEX]
            assert row[: len(valid)] == valid and all(j == moba.PAD_INDEX for j in row[len(valid) :]), (
                f"t={t} h={h}: PAD_INDEX not at the end: {row}"
            )
            assert valid == sorted(valid), f"t={t} h={h}: not ascending: {row}"
            assert len(set(valid)) == len(valid), f"t={t} h={h}: duplicate block: {row}"
            assert own in valid, f"t={t} h={h}: own block {own} missing: {row}"
            assert len(valid) == n_valid, (
                f"t={t} h={h}: {len(valid)} blocks selected, expected {n_valid}: {row}"
            )
            others = [j for j in valid if j != own]
            assert all(j in cands for j in others), (
                f"t={t} h={h}: non-candidate selected: {row} (cands {cands})"
            )
            expected, scores = bf[t][h]
            if valid != expected:
                # Only acceptable as a near-tie: the worst chosen candidate scores (almost)
                # as high as the best rejected one.
                rejected = [j for j in cands if j not in others]
                scale = max(1.0, max(abs(x) for x in scores))
                worst_chosen = min(scores[j] for j in others)
                best_rejected = max(scores[j] for j in rejected)
                assert worst_chosen >= best_rejected - tie_tol * scale, (
                    f"t={t} h={h}: gate chose {valid}, brute force {expected}; "
                    f"scores {[round(x, 6) for x in scores]}"
                )


# ---------------------------------------------------------------------------------------
# NaN isolation (tests/ops/test_nan_isolation.py; the Triton interpreter cases run them too):
# a NaN / Inf in one sequence must never reach another.
# ---------------------------------------------------------------------------------------

#: Values a poisoned token gets.
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def backend_param(backend: str):
    return pytest.param(backend, id=backend)


def grad_leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def run_with_grads(fn, q, k, v, dout):
    """Output and the gradients of q, k, v of ``fn(q, k, v)`` for the output gradient ``dout``."""
    q, k, v = grad_leaves(q, k, v)
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def assert_same(got, clean, what):
    """Bitwise equal (the other sequences' computation is the same), and finite."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values leaked in"
    torch.testing.assert_close(got, clean, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


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
        assert_same(got[1:], clean[1:], "out")
        return
    clean = run_with_grads(fn, q, k, v, dout)
    got = run_with_grads(fn, bad["q"], bad["k"], bad["v"], dout)
    for name, g, c in zip(["out", "dq", "dk", "dv"], got, clean, strict=True):
        assert_same(g[1:], c[1:], f"{backend} {poison} in {where}[0, {token}]: {name} of rows 1..")


def check_invisible_poison(backend, where="k", poison="nan", b=2, s=16, hq=4, hkv=2, d=16, block_size=4, top_k=2,
                           first=9, causal=True, dtype=torch.float32):
    """Poison ``where`` (k or v) of row 0 from token ``first`` on (the right padding of a row, or
    keys after some queries): a query that cannot see a poisoned token keeps its output and dq,
    finite and equal (to rounding: the formulation may change) to a run with finite values there.

    Causal: the queries before ``first`` cannot see it (the gate runs, so every formulation of
    the backend is reached by the shapes). Non-causal: block indices chosen on clean inputs are
    given to both runs, and the queries whose selection misses every poisoned block are checked.
    """
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    dout = torch.randn(b, s, hq, d, generator=gen).to(dtype)
    idx = None if causal else moba.select_blocks(q, k, block_size, top_k, causal=False)

    def fn(q_, k_, v_):
        return moba.moba_attn_func(q_, k_, v_, block_size, top_k, causal=causal, backend=backend, block_indices=idx)

    runs = []
    for value in (POISONS[poison], 0.5):
        inputs = dict(q=q.clone(), k=k.clone(), v=v.clone())
        inputs[where][0, first:] = value
        runs.append(run_with_grads(fn, inputs["q"], inputs["k"], inputs["v"], dout))
    if causal:
        blind = torch.zeros(b, s, hq, dtype=torch.bool)
        blind[0, :first] = True
    else:  # (B, S, Hq): no selected block holds a poisoned token
        first_block = first // block_size
        blind = ((idx < first_block) & (idx >= 0) | (idx == -1)).all(dim=-1)
        blind[1:] = False
        assert blind[0].any() and not blind[0].all(), "test setup: some queries must see the poison, some not"
    for name, got, clean in zip(["out", "dq"], runs[0][:2], runs[1][:2], strict=True):
        g, c = got[blind], clean[blind]
        assert torch.isfinite(g).all(), f"{backend} {poison} in {where}[0, {first}:]: {name} of queries that cannot see it"
        torch.testing.assert_close(g, c, msg=lambda m, name=name: f"{backend} {poison} in {where}[0, {first}:]: {name}: {m}")


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
        assert_same(fn(*bad)[others], fn(q, k, v)[others], "out")
        return
    clean = run_with_grads(fn, q, k, v, dout)
    got = run_with_grads(fn, *bad, dout)
    for name, g, c in zip(["out", "dq", "dk", "dv"], got, clean, strict=True):
        assert_same(g[others], c[others], f"{backend} varlen {poison}: {name} of the other sequences")


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


def sdpa_dense(q, k, v):
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
    truth = run_with_grads(sdpa_dense, q, k, v, dout)
    fn = lambda q_, k_, v_: moba.moba_attn_func(q_, k_, v_, 4, s, backend=backend)  # noqa: E731
    got = run_with_grads(fn, q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype))
    for name, g, t in zip(["out", "dq", "dk", "dv"], got, truth, strict=True):
        assert torch.isfinite(t).all()
        assert torch.isfinite(g).all(), f"{backend}: {name} is not finite where SDPA's is"
        torch.testing.assert_close(g.double(), t, rtol=1e-3, atol=1e-3, msg=lambda m, name=name: f"{backend} {name}: {m}")


def check_float16_large_inputs(backend):
    """float16 q, k with entries ~30 (scores of several thousand): finite wherever SDPA (which
    computes in float32 on CPU) is finite."""
    b, s, h, d = 2, 13, 2, 16
    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    q, k = (30 * t.clamp(-1, 1) for t in (q, k))
    q[:, 0] = -k[:, 0]  # token 0 sees only itself: score -|k|^2 / 4, thousands below 0
    q, k, v = (t.half() for t in (q, k, v))
    dout = torch.randn(b, s, h, d).half()
    ref = run_with_grads(lambda *t: sdpa_dense(*(x.float() for x in t)).half(), q, k, v, dout)
    got = run_with_grads(lambda *t: moba.moba_attn_func(*t, 4, 2, backend=backend), q, k, v, dout)
    for name, g, r in zip(["out", "dq", "dk", "dv"], got, ref, strict=True):
        if torch.isfinite(r).all():
            assert torch.isfinite(g).all(), f"{backend}: {name} is not finite where SDPA's is"


# ---------------------------------------------------------------------------------------
# Scaling runs: a tiny text corpus, a tiny run config, its metrics, plot capture
# ---------------------------------------------------------------------------------------


def make_text_corpus(root, n_files=12, words=400, seed=0):
    import random

    rnd = random.Random(seed)
    vocab = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (root / f"f{i:02d}.txt").write_text(" ".join(rnd.choice(vocab) for _ in range(words)) + "\n")
    return root


def tiny_config(tmp_path: Path, out: str, **train):
    """A 2-layer hybrid ``RunConfig`` over a tiny text corpus in ``tmp_path`` (10 steps)."""
    from scaling_runs.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    corpus = tmp_path / "corpus"
    if not corpus.exists():
        make_text_corpus(corpus, n_files=10, words=600)
    t = dict(out_dir=str(tmp_path / out), batch_size=4, max_steps=10, lr=1e-2, warmup_steps=2, eval_every=3,
             eval_seqs=4, threads=1, progress=False, seed=7)
    t.update(train)
    return RunConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, context=48, block_size=8, top_k=2,
                          attention="hybrid", n_full_layers=1),
        data=DataConfig(data=str(corpus), val_fraction=0.2),
        train=TrainConfig(**t),
    )


def metrics(cfg) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(cfg) -> list[tuple]:
    return [(r["step"], r["tokens"], r["train_loss"], r["val_loss"], r["trailing_loss"]) for r in metrics(cfg)]


def capture_figures(monkeypatch) -> list[dict]:
    """Patch ``Figure.savefig`` to record, per saved figure, each axes' labels and the text of its
    visible tick labels (after a draw, as they appear in the PNG)."""
    from matplotlib.figure import Figure

    seen: list[dict] = []
    original = Figure.savefig

    def savefig(fig, *args, **kwargs):
        fig.canvas.draw()
        axes = []
        for ax in fig.axes:
            ticks = {}
            for which in ("x", "y"):
                lo, hi = sorted(getattr(ax, f"get_{which}lim")())
                axis = ax.xaxis if which == "x" else ax.yaxis
                for kind, got in ((which, axis.get_major_ticks()), (which + "_minor", axis.get_minor_ticks())):
                    ticks[kind] = [t.label1.get_text() for t in got
                                   if lo * (1 - 1e-9) <= t.get_loc() <= hi * (1 + 1e-9) and t.label1.get_text()]
            axes.append({"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "ticks": ticks, "ax": ax})
        seen.append({"path": str(args[0]) if args else "", "axes": axes})
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


# ---------------------------------------------------------------------------------------
# Documentation pages (tests/test_readme.py, tests/test_docs.py, tests/test_packaging.py)
# ---------------------------------------------------------------------------------------
# Marker: an HTML comment on the line(s) before a ```python block (invisible on GitHub)::
#
#     <!-- cpu-test -->
#     <!-- cpu-test setup=NAME: what the setup provides, for the reader -->
#
# Blocks without a setup run in order in one namespace per page, as a reader pasting them top
# to bottom would (a later block may use ``q``, ``k``, ``v`` from an earlier one). A block with
# ``setup=NAME`` runs in a fresh namespace filled by ``SETUPS[NAME]``: the names a real user
# brings (a model path, a tokenized prompt) replaced by tiny random stand-ins, so the block
# runs offline, on CPU, in seconds. The pages' own sizes are kept small for the same reason.

#: The front page and the docs/ pages that tests/test_readme.py and tests/test_docs.py run.
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!-- cpu-test(?: setup=(?P<setup>[\w-]+)(?::[^>]*)?)? -->$")


def doc_pages() -> list[Path]:
    """The README and every docs/ page, README first."""
    return [README, *sorted(DOCS.glob("*.md"))]


def marked_blocks(text: str, name: str = "README.md") -> list[tuple[int, str | None, str]]:
    """(line number, setup name or None, code) of every marked ```python block of one page."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not line.startswith("<!-- cpu-test"):
            continue
        m = MARKER.match(line.strip())
        if m is None:
            raise AssertionError(f"{name}:{i + 1}: malformed marker {line!r}")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or lines[j].strip() != "```python":
            raise AssertionError(f"{name}:{i + 1}: a cpu-test marker must precede a ```python block")
        end = lines.index("```", j + 1)
        blocks.append((j + 1, m.group("setup"), "\n".join(lines[j + 1 : end])))
    return blocks


def unmarked_python_blocks(text: str) -> list[int]:
    """Line numbers of ```python blocks with no cpu-test marker before them (they would never run)."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() != "```python":
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j < 0 or not lines[j].startswith("<!-- cpu-test"):
            found.append(i + 1)
    return found


def run_plain_blocks(blocks, name: str) -> dict:
    """Run a page's blocks without a setup, in order, in one namespace; return the namespace."""
    namespace: dict = {}
    torch.manual_seed(0)
    with torch.inference_mode(False):
        for line, setup, code in blocks:
            if setup is None:
                exec(compile(code, f"{name}:{line}", "exec"), namespace)  # noqa: S102
    return namespace


# --------------------------------------------------------------------------- setups
def _tiny_llama_config(layers: int = 4):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )


def _tiny_llama(tmp_path: Path) -> dict:
    """path: a tiny random Llama saved with save_pretrained; inputs: a tokenized prompt."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_llama_config())
    model.save_pretrained(tmp_path / "tiny-llama")
    ids = torch.randint(2, 96, (1, 20))
    return {"path": str(tmp_path / "tiny-llama"), "inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}


def _tiny_gpts(tmp_path: Path) -> dict:
    """target, draft: tiny random scaling_runs GPTs (MoBA) as ``GPTAdapter``s, what
    ``scaling_runs.checkpoint.load_gpt(run_dir)`` returns; input_ids (1, L); corpus: token lists."""
    from moba.generate import GPTAdapter
    from scaling_runs.config import ModelConfig
    from scaling_runs.model import GPT

    torch.manual_seed(0)
    small = dict(n_head=4, n_kv_head=2, n_embd=32, vocab_size=96, block_size=8, top_k=2, context=128)
    target = GPTAdapter(GPT(ModelConfig(n_layer=2, **small))).eval()
    draft = GPTAdapter(GPT(ModelConfig(n_layer=1, **small))).eval()
    corpus = [torch.randint(0, 96, (200,)).tolist() for _ in range(3)]
    return {"target": target, "draft": draft, "input_ids": torch.tensor([corpus[0][:24]]), "corpus": corpus}


SETUPS = {"tiny_llama": _tiny_llama, "tiny_gpts": _tiny_gpts}


# --------------------------------------------------------------------------- shell commands
def shell_commands(text: str) -> list[str]:
    """Every ``python ...`` / ``torchrun ...`` command of a page's ```bash blocks, with
    continuation lines joined and trailing comments removed."""
    commands, in_bash, pending = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        line = pending + line.split("  #")[0].strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith(("python ", "torchrun ")):
            commands.append(" ".join(line.split()))
    return commands


def entry_point(command: str) -> list[str]:
    """``python -m pkg.mod ...`` -> ["-m", "pkg.mod"]; ``python path.py ...`` -> ["path.py"]."""
    words = command.split()
    if words[0] == "torchrun":
        words = ["python"] + [w for w in words[1:] if not w.startswith("--nproc")]
    return words[1:3] if words[1] == "-m" else words[1:2]


def pyproject() -> dict:
    """pyproject.toml, parsed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())
