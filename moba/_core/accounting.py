"""Attended (query, key) pairs and attention FLOPs: the one count ``bench/`` and
``scaling_runs/`` use.

A *pair* is one (query, key) pair a query head attends to (docs/design.md section 1):

* dense causal self-attention over S tokens: query t attends keys ``0..t``, so
  ``S (S + 1) / 2`` pairs per head;
* MoBA: the query at position t in block ``c = t // block_size`` attends the keys ``<= t`` of
  its own block plus ``top_k - 1`` selected blocks (causal: complete blocks before ``c``;
  fewer when fewer exist), so ``keys(t) = (t - c * block_size + 1) + min(top_k - 1, c) * block_size``.
  The gate scores the ``c`` complete past blocks (its *candidates*).

FLOPs count only attended pairs: forward = ``Q K^T`` and ``P V``, ``4 * head_dim`` FLOPs per
pair; backward = 2.5x the forward (5 matmuls; flash-attention's benchmark convention);
softmax, exp and masking are not counted. (``scaling_runs.flops`` counts training as 3x the
forward, the Kaplan convention its ``6 N D`` uses: it calls the pair counts here.)
"""

from __future__ import annotations

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
#: FLOPs of a mode relative to the forward.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def dense_pairs(seqlen: int, causal: bool = True) -> int:
    """Attended (query, key) pairs of one head of dense self-attention over ``seqlen`` tokens."""
    return seqlen * (seqlen + 1) // 2 if causal else seqlen * seqlen


def moba_query_keys(t: int, seqlen: int, block_size: int, top_k: int, causal: bool = True) -> int:
    """Keys attended by the query at position ``t`` (analytic; exact when causal)."""
    c = t // block_size
    n_blocks = -(-seqlen // block_size)
    if causal:
        return (t - c * block_size + 1) + min(top_k - 1, c) * block_size
    if top_k >= n_blocks:
        return seqlen
    own = min(seqlen, (c + 1) * block_size) - c * block_size
    # Non-causal: assumes the other selected blocks are complete (exact unless the tail is chosen).
    return own + min(top_k - 1, n_blocks - 1) * block_size


def moba_pairs(seqlen: int, block_size: int, top_k: int, causal: bool = True) -> int:
    """Attended pairs of one head of MoBA self-attention, from the structure alone.

    Exact for ``causal=True`` (candidates are complete past blocks, so only their number
    matters). Non-causal: exact when ``seqlen % block_size == 0`` or ``top_k >= n_blocks``;
    otherwise it assumes the selected non-own blocks are complete.
    Example: seqlen 8, block 4, top_k 1, causal -> 1+2+3+4 + 1+2+3+4 = 20.
    """
    if causal:
        total = 0
        for c in range(-(-seqlen // block_size)):
            n = min(seqlen, (c + 1) * block_size) - c * block_size
            total += n * (n + 1) // 2 + n * min(top_k - 1, c) * block_size
        return total
    return sum(moba_query_keys(t, seqlen, block_size, top_k, causal) for t in range(seqlen))


def gate_candidates(seqlen: int, block_size: int) -> int:
    """Sum over the queries of one causal sequence of the complete past blocks the gate scores."""
    return sum(c * (min(seqlen, (c + 1) * block_size) - c * block_size) for c in range(-(-seqlen // block_size)))


def attended_keys_from_indices(
    block_indices: torch.Tensor, block_size: int, causal: bool = True, offset: int = 0, seqlen: int | None = None
) -> torch.Tensor:
    """Keys each query head attends to, (B, n, Hq) int64, from ``moba.select_blocks`` output.

    block_indices: (B, n, Hq, n_slots) local block indices of the queries at positions
    ``offset .. offset + n - 1``, ``PAD_INDEX`` (-1) for unused slots; ``seqlen`` (default
    ``offset + n``) bounds the last block. A selected block j contributes its tokens
    ``[j * bs, min(S, (j + 1) * bs))``; causally only those at positions ``<= t``.
    """
    b, n, h, _ = block_indices.shape
    s = (offset + n) if seqlen is None else seqlen
    idx = block_indices.long()
    start = idx.clamp(min=0) * block_size
    end = torch.clamp(start + block_size, max=s)
    if causal:
        t = torch.arange(offset, offset + n, device=idx.device).view(1, n, 1, 1)
        end = torch.minimum(end, t + 1)
    return torch.where(idx >= 0, (end - start).clamp(min=0), 0).sum(-1)


def attention_flops(pairs: int | float, head_dim: int, mode: str = "fwd") -> float:
    """FLOPs of attention over ``pairs`` attended pairs (all heads) for a mode (``MODES``)."""
    return 4.0 * head_dim * pairs * MODE_FLOP_FACTOR[mode]
