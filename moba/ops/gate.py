"""The MoBA gate: which key blocks each query attends to (docs/design.md section 1, steps 1-5).

The result is a block-index tensor: for every query and query head, the *local* indices
(block ``j`` of the query's own sequence) of its selected blocks, sorted ascending, with
unused slots at the end filled with ``PAD_INDEX`` (-1). The own block is always present.
Its last dimension is ``min(top_k, n_blocks)`` where ``n_blocks`` is the block count of the
longest key sequence.

Every attention backend accepts such a tensor through ``block_indices=``, so tests can
feed the same selection to two backends.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .._core.checks import PAD_INDEX, check_bool, check_cu_seqlens, check_positive_int, check_qkv
from .._core.layout import BlockLayout, build_layout, fixed_cu_seqlens, gate_width

# Upper bound on the elements of one chunk of gate scores (float32), to bound memory.
_GATE_CHUNK_ELEMENTS = 1 << 21


def block_means(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean key of every block, float32.

    k: (Tk, Hkv, D) packed keys. Returns (G, Hkv, D), G = total number of blocks.
    A tail block is averaged over the tokens it has.
    """
    index, valid = layout.block_token_index()  # (G, bs)
    # where(), not a product: a NaN/inf at the token padding slots point to must not leak in.
    sums = torch.where(valid[:, :, None, None], k[index].float(), 0.0).sum(dim=1)  # (G, Hkv, D)
    return sums / layout.block_len.clamp(min=1)[:, None, None].to(sums.dtype)


def pad_block_means(means: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """(G, Hkv, D) -> (N, max_blocks_per_seq, Hkv, D), zero-padded per sequence."""
    n_seq = layout.seq_n_blocks.numel()
    nb_max = layout.max_blocks_per_seq
    out = means.new_zeros(n_seq, nb_max, *means.shape[1:])
    block_seq = torch.repeat_interleave(torch.arange(n_seq, device=means.device), layout.seq_n_blocks)
    local = torch.arange(means.shape[0], device=means.device) - layout.block_offset[block_seq]
    out[block_seq, local] = means
    return out


def select_from_means(
    q: torch.Tensor,
    padded_means: torch.Tensor,
    layout: BlockLayout,
    top_k: int,
    causal: bool,
) -> torch.Tensor:
    """Gate of packed queries against given per-sequence block means.

    q: (Tq, Hq, D); padded_means: (N, nb_max, Hkv, D) float32 (``pad_block_means``).
    Returns (Tq, Hq, min(top_k, nb_max)) int32 local block indices, ascending, PAD_INDEX-padded.
    """
    tq, hq, _ = q.shape
    n_seq, nb_max, hkv, _ = padded_means.shape
    width = gate_width(nb_max, top_k)
    result = torch.full((tq, hq, width), PAD_INDEX, dtype=torch.int32, device=q.device)
    if tq == 0:
        return result
    own = layout.q_pos // layout.block_size  # (Tq,)
    result[..., 0] = own[:, None].to(torch.int32)
    n_candidates = min(top_k - 1, nb_max)
    if n_candidates == 0:
        return result

    # Queries of each sequence padded to (N, Lq_max): scores become one batched matmul per
    # (sequence, KV head) against that sequence's block means.
    cu_q = torch.tensor(layout.cu_q, device=q.device)
    index_in_seq = torch.arange(tq, device=q.device) - cu_q[layout.q_seq]
    lq_max = int(index_in_seq.max()) + 1
    blocks = torch.arange(nb_max, device=q.device)
    means_t = rearrange(padded_means, "n b h d -> n h d b")
    group = hq // hkv
    chunk = max(1, min(lq_max, _GATE_CHUNK_ELEMENTS // max(1, n_seq * hq * nb_max)))
    for start in range(0, lq_max, chunk):
        take = (index_in_seq >= start) & (index_in_seq < start + chunk)
        tok = take.nonzero().squeeze(1)
        q_pad = q.new_zeros(n_seq, chunk, hq, q.shape[-1], dtype=torch.float32)
        q_pad[layout.q_seq[tok], index_in_seq[tok] - start] = q[tok].float()
        q_pad = rearrange(q_pad, "n s (h g) d -> n h (s g) d", g=group)
        scores = torch.matmul(q_pad, means_t)  # float32 (docs/design.md step 3): (N, Hkv, s * g, nb)
        scores = rearrange(scores, "n h (s g) b -> n s (h g) b", g=group)[layout.q_seq[tok], index_in_seq[tok] - start]
        own_c = own[tok][:, None, None]  # (t, 1, 1)
        if causal:  # complete blocks strictly before the own block
            candidate = blocks < own_c
        else:  # every other block of the sequence
            candidate = (blocks != own_c) & (blocks < layout.seq_n_blocks[layout.q_seq[tok]][:, None, None])
        scores = scores.masked_fill(~candidate, float("-inf"))
        top = scores.topk(n_candidates, dim=-1).indices  # (t, Hq, n_candidates)
        top = top.masked_fill(~candidate.expand_as(scores).gather(-1, top), PAD_INDEX)
        chosen = torch.cat([top, own_c.expand(-1, hq, 1)], dim=-1)
        # Ascending valid indices, PAD_INDEX last.
        big = nb_max + 1
        chosen = torch.where(chosen == PAD_INDEX, big, chosen).sort(dim=-1).values[..., :width]
        result[tok] = torch.where(chosen == big, PAD_INDEX, chosen).to(torch.int32)
    return result


def select_packed(q, k, layout: BlockLayout, top_k: int, causal: bool) -> torch.Tensor:
    """Gate for packed q (Tq, Hq, D) and k (Tk, Hkv, D); see ``select_from_means``."""
    means = pad_block_means(block_means(k, layout), layout)
    return select_from_means(q, means, layout, top_k, causal)


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, causal: bool = True
) -> torch.Tensor:
    """Blocks selected by the MoBA gate for every query of a fixed-length batch.

    Args:
        q: (B, S, Hq, D) queries.
        k: (B, S, Hkv, D) keys, ``Hq % Hkv == 0``.
        block_size: tokens per key block (>= 1).
        top_k: blocks per query, the own block included (>= 1).
        causal: causal gate (candidates are complete past blocks) or not (all other blocks).

    Returns:
        (B, S, Hq, min(top_k, n_blocks)) int32 local block indices, ascending; unused slots
        hold ``moba.PAD_INDEX`` (-1). ``n_blocks = ceil(S / block_size)``.

    Example:
        >>> idx = select_blocks(q, k, block_size=64, top_k=3)   # idx[b, t, h] -> up to 3 blocks
    """
    check_qkv(q, k, k, varlen=False)
    block_size = check_positive_int("block_size", block_size)
    top_k = check_positive_int("top_k", top_k)
    check_bool("causal", causal)
    b, s = q.shape[:2]
    cu = fixed_cu_seqlens(b, s, "cpu").tolist()
    layout = build_layout(cu, cu, block_size, q.device)
    idx = select_packed(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]), layout, top_k, causal)
    return idx.reshape(b, s, *idx.shape[1:])


