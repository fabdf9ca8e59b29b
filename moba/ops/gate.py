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

from .._core.checks import PAD_INDEX, bind_varlen_args, check_cu_seqlens, check_qkv
from .._core.layout import BlockLayout, build_layout, gate_width

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


def _bhsd_hint(q, k) -> str:
    """A hint when q, k look like the (batch, heads, seqlen, head_dim) layout: their shapes fail the
    (batch, seqlen, heads, head_dim) checks but would pass with dims 1 and 2 swapped."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == k.dim() == 4):
        return ""
    (b, hq, sq, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if b == bk and d == dk and 0 < hkv and hq % hkv == 0 and sq <= sk:
        return (f"; q {tuple(q.shape)} and k {tuple(k.shape)} look like the (batch, heads, seqlen, head_dim) layout: "
                "MoBA takes flash-attn's (batch, seqlen, heads, head_dim), e.g. q.transpose(1, 2)")
    return ""


def _gate_settings(fn: str, config, block_size, top_k, causal, moba_chunk_size, moba_topk):
    from ..config import resolve_config  # lazy: moba.config imports the backend registry

    if config is None:
        if block_size is None and moba_chunk_size is None:
            raise TypeError(f"{fn}() needs block_size (or config=moba.MoBAConfig(...))")
        if top_k is None and moba_topk is None:
            raise TypeError(f"{fn}() needs top_k (or config=moba.MoBAConfig(...))")
    return resolve_config(config, block_size=block_size, top_k=top_k, causal=causal,
                          moba_chunk_size=moba_chunk_size, moba_topk=moba_topk)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int | None = None,
    top_k: int | None = None,
    causal: bool | None = None,
    *,
    config=None,
    moba_chunk_size: int | None = None,
    moba_topk: int | None = None,
) -> torch.Tensor:
    """Blocks selected by the MoBA gate for every query of a fixed-length batch.

    Takes the arguments of ``moba_attn_func`` (without v): the result is what that function
    selects, and can be passed back to it as ``block_indices=``.

    Args:
        q: (B, Sq, Hq, D) queries.
        k: (B, Sk, Hkv, D) keys, ``Hq % Hkv == 0``, ``Sq <= Sk``: with fewer queries they are
            the last ``Sq`` key positions (bottom-right aligned, as in ``moba_attn_func``).
        block_size: tokens per key block (>= 1).
        top_k: blocks per query, the own block included (>= 1).
        causal: causal gate (candidates are complete past blocks) or not (all other blocks);
            default True.
        config: a ``moba.MoBAConfig`` instead of (or agreeing with) the settings above.
        moba_chunk_size, moba_topk: the official MoBA package's names for block_size, top_k.

    Returns:
        (B, Sq, Hq, min(top_k, n_blocks)) int32 local block indices, ascending; unused slots
        hold ``moba.PAD_INDEX`` (-1). ``n_blocks = ceil(Sk / block_size)``.

    q and k in the (batch, heads, seqlen, head_dim) layout are refused with an error that says so
    when their shapes tell (different head counts); with equal head counts and lengths the two
    layouts have the same shapes, and only the caller knows which one it holds.

    Example:
        >>> idx = select_blocks(q, k, block_size=64, top_k=3)   # idx[b, t, h] -> up to 3 blocks
        >>> out = moba_attn_func(q, k, v, 64, block_indices=idx)
    """
    cfg = _gate_settings("select_blocks", config, block_size, top_k, causal, moba_chunk_size, moba_topk)
    try:
        check_qkv(q, k, k, varlen=False, same_length=False)
    except ValueError as err:
        hint = _bhsd_hint(q, k)
        if hint:
            raise ValueError(f"{err}{hint}") from None
        raise
    b, sq = q.shape[:2]
    sk = k.shape[1]
    cu_q, cu_k = [i * sq for i in range(b + 1)], [i * sk for i in range(b + 1)]
    layout = build_layout(cu_q, cu_k, cfg.block_size, q.device)
    idx = select_packed(q.reshape(b * sq, *q.shape[2:]), k.reshape(b * sk, *k.shape[2:]), layout, cfg.top_k,
                        cfg.causal)
    return idx.reshape(b, sq, *idx.shape[1:])


# Positional parameters after (q, k, cu_seqlens_q): flash-attn's order, or the self-attention
# order (one cu_seqlens, one max_seqlen), told apart by the type of the first one (as
# ``moba_attn_varlen_func``).
_FLASH_ORDER = ("cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "block_size", "top_k", "causal")
_SELF_ORDER = ("max_seqlen", "block_size", "top_k", "causal")


def select_blocks_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *args,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    block_size: int | None = None,
    top_k: int | None = None,
    causal: bool | None = None,
    config=None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    moba_chunk_size: int | None = None,
    moba_topk: int | None = None,
) -> torch.Tensor:
    """Blocks selected by the MoBA gate for packed sequences, with ``moba_attn_varlen_func``'s
    argument forms (without v):

    * flash-attn's: ``select_blocks_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, block_size, top_k, causal=True)``;
    * self-attention: ``select_blocks_varlen(q, k, cu_seqlens, max_seqlen, block_size, top_k,
      causal=True)``; every argument also by keyword, settings also from ``config=``.

    Args:
        q: (Tq, Hq, D), k: (Tk, Hkv, D) packed tokens; per sequence ``Lq <= Lk``, the queries
            being the last ``Lq`` key positions.
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32 boundaries; max_seqlen_q / max_seqlen_k:
            longest sequence (``cu_seqlens`` / ``max_seqlen`` set both).
        block_size, top_k, causal, config, moba_chunk_size, moba_topk: as in ``select_blocks``.

    Returns:
        (Tq, Hq, min(top_k, n_blocks)) int32 block indices local to each sequence (block 0 is
        the first block of the query's own sequence), ascending, ``PAD_INDEX``-padded.
    """
    named = dict(cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                 block_size=block_size, top_k=top_k, causal=causal, max_seqlen=max_seqlen)
    cu_q_t, cu_k_t, max_q, max_k, two = bind_varlen_args(
        "select_blocks_varlen", args, named, cu_seqlens_q, cu_seqlens, _FLASH_ORDER, _SELF_ORDER, n_leading=3)
    cfg = _gate_settings("select_blocks_varlen", config, named["block_size"], named["top_k"], named["causal"],
                         moba_chunk_size, moba_topk)
    check_qkv(q, k, k, varlen=True, same_length=not two)
    names = ("cu_seqlens_q", "cu_seqlens_k") if two else ("cu_seqlens", "cu_seqlens")
    cu_q = check_cu_seqlens(cu_q_t, max_q, q.shape[0], names[0])
    cu_k = check_cu_seqlens(cu_k_t, max_k, k.shape[0], names[1])
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {len(cu_q) - 1} and {len(cu_k) - 1}")
    layout = build_layout(cu_q, cu_k, cfg.block_size, q.device)
    return select_packed(q, k, layout, cfg.top_k, cfg.causal)


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
