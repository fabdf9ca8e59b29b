"""FLOP and HBM-traffic model of attention kernels, shared by ``attn_speed.py`` and ``roofline.py``.

Conventions (the ones flash-attention's benchmarks use; the pair counts and FLOPs are
``moba._core.accounting``'s, re-exported here):

* A *pair* is one (query, key) pair that a query head actually attends to. Attention FLOPs
  count only attended pairs: forward = 2 matmuls (Q K^T and P V) of 2 FLOPs per
  multiply-add, so ``4 * head_dim`` FLOPs per pair; backward = 5 matmuls, 2.5x the forward;
  forward + backward = 3.5x. Softmax / exp / masking FLOPs are not counted.
* Pairs are summed over the batch and the *query* heads (GQA does not change FLOPs).
* Dense causal self-attention of length S has ``S (S + 1) / 2`` pairs per head.
* MoBA (docs/design.md section 1): a query at position t in block ``c = t // block_size`` attends
  to the keys ``<= t`` of its own block plus ``top_k - 1`` selected blocks (causal: complete
  blocks before ``c``; fewer when fewer exist).

Traffic model (bytes moved to/from HBM; L2 reuse is ignored, so intensities are lower
bounds of what a kernel with good L2 hit rates achieves). The kernels are modelled as
flash-attention-2 style tiled kernels with query tiles of ``tile_m`` rows and key tiles of
``tile_n`` tokens, one program per (batch, query head, query tile). A *tile pair* is one
(query tile, key tile) product a kernel computes; everything else follows from the count of
tile pairs, see ``attention_bytes``.
"""

from __future__ import annotations

import math

import torch

from moba._core.accounting import (  # noqa: F401  (re-exported: the bench tools import them from here)
    MODE_FLOP_FACTOR,
    MODES,
    attended_keys_from_indices,
    attention_flops,
    dense_pairs,
    moba_pairs,
    moba_query_keys,
)

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "fp16": 2, "bf16": 2, "fp32": 4}


def moba_pairs_from_indices(
    block_indices: torch.Tensor, block_size: int, causal: bool = True, offset: int = 0, seqlen: int | None = None
) -> int:
    """Exact attended pairs, summed over batch and heads, from ``moba.select_blocks`` output
    (``moba._core.accounting.attended_keys_from_indices``, summed). To bound memory, pass a
    slice of queries ``block_indices[:, offset : offset + n]`` with its ``offset`` and ``seqlen``."""
    return int(attended_keys_from_indices(block_indices, block_size, causal, offset, seqlen).sum().item())


