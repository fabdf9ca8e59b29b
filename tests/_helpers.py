"""Shared test helpers: the tolerance rule, random inputs, independent dense attention, a
brute-force gate.

Everything here is written independently of the library's internals (no import of
``moba.ops.gate`` / ``moba.ops.torch_impl``), so a test that compares a backend with one of these
helpers compares two separate implementations. Other test files may import from here; keep
the functions general and documented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import moba

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
