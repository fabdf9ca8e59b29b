"""MoBA as a FlexAttention ``BlockMask`` (``torch.nn.attention.flex_attention``).

    from torch.nn.attention.flex_attention import flex_attention
    mask = moba.flex_block_mask(q, k, block_size=512, top_k=3)      # q, k: (B, H, S, D)
    out = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)  # = moba_attn_func's output

How the mask is built, without any (S, S) tensor:

* the MoBA gate (the same one ``moba_attn_func`` runs) gives, per (batch, query, query head),
  the selected key blocks;
* the block structure is (query tile of ``q_block`` rows) x (MoBA key block): a pair is
  *full* when every query of the tile selected the block and no causal cut falls inside it,
  *partial* when some queries did (FlexAttention then calls ``mask_mod`` per element), and
  skipped otherwise;
* ``mask_mod`` decides a partial pair exactly from a per-query bitset of selected blocks,
  ``(B, Hq, Sq, ceil(n_blocks / 32))`` int32, plus the causal rule.

Memory is O(B * Hq * (Sq * n_blocks / 32 + n_q_tiles * n_blocks)). On CPU FlexAttention runs
forward only, in eager mode (it materialises scores per call: a correctness path). On GPU,
compile ``flex_attention``; its kernels want ``block_size`` and ``q_block`` to be multiples
of their tile sizes (128 by default).
"""

from __future__ import annotations

import torch

from .._core.checks import PAD_INDEX, check_block_indices, check_positive_int, check_qkv
from .._core.layout import build_layout
from ..config import MoBAConfig
from .api import _settings
from .gate import check_index_values
from .registry import resolve_backend


