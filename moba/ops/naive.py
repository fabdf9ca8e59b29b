"""Dense-mask MoBA reference: obviously right, O(S^2) memory, for tests and small sizes.

It builds, per sequence, the full (Hq, Sq, Sk) mask "key block is selected for this query
(and, causal, key position <= query position)" and runs a masked softmax. A non-finite key or
value that a query cannot see never reaches it (``_masked_softmax_attention``). It computes in
the input dtype (so a float16 run of the reference measures float16 error, as the
tolerance rule in docs/design.md needs), or in float32/float64 with ``upcast=True``.
"""

from __future__ import annotations

import torch

from .._core.checks import PAD_INDEX
from .._core.layout import BlockLayout


def selection_mask(block_indices: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(..., n_slots) block indices -> (..., n_blocks) boolean membership mask."""
    mask = torch.zeros(*block_indices.shape[:-1], n_blocks + 1, dtype=torch.bool, device=block_indices.device)
    # PAD_INDEX goes to the extra last column, dropped below.
    mask.scatter_(-1, torch.where(block_indices == PAD_INDEX, n_blocks, block_indices.long()), True)
    return mask[..., :n_blocks]


def _scores(qs, ks, scale):
    """Scaled scores (Hq, Sq, Sk) in the inputs' dtype.

    Low precision rounds the scores to the input dtype (the error the tolerance rule measures),
    but a score beyond its range is kept in float32, as every kernel keeps its scores: finite
    inputs never give inf - inf = NaN here.
    """
    scores = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    if qs.dtype in (torch.float16, torch.bfloat16):
        wide = torch.matmul(qs.float(), ks.float().transpose(-1, -2)) * scale
        scores = torch.where(torch.isfinite(scores) | ~torch.isfinite(wide), scores.float(), wide)
    return scores


def _attend(qs, ks, vs, allowed, scale):
    """Masked softmax attention (Hq, Sq, D) x (Hq, Sk, D): (masked scores, output)."""
    scores = _scores(qs, ks, scale).masked_fill(~allowed, float("-inf"))
    return scores, torch.matmul(torch.softmax(scores, dim=-1).to(vs.dtype), vs)


def _masked_softmax_attention(qs, ks, vs, allowed, scale):
    """``_attend``, where a key or value a query cannot see never reaches it even when it is not
    finite (a matmul multiplies the masked probability 0 by it, and ``0 * NaN`` is NaN).

    Rows that see no non-finite key or value are computed by ``_attend`` on inputs whose
    non-finite entries are replaced by 0 (bitwise what they give without them: those keys are
    masked for these rows); rows that see one compute every (query, key) pair on its own, masked
    pairs replaced by 0 before any product (O(Hq * Sq * Sk * D) memory, only then).
    """
    k_ok, v_ok = torch.isfinite(ks), torch.isfinite(vs)
    bad = ~(k_ok.all(dim=-1) & v_ok.all(dim=-1))  # (Hq, Sk)
    if not bool(bad.any()):
        return _attend(qs, ks, vs, allowed, scale)
    scores, out = _attend(qs, torch.where(k_ok, ks, 0.0), torch.where(v_ok, vs, 0.0), allowed, scale)
    sees = (allowed & bad[:, None, :]).any(dim=-1)  # (Hq, Sq)
    pair = allowed[..., None]  # (Hq, Sq, Sk, 1)
    exact = (torch.where(pair, qs[:, :, None], 0.0) * torch.where(pair, ks[:, None], 0.0)).sum(-1) * scale
    exact = exact.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(exact, dim=-1)
    exact_out = (torch.where(pair, probs[..., None], 0.0) * torch.where(pair, vs[:, None], 0.0)).sum(-2)
    return torch.where(sees[..., None], exact.to(scores.dtype), scores), torch.where(sees[..., None], exact_out, out)


def reference_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    block_indices: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    upcast: bool = False,
    return_lse: bool = False,
):
    """MoBA attention of packed q (Tq, Hq, D) over k, v (Tk, Hkv, D) with given block indices.

    block_indices: (Tq, Hq, n_slots) local block indices, PAD_INDEX-padded.
    Returns (Tq, Hq, D) in q's dtype; with ``return_lse`` also the log-sum-exp (Tq, Hq) of the
    scaled scores over the attended keys (float32; float64 for float64 inputs).
    """
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = q.new_zeros(q.shape[:2], dtype=lse_dtype)
    if q.shape[0] == 0:
        return (q.clone(), lse) if return_lse else q.clone()  # clone keeps the autograd graph
    compute_dtype = torch.float64 if q.dtype == torch.float64 else (torch.float32 if upcast else q.dtype)
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    bs = layout.block_size
    for n in range(len(layout.cu_q) - 1):
        q0, q1 = layout.cu_q[n], layout.cu_q[n + 1]
        k0, k1 = layout.cu_k[n], layout.cu_k[n + 1]
        if q1 == q0:
            continue
        qs = q[q0:q1].to(compute_dtype).transpose(0, 1)  # (Hq, Sq, D)
        ks = k[k0:k1].to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, Sk, D)
        vs = v[k0:k1].to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        n_blocks = (k1 - k0 + bs - 1) // bs
        selected = selection_mask(block_indices[q0:q1], n_blocks).transpose(0, 1)  # (Hq, Sq, nb)
        key_block = torch.arange(k1 - k0, device=q.device) // bs
        allowed = selected[:, :, key_block]  # (Hq, Sq, Sk)
        if causal:
            q_pos = layout.q_pos[q0:q1]
            allowed = allowed & (torch.arange(k1 - k0, device=q.device)[None, :] <= q_pos[:, None])[None]
        scores, o = _masked_softmax_attention(qs, ks, vs, allowed, softmax_scale)
        if return_lse:
            lse[q0:q1] = torch.logsumexp(scores.detach().to(lse_dtype), dim=-1).transpose(0, 1)
        out[q0:q1] = o.transpose(0, 1).to(q.dtype)
    return (out, lse) if return_lse else out