def select_blocks_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    block_size: int,
    top_k: int,
    causal: bool = True,
) -> torch.Tensor:
    """Blocks selected by the MoBA gate for packed sequences.

    Args:
        q: (T, Hq, D), k: (T, Hkv, D) packed tokens.
        cu_seqlens: (N + 1,) int32 sequence boundaries; max_seqlen: longest sequence.
        block_size, top_k, causal: as in ``select_blocks``.

    Returns:
        (T, Hq, min(top_k, n_blocks)) int32 block indices local to each sequence (block 0 is
        the first block of the query's own sequence), ascending, ``PAD_INDEX``-padded.
    """
    check_qkv(q, k, k, varlen=True)
    block_size = check_positive_int("block_size", block_size)
    top_k = check_positive_int("top_k", top_k)
    check_bool("causal", causal)
    cu = check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    layout = build_layout(cu, cu, block_size, q.device)
    return select_packed(q, k, layout, top_k, causal)


def check_index_values(block_indices: torch.Tensor, layout: BlockLayout, causal: bool) -> torch.Tensor:
    """Validate user-given block indices against the layout; returns them as int64.

    block_indices: (Tq, Hq, n_slots). Every slot is PAD_INDEX or a block of the query's own
    sequence; in causal mode no block after the query's own block; no duplicates in a row;
    at least one valid slot per query.
    """
    idx = block_indices.long()
    if idx.numel() == 0:
        return idx
    n_blocks = layout.seq_n_blocks[layout.q_seq][:, None, None]
    valid = idx != PAD_INDEX
    if bool(((idx < PAD_INDEX) | (valid & (idx >= n_blocks))).any()):
        raise ValueError("block_indices holds a value outside [-1, number of blocks of the query's sequence)")
    if causal:
        own = (layout.q_pos // layout.block_size)[:, None, None]
        if bool((valid & (idx > own)).any()):
            raise ValueError("block_indices selects a future block (after the query's own block) with causal=True")
    if bool((~valid).all(dim=-1).any()):
        raise ValueError("block_indices has a query with no selected block (every slot is PAD_INDEX)")
    ordered = torch.where(valid, idx, -2 - torch.arange(idx.shape[-1], device=idx.device)).sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("block_indices selects the same block twice for one query")
    return idx