def flex_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int | None = None,
    top_k: int | None = None,
    causal: bool | None = None,
    *,
    config: MoBAConfig | None = None,
    block_indices: torch.Tensor | None = None,
    q_block: int = 128,
    layout: str = "bhsd",
):
    """A FlexAttention ``BlockMask`` that makes ``flex_attention`` compute MoBA.

    Args:
        q: queries, (B, Hq, Sq, D) as passed to ``flex_attention`` (``layout="bshd"``: the
            flash-attn layout (B, Sq, Hq, D) of ``moba_attn_func``).
        k: keys, (B, Hkv, Sk, D) (or (B, Sk, Hkv, D)), ``Sq <= Sk``: queries are the last Sq
            positions (bottom-right aligned, as in ``moba_attn_func``), ``Hq % Hkv == 0``
            (call ``flex_attention(..., enable_gqa=True)`` when Hq > Hkv).
        block_size, top_k, causal, config: as in ``moba.moba_attn_func`` (the gate runs on
            ``config.backend``'s gate; ``softmax_scale`` is not part of a mask: pass
            ``scale=`` to ``flex_attention``).
        block_indices: optional (B, Sq, Hq, n_slots) block indices (``moba.select_blocks``)
            instead of running the gate; ``top_k`` is then unused.
        q_block: query rows per block of the mask (FlexAttention's Q block size).
        layout: "bhsd" (FlexAttention's, default) or "bshd" (flash-attn's).

    Returns:
        ``torch.nn.attention.flex_attention.BlockMask`` for (B, Hq, Sq, Sk).

    Example:
        >>> mask = flex_block_mask(q, k, block_size=64, top_k=3)
        >>> out = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)   # (B, Hq, S, D)
    """
    from torch.nn.attention.flex_attention import BlockMask

    if layout not in ("bhsd", "bshd"):
        raise ValueError(f'layout must be "bhsd" (FlexAttention) or "bshd" (flash-attn), got {layout!r}')
    q_block = check_positive_int("q_block", q_block)
    cfg = _settings("flex_block_mask", config, block_indices, block_size=block_size, top_k=top_k, causal=causal)
    if layout == "bhsd":
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seqlen, head_dim)")
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # -> (B, S, H, D)
    check_qkv(q, k, k, varlen=False, same_length=False)
    b, sq, hq = q.shape[:3]
    sk = k.shape[1]
    if sq == 0 or sk == 0:
        raise ValueError(f"flex_block_mask needs at least one query and one key, got Sq={sq}, Sk={sk}")
    lay = build_layout([i * sq for i in range(b + 1)], [i * sk for i in range(b + 1)], cfg.block_size, q.device)
    # min(block_size, Sk): the same blocks, and (blocks + 1) * bs below stays inside int64
    bs = lay.block_size
    if block_indices is None:
        qp, kp = q.reshape(b * sq, hq, -1), k.reshape(b * sk, k.shape[2], -1)
        with torch.no_grad():
            idx = resolve_backend(cfg.backend, q.device, q).select(qp, kp, lay, cfg.top_k, cfg.causal)
    else:
        check_block_indices(block_indices, (b, sq, hq))
        idx = check_index_values(block_indices.to(q.device).reshape(b * sq, hq, -1), lay, cfg.causal)
    idx = idx.long().view(b, sq, hq, -1).permute(0, 2, 1, 3)  # (B, Hq, Sq, slots)
    dev = q.device
    nb = -(-sk // bs)
    nq = -(-sq // q_block)
    offset = sk - sq  # query i sits at key position offset + i

    valid = idx != PAD_INDEX
    blk = idx.clamp(min=0)
    # Bitset: bit (j % 32) of word j // 32 set when block j is selected; one row per query
    # (mask_mod clamps the padding rows FlexAttention iterates over to the last real one, so
    # memory never grows with q_block).
    n_words = -(-nb // 32)
    words = torch.zeros(b, hq, sq, n_words, dtype=torch.int64, device=dev)
    bit = torch.where(valid, torch.ones_like(blk) << (blk % 32), torch.zeros_like(blk))
    words.scatter_add_(-1, blk // 32, bit)  # distinct blocks per row: add == or
    bits = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
    del words, bit

    # Per (query tile, key block): how many of the tile's queries selected the block.
    tile = (torch.arange(sq, device=dev) // q_block)[None, None, :, None]
    counts = torch.zeros(b, hq, nq * nb, dtype=torch.int32, device=dev)
    counts.scatter_add_(-1, torch.where(valid, tile * nb + blk, 0).flatten(2), valid.to(torch.int32).flatten(2))
    counts = counts.view(b, hq, nq, nb)
    tiles = torch.arange(nq, device=dev)
    tile_rows = torch.clamp(sq - tiles * q_block, max=q_block)
    blocks = torch.arange(nb, device=dev)
    full = counts == tile_rows[:, None].to(torch.int32)
    full &= ((blocks + 1) * bs <= sk)[None, :]  # a tail block keeps its mask
    if cfg.causal:  # the block ends at or before the tile's first query position
        full &= ((blocks + 1) * bs - 1 <= offset + tiles[:, None] * q_block)
    partial = (counts > 0) & ~full

    def as_kv_blocks(m: torch.Tensor):
        """(B, H, nq, nb) bool -> count (B, H, nq) and indices (B, H, nq, nb), chosen first, ascending."""
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1, dtype=torch.int32), order.to(torch.int32).contiguous()

    kv_num, kv_ind = as_kv_blocks(partial)
    full_num, full_ind = as_kv_blocks(full)
    causal_ = cfg.causal

    def mask_mod(b_idx, h_idx, q_idx, kv_idx):
        j = kv_idx // bs
        row = torch.clamp(q_idx, max=sq - 1)  # padding rows of the last query tile
        keep = ((bits[b_idx, h_idx, row, j // 32] >> (j % 32)) & 1) == 1
        if causal_:
            keep = keep & (kv_idx <= q_idx + offset)
        return keep

    return BlockMask.from_kv_blocks(
        kv_num, kv_ind, full_num, full_ind, BLOCK_SIZE=(q_block, bs), mask_mod=mask_mod, seq_lengths=(sq, sk)
    )
