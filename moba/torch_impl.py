"""The PyTorch MoBA path: runs on any device, with autograd, in O(S * top_k * block_size) memory.

Work decomposition ("gather and densify", done in plain PyTorch):
  * for every slot of the block-index tensor, the (query, head) rows that selected the same
    key block of the same KV head form a group; a group is cut into tiles of ``M`` rows;
  * one tile is a dense (M, D) x (D, block_size) product against that block's keys, masked
    by the tail length and, causally, by ``key position <= query position`` (this is what
    turns the own block into causal attention);
  * each slot gives every row a partial (output, log-sum-exp); slots are merged with a
    log-sum-exp combine, so no (S, S) tensor ever exists;
  * the forward saves only the output and the float32 log-sum-exp; the backward recomputes
    the tile scores (flash-attention style), so peak memory stays near the inputs' size.

K/V are laid out once per (block, KV head); query heads that share a KV head land in the
same tiles, so GQA never repeats K/V. fp16/bf16 tiles are computed in float32, float64 in
float64. Gradients of K/V are accumulated with ``index_add_`` (deterministic on CPU; on CUDA
it uses atomics - the Triton backend is the fast and deterministic path there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import PAD_INDEX
from ._layout import BlockLayout

_MAX_ROWS_PER_TILE = 256
# (query, head) rows grouped into tiles at once (bounds the grouping temporaries).
_ROWS_PER_TILE_SET = 1 << 15
# Upper bound on the elements of one chunk of tile scores (tiles x rows x block_size).
_CHUNK_ELEMENTS = 1 << 19


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _Tiles:
    rows: torch.Tensor  # (n_tiles, M) flat row index t * Hq + h, -1 for padding
    group: torch.Tensor  # (n_tiles,) block id * Hkv + kv head


def _build_tiles(slot: torch.Tensor, layout: BlockLayout, n_kv_heads: int, first_token: int = 0) -> _Tiles | None:
    """Group the rows of one slot of block indices by (key block, KV head) into tiles.

    slot: (n, Hq) block indices of the query tokens ``first_token : first_token + n``.
    """
    tq, hq = slot.shape
    flat = slot.reshape(-1)
    rows = (flat != PAD_INDEX).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    block = layout.block_offset[layout.q_seq[rows // hq + first_token]] + flat[rows].long()
    rows += first_token * hq
    group = block * n_kv_heads + (rows % hq) // (hq // n_kv_heads)
    order = torch.argsort(group, stable=True)
    rows, group = rows[order], group[order]
    groups, counts = torch.unique_consecutive(group, return_counts=True)
    largest = int(counts.max())
    m = min(_MAX_ROWS_PER_TILE, 1 << (largest - 1).bit_length())  # small tiles for decoding
    tiles_per_group = (counts + m - 1) // m
    first_tile = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    first_row = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - torch.repeat_interleave(first_row, counts)
    tile = torch.repeat_interleave(first_tile, counts) + pos // m
    tile_rows = torch.full((int(tiles_per_group.sum()), m), -1, dtype=torch.long, device=rows.device)
    tile_rows[tile, pos % m] = rows
    return _Tiles(rows=tile_rows, group=torch.repeat_interleave(groups, tiles_per_group))


class _KeyBlocks:
    """Per-(block, KV head) tiles of a key or value tensor (Tk, Hkv, D) -> (n, bs, D).

    When every block is full (all sequence lengths are multiples of block_size, the usual
    fixed-length case) tiles are gathered straight from a (G, bs, Hkv, D) view, with no
    copy of K/V; otherwise K/V are laid out once as zero-padded (G * Hkv, bs, D) blocks.
    Tiles are cast to the compute dtype as they are gathered.
    """

    def __init__(self, x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, dtype, aligned: bool):
        g, bs = index.shape
        self.hkv, self.dtype, self.aligned = x.shape[1], dtype, aligned
        if aligned:
            self.source = x.view(g, bs, x.shape[1], x.shape[2])
        else:
            blocks = x[index].to(dtype).masked_fill(~valid[:, :, None, None], 0)  # (G, bs, Hkv, D)
            self.source = blocks.permute(0, 2, 1, 3).reshape(g * x.shape[1], bs, x.shape[2])

    def tile(self, group: torch.Tensor) -> torch.Tensor:
        if self.aligned:
            return self.source[group // self.hkv, :, group % self.hkv].to(self.dtype)
        return self.source[group]

    def zeros_like_grad(self) -> torch.Tensor:
        """Gradient accumulator in the same block layout (aligned: token layout (G, bs, Hkv, D))."""
        return torch.zeros(self.source.shape, dtype=self.dtype, device=self.source.device)

    @staticmethod
    def accumulate(grad: torch.Tensor, aligned: bool, hkv: int, group: torch.Tensor, tiles: torch.Tensor, alpha=1.0):
        """grad[tile of group] += alpha * tiles, tiles (n, bs, D)."""
        if not aligned:
            grad.index_add_(0, group, tiles, alpha=alpha)
            return
        block, head = group // hkv, group % hkv
        for h in range(hkv):  # (G, bs, D) strided view per KV head: no blocked copy of dK/dV
            pick = (head == h).nonzero().squeeze(1)
            if pick.numel():
                grad[:, :, h].index_add_(0, block[pick], tiles[pick], alpha=alpha)


def _unblocked(blocks: torch.Tensor, valid: torch.Tensor, n_kv_heads: int, aligned: bool) -> torch.Tensor:
    """Gradients from block layout back to tokens (Tk, Hkv, D).

    aligned: blocks is already (G, bs, Hkv, D) token layout; else (G * Hkv, bs, D) padded blocks.
    """
    g, bs = valid.shape
    d = blocks.shape[-1]
    if aligned:
        return blocks.view(g * bs, n_kv_heads, d)
    per_token = blocks.view(g, n_kv_heads, bs, d).transpose(1, 2).reshape(g * bs, n_kv_heads, d)
    return per_token[valid.reshape(-1)]


class _Context:
    """Tensors shared by the forward and backward tile loops."""

    def __init__(self, q, k, layout: BlockLayout, causal: bool, scale: float):
        self.dtype = _compute_dtype(q.dtype)
        self.hq, self.hkv, self.d = q.shape[1], k.shape[1], q.shape[2]
        self.layout, self.causal, self.scale = layout, causal, scale
        self.key_token, self.key_valid = layout.block_token_index()  # (G, bs)
        # Additive bias that removes the missing keys of a tail block: 0 or -inf, (G, 1, bs).
        self.key_bias = torch.zeros(self.key_valid.shape, dtype=self.dtype, device=q.device)
        self.key_bias = self.key_bias.masked_fill(~self.key_valid, float("-inf"))[:, None, :]
        self.block_last_token = layout.block_start + layout.block_len - 1  # (G,)
        self.aligned = bool((layout.block_len == layout.block_size).all())

    def key_blocks(self, x: torch.Tensor) -> _KeyBlocks:
        return _KeyBlocks(x, self.key_token, self.key_valid, self.dtype, self.aligned)

    def tile_sets(self, block_indices: torch.Tensor):
        """Tiles of every slot, built for at most ``_ROWS_PER_TILE_SET`` (query, head) rows at a
        time so that the grouping temporaries stay small (rows are O(S * Hq))."""
        tokens = max(1, _ROWS_PER_TILE_SET // self.hq)
        for slot in range(block_indices.shape[-1]):
            for start in range(0, block_indices.shape[0], tokens):
                tiles = _build_tiles(block_indices[start : start + tokens, :, slot], self.layout, self.hkv, start)
                if tiles is not None:
                    yield tiles

    def chunks(self, tiles: _Tiles):
        step = max(1, _CHUNK_ELEMENTS // (tiles.rows.shape[1] * self.layout.block_size))
        for start in range(0, tiles.rows.shape[0], step):
            yield tiles.rows[start : start + step], tiles.group[start : start + step]

    def scores(self, q_flat, k_blocks: _KeyBlocks, rows, group):
        """Scaled, masked scores (n, M, bs) of a chunk of tiles, and the gathered queries.

        Padding rows (rows == -1) get zero queries: their scores are finite but they are
        never written back, and with zero queries / zero output gradients they add nothing
        to dK or dV.
        """
        present = rows >= 0
        safe = rows.clamp(min=0)
        qt = torch.where(present[..., None], q_flat[safe].to(self.dtype), 0.0)  # (n, M, D)
        block = group // self.hkv
        kt = k_blocks.tile(group)  # (n, bs, D)
        s = torch.baddbmm(self.key_bias[block], qt, kt.transpose(1, 2), alpha=self.scale)
        if self.causal:
            # Only tiles that hold a query inside the block need the causal mask (own blocks).
            q_token = self.layout.q_key_token[safe // self.hq]  # (n, M)
            q_first = q_token.masked_fill(~present, torch.iinfo(q_token.dtype).max).amin(dim=1)
            straddle = (self.block_last_token[block] > q_first).nonzero().squeeze(1)
            if straddle.numel():
                future = self.key_token[block[straddle]][:, None, :] > q_token[straddle][:, :, None]
                s[straddle] = s[straddle].masked_fill_(future, float("-inf"))
        return qt, kt, s, present, safe


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor, dtype, chunk: int = 4096) -> torch.Tensor:
    """(T, H, D) x (T, H, D) -> (T, H) dot products, in token chunks to avoid a full-size temporary."""
    out = torch.empty(a.shape[:2], dtype=dtype, device=a.device)
    for start in range(0, a.shape[0], chunk):
        sl = slice(start, start + chunk)
        out[sl] = (a[sl].to(dtype) * b[sl].to(dtype)).sum(-1)
    return out


class _Forward:
    """Flash-style merge across slots: running max, running sum and unnormalised accumulator
    per row (merging normalised partials by log-sum-exp would lose ~|lse| * eps)."""

    def __init__(self, ctx: _Context, q_flat, k_blocks, v_blocks):
        self.ctx, self.q_flat, self.k_blocks, self.v_blocks = ctx, q_flat, k_blocks, v_blocks
        n, dev = q_flat.shape[0], q_flat.device
        self.acc = torch.zeros(n, ctx.d, dtype=ctx.dtype, device=dev)
        self.run_max = torch.full((n,), float("-inf"), dtype=ctx.dtype, device=dev)
        self.run_sum = torch.zeros(n, dtype=ctx.dtype, device=dev)

    def chunk(self, rows, group) -> None:
        """Merge one chunk of tiles (a method, so its temporaries are freed on return)."""
        _, _, s, present, _ = self.ctx.scores(self.q_flat, self.k_blocks, rows, group)
        part_max = s.amax(dim=-1)
        p = s.sub_(part_max[..., None]).exp_()  # in place: s is not needed again
        part_sum = p.sum(dim=-1)[present]
        part_acc = torch.bmm(p, self.v_blocks.tile(group))[present]
        del s, p
        part_max = part_max[present]
        r = rows[present]
        # Each row appears once per slot, so these read-modify-writes never race.
        new_max = torch.maximum(self.run_max[r], part_max)
        old_scale = torch.exp(self.run_max[r] - new_max)
        new_scale = torch.exp(part_max - new_max)
        self.acc[r] = self.acc[r] * old_scale[:, None] + part_acc * new_scale[:, None]
        self.run_sum[r] = self.run_sum[r] * old_scale + part_sum * new_scale
        self.run_max[r] = new_max


def _forward(q, k, v, layout, block_indices, causal, scale):
    ctx = _Context(q, k, layout, causal, scale)
    state = _Forward(ctx, q.reshape(-1, ctx.d), ctx.key_blocks(k), ctx.key_blocks(v))
    for tiles in ctx.tile_sets(block_indices):
        for rows, group in ctx.chunks(tiles):
            state.chunk(rows, group)
    out = state.acc.div_(state.run_sum[:, None])
    lse = state.run_max + torch.log(state.run_sum)
    return out.reshape(q.shape).to(q.dtype), lse.reshape(q.shape[:2])


class _Backward:
    """dQ and the block-layout dK / dV, accumulated chunk by chunk from recomputed scores."""

    def __init__(self, ctx: _Context, q_flat, k_blocks, v_blocks, lse_flat, delta, dout):
        self.ctx, self.q_flat, self.k_blocks, self.v_blocks = ctx, q_flat, k_blocks, v_blocks
        self.lse_flat, self.delta, self.dout = lse_flat, delta, dout
        self.dq = torch.zeros(q_flat.shape, dtype=ctx.dtype, device=q_flat.device)
        self.dk_blk, self.dv_blk = k_blocks.zeros_like_grad(), v_blocks.zeros_like_grad()

    def _add(self, grad, group, tiles, alpha=1.0) -> None:
        _KeyBlocks.accumulate(grad, self.ctx.aligned, self.ctx.hkv, group, tiles, alpha)

    def chunk(self, rows, group) -> None:
        """One chunk of tiles (a method, so its temporaries are freed on return)."""
        ctx = self.ctx
        qt, kt, s, present, safe = ctx.scores(self.q_flat, self.k_blocks, rows, group)
        # Padding rows point at row 0, whose lse / delta may be anything (-100 makes
        # exp(0 - lse) overflow, NaN stays NaN): replace them, so that padding rows get P = 0
        # and dS = 0 exactly and add nothing to dK / dV of the tile's real rows.
        lse = torch.where(present, self.lse_flat[safe], float("inf"))
        delta = torch.where(present, self.delta[safe], 0.0)
        p = s.sub_(lse[..., None]).exp_()  # (n, M, bs) probabilities, 0 where masked
        # dout may be an expanded (stride-0) tensor: index it as (token, head), never flatten it.
        dot = torch.where(present[..., None], self.dout[safe // ctx.hq, safe % ctx.hq].to(ctx.dtype), 0.0)
        self._add(self.dv_blk, group, torch.bmm(p.transpose(1, 2), dot))
        ds = torch.bmm(dot, self.v_blocks.tile(group).transpose(1, 2))  # dP
        del dot
        ds = ds.sub_(delta[..., None]).mul_(p)  # dS = P * (dP - delta), unscaled
        del p, s
        self.dq.index_add_(0, rows[present], torch.bmm(ds, kt)[present], alpha=ctx.scale)
        self._add(self.dk_blk, group, torch.bmm(ds.transpose(1, 2), qt), alpha=ctx.scale)


def _backward(q, k, v, out, lse, dout, layout, block_indices, causal, scale):
    ctx = _Context(q, k, layout, causal, scale)
    delta = _rowwise_dot(dout, out, ctx.dtype).reshape(-1)  # rowsum(dO * O), (Tq * Hq,)
    state = _Backward(ctx, q.reshape(-1, ctx.d), ctx.key_blocks(k), ctx.key_blocks(v),
                      lse.reshape(-1).to(ctx.dtype), delta, dout)
    for tiles in ctx.tile_sets(block_indices):
        for rows, group in ctx.chunks(tiles):
            state.chunk(rows, group)
    dq, dk_blk, dv_blk = state.dq, state.dk_blk, state.dv_blk
    del state
    dk = _unblocked(dk_blk, ctx.key_valid, ctx.hkv, ctx.aligned).to(k.dtype)
    del dk_blk
    dv = _unblocked(dv_blk, ctx.key_valid, ctx.hkv, ctx.aligned).to(v.dtype)
    return dq.reshape(q.shape).to(q.dtype), dk, dv


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, layout, causal, scale):
        out, lse = _forward(q, k, v, layout, block_indices, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, block_indices)
        ctx.layout, ctx.causal, ctx.scale = layout, causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, block_indices = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.layout, block_indices, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def sparse_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    block_indices: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention of packed queries over their selected key blocks (PyTorch, autograd).

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D); block_indices: (Tq, Hq, n_slots) local block indices
    (validated, PAD_INDEX-padded). Returns the output (Tq, Hq, D) in q's dtype and the
    log-sum-exp (Tq, Hq) of the scaled scores (float32; float64 for float64 inputs).
    """
    if q.shape[0] == 0:
        return q.clone(), q.new_zeros(q.shape[:2], dtype=_compute_dtype(q.dtype))  # clone keeps the graph
    return _SparseAttention.apply(q, k, v, block_indices, layout, causal, softmax_scale)