def gate_flops(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, block_size: int) -> float:
    """FLOPs of the MoBA gate: block means (one add per key element) + q . mean for every block.

    Implementations score every block (the causal cut is a mask), so ``2 * D`` FLOPs per
    (query, head, block); the top-k itself is not counted.
    """
    n_blocks = -(-seqlen // block_size)
    return float(batch * (seqlen * kv_heads * head_dim + 2 * seqlen * heads * n_blocks * head_dim))


def gate_bytes(
    batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, block_size: int, top_k: int, elem_bytes: int
) -> float:
    """HBM bytes of the gate: read K once (means), write/read the float32 means, read Q once,
    write the int32 block indices (``min(top_k, n_blocks)`` per query and head)."""
    n_blocks = -(-seqlen // block_size)
    k_read = seqlen * kv_heads * head_dim * elem_bytes
    means = 2 * n_blocks * kv_heads * head_dim * 4
    q_read = seqlen * heads * head_dim * elem_bytes
    out = seqlen * heads * min(top_k, n_blocks) * 4
    return float(batch * (k_read + means + q_read + out))


# ----------------------------------------------------------------------------- tile pairs
def dense_tile_pairs(seqlen: int, causal: bool = True, tile_m: int = 128, tile_n: int = 128) -> int:
    """(query tile, key tile) products per head of a tiled dense kernel.

    Causal: query tile i (rows ``[i M, min(S, (i+1) M))``) visits key tiles up to its last row.
    """
    n_q = -(-seqlen // tile_m)
    n_k = -(-seqlen // tile_n)
    if not causal:
        return n_q * n_k
    return sum(-(-min(seqlen, (i + 1) * tile_m) // tile_n) for i in range(n_q))


def moba_tile_pairs(
    seqlen: int, block_size: int, top_k: int, causal: bool = True, tile_m: int = 128, tile_n: int = 128
) -> int:
    """(query tile, key tile) products per head of a tiled MoBA kernel.

    Assumption: the queries of one tile share their selection (tiles of ``tile_m`` adjacent
    queries mostly pick the same blocks; this is the *lower* bound of traffic). A query tile
    in own block c visits the key tiles of its own block up to its last row (causal) or the
    whole own block (non-causal), plus ``ceil(block_size / tile_n)`` key tiles for each of
    the ``min(top_k - 1, candidates)`` other selected blocks.
    """
    n_q = -(-seqlen // tile_m)
    n_blocks = -(-seqlen // block_size)
    per_block = -(-block_size // tile_n)
    total = 0
    for i in range(n_q):
        first, last = i * tile_m, min(seqlen, (i + 1) * tile_m) - 1
        c = first // block_size
        c_last = last // block_size  # a tile may straddle two blocks when tile_m does not divide bs
        own_start = c * block_size
        own_end = last + 1 if causal else min(seqlen, (c_last + 1) * block_size)
        own_tiles = -(-(own_end - own_start) // tile_n)
        candidates = c if causal else n_blocks - 1
        total += own_tiles + min(top_k - 1, candidates) * per_block
    return total


def attention_bytes(
    batch: int,
    seqlen: int,
    heads: int,
    head_dim: int,
    elem_bytes: int,
    tile_pairs: int,
    mode: str = "fwd",
    tile_m: int = 128,
    tile_n: int = 128,
) -> float:
    """HBM bytes of a flash-attention-2 style kernel, given its tile pairs per head.

    Per (batch, query head), with S tokens, D = head_dim, e = element bytes:

    forward
        read Q once and write O once: ``2 S D e``; write the float32 LSE: ``4 S``;
        every tile pair loads one K tile and one V tile: ``2 N D e`` (N = tile_n).
    backward (outer loop over key tiles, as in FA2)
        preprocess: read O and dO, write delta: ``2 S D e + 4 S``;
        read K, V once and write dK, dV once: ``4 S D e`` (counted per query head: GQA
        group reductions are not modelled);
        every tile pair loads a Q tile and a dO tile (``2 M D e``), the LSE and delta of its
        rows (``8 M``), and accumulates dQ in float32 with a read-modify-write (``8 M D``).
    fwd+bwd
        the sum.
    """
    s, d, e = seqlen, head_dim, elem_bytes
    fwd = 2 * s * d * e + 4 * s + tile_pairs * 2 * tile_n * d * e
    bwd = 2 * s * d * e + 4 * s + 4 * s * d * e + tile_pairs * (2 * tile_m * d * e + 8 * tile_m + 8 * tile_m * d)
    per_head = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    return float(batch * heads * per_head)


def dense_bytes(batch, seqlen, heads, head_dim, elem_bytes, causal=True, mode="fwd", tile_m=128, tile_n=128):
    """HBM bytes of tiled dense attention (``attention_bytes`` with ``dense_tile_pairs``)."""
    pairs = dense_tile_pairs(seqlen, causal, tile_m, tile_n)
    return attention_bytes(batch, seqlen, heads, head_dim, elem_bytes, pairs, mode, tile_m, tile_n)


def moba_bytes(
    batch, seqlen, heads, head_dim, elem_bytes, block_size, top_k, causal=True, mode="fwd", tile_m=128, tile_n=128
):
    """HBM bytes of a tiled MoBA kernel (``attention_bytes`` with ``moba_tile_pairs``; gate excluded)."""
    pairs = moba_tile_pairs(seqlen, block_size, top_k, causal, tile_m, tile_n)
    return attention_bytes(batch, seqlen, heads, head_dim, elem_bytes, pairs, mode, tile_m, tile_n)


# ----------------------------------------------------------------------------- decoding
def decode_flops_bytes(
    context: int,
    n_query: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    elem_bytes: int,
    block_size: int | None = None,
    top_k: int | None = None,
    batch: int = 1,
) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one attention decode step with ``n_query`` new tokens.

    ``n_query = 1`` is plain decoding; ``n_query > 1`` is the verification step of speculative
    decoding (the draft tokens are scored in one pass). The KV cache holds ``context`` tokens,
    the new ones included; the new queries sit at positions ``context - n_query ... context - 1``
    and attend causally.

    Dense (``block_size is None``): a flash-decoding kernel reads the K/V cache once per KV
    head (GQA groups share it): ``2 L Hkv D e``, plus Q and O: ``2 n_query Hq D e``.

    MoBA: the gate reads the cached block means (``n_blocks Hkv D`` float32, 4 bytes); the
    attention reads, per KV head, the K/V of the union of the blocks its query heads selected,
    once for all draft tokens. Assumptions: (a) the adjacent draft tokens of one head select
    the same blocks; (b) the ``g = Hq / Hkv`` heads of a GQA group pick disjoint past blocks
    (the pessimistic union: ``min(complete past blocks, g (top_k - 1))`` blocks) and share
    the loads; plus the own block up to the last query. Q and O as for dense. Gate FLOPs
    (``2 D`` per query, head and block) are included.
    """
    L, d, e = context, head_dim, elem_bytes
    positions = range(L - n_query, L)
    qo = 2 * n_query * heads * d * e
    if block_size is None:
        pairs = sum(t + 1 for t in positions)
        return 4.0 * d * pairs * heads * batch, float(batch * (2 * L * kv_heads * d * e + qo))
    assert top_k is not None, "MoBA decoding needs top_k"
    pairs = sum(moba_query_keys(t, L, block_size, top_k, True) for t in positions)
    n_blocks = -(-L // block_size)
    last = L - 1
    first_c = (L - n_query) // block_size
    # K/V tokens one KV head loads: the union of its group's selected past blocks + the own block(s).
    own_tokens = last + 1 - first_c * block_size
    group = heads // kv_heads
    loaded = own_tokens + min(group * (top_k - 1), first_c) * block_size  # per KV head
    flops = 4.0 * d * pairs * heads + 2.0 * d * n_query * heads * n_blocks
    bytes_ = 2 * loaded * kv_heads * d * e + n_blocks * kv_heads * d * 4 + qo
    return flops * batch, float(batch * bytes_)


def intensity(flops: float, bytes_: float) -> float:
    """Arithmetic intensity, FLOP per byte."""
    return flops / bytes_ if bytes_ > 0 else math.inf
