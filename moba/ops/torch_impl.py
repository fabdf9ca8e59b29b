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

Formulations behind the gated entry point ``moba_attention_packed`` (``moba_attn_func`` /
``moba_attn_varlen_func`` with ``backend="torch"`` and no ``block_indices``), chosen from the
lengths only (``gated_path``):
  * "dense": top_k covers every block, so MoBA is dense attention: torch SDPA, no gate;
  * "dense_mask" (CPU, one length for all sequences, short relative to top_k * block_size):
    dense attention under the selection mask with the CPU flash-attention kernels, one query
    chunk at a time over its causal key prefix (at context 256 the tile path's bookkeeping
    costs more than the pairs it skips);
  * "tile": the decomposition above; on CPU, from block size 64 and 1024 key tokens on, computed
    by the CPU flash-attention kernels instead ("flash formulation", below: the same pairs and
    the same masking contract; bench/torch_path_cpu.py measures it).

torch.compile: the gate (``moba::torch_gate``) and attention (``moba::torch_attention_fwd`` /
``_bwd``, autograd registered) are ``torch.library.custom_op``s whose boundaries are host int
lists (SymInts under dynamic shapes); everything data dependent (nonzero, unique, .item(), the
chunk loops, the layout, cached per (boundaries, block size)) runs inside them, so a model
compiles with ``fullgraph=True`` and does not recompile per sequence length.

Masking is by ``torch.where`` / ``masked_fill`` on values, never a product with a 0/1 mask;
a tile's padding rows get P = 0 and dS = 0, so a non-finite value in one sequence (or at row 0,
which padding rows point at) reaches no other sequence. A key or value a query cannot see never
reaches it either: the sequences holding a non-finite key or value run the tiles with exact
masking (``_NonFiniteSequences``, ``_masked_bmm``); the dense-mask, flash and SDPA formulations
would multiply a masked probability 0 by it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._core.checks import PAD_INDEX
from .._core.custom_ops import register_attention_autograd
from .._core.layout import BlockLayout, build_layout, gate_width, max_blocks
from .gate import select_packed

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


class _StaticLayout:
    """What the tile loops need from a block layout; it depends only on the sequence
    boundaries, so it is cached per (cu_q, cu_k, block_size, device) by ``_static_layout``."""

    def __init__(self, layout: BlockLayout):
        self.layout = layout
        self.key_token, self.key_valid = layout.block_token_index()  # (G, bs)
        self.block_last_token = layout.block_start + layout.block_len - 1  # (G,)
        self.aligned = bool((layout.block_len == layout.block_size).all())
        self._bias: dict[torch.dtype, torch.Tensor] = {}

    def key_bias(self, dtype) -> torch.Tensor:
        """Additive bias that removes the missing keys of a tail block: 0 or -inf, (G, 1, bs)."""
        if dtype not in self._bias:
            zeros = torch.zeros(self.key_valid.shape, dtype=dtype, device=self.key_valid.device)
            self._bias[dtype] = zeros.masked_fill(~self.key_valid, float("-inf"))[:, None, :]
        return self._bias[dtype]


_LAYOUT_CACHE: OrderedDict[tuple, _StaticLayout] = OrderedDict()
_LAYOUT_CACHE_SIZE = 16
_LAYOUT_CACHE_LOCK = threading.Lock()  # threads share the cache (get, insert, evict, reorder)


def _static_layout(cu_q: list[int], cu_k: list[int], block_size: int, device) -> _StaticLayout:
    """The block layout of these sequence boundaries (a small LRU cache: training calls every
    layer with the same lengths, forward and backward)."""
    key = (tuple(cu_q), tuple(cu_k), block_size, str(torch.device(device)))
    with _LAYOUT_CACHE_LOCK:
        hit = _LAYOUT_CACHE.get(key)
        if hit is not None:
            _LAYOUT_CACHE.move_to_end(key)
            return hit
    built = _StaticLayout(build_layout(list(cu_q), list(cu_k), block_size, device))  # outside the lock
    with _LAYOUT_CACHE_LOCK:
        hit = _LAYOUT_CACHE.setdefault(key, built)  # another thread may have built it meanwhile
        _LAYOUT_CACHE.move_to_end(key)
        while len(_LAYOUT_CACHE) > _LAYOUT_CACHE_SIZE:
            _LAYOUT_CACHE.popitem(last=False)
    return hit


class _Context:
    """Tensors shared by the forward and backward tile loops."""

    def __init__(self, q, k, static: _StaticLayout, causal: bool, scale: float, finite: bool = True):
        self.dtype = _compute_dtype(q.dtype)
        # False when q, k or v holds a non-finite value: products then skip masked pairs exactly.
        self.finite = finite
        self.hq, self.hkv, self.d = q.shape[1], k.shape[1], q.shape[2]
        self.layout, self.causal, self.scale = static.layout, causal, scale
        self.key_token, self.key_valid = static.key_token, static.key_valid  # (G, bs)
        self.key_bias = static.key_bias(self.dtype)  # (G, 1, bs)
        self.block_last_token = static.block_last_token  # (G,)
        self.aligned = static.aligned

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
            if straddle.numel() == block.numel():  # a chunk of own-block tiles only: mask in place, no copies
                s.masked_fill_(self.key_token[block][:, None, :] > q_token[:, :, None], float("-inf"))
            elif straddle.numel():
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


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every element of every tensor is finite (one pass each; a host sync)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _masked_bmm(a: torch.Tensor, b: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``bmm(a, b)`` in which a pair that is not ``visible`` adds nothing, even where ``b`` is not finite.

    a: (n, M, N), b: (n, N, D), visible: (n, M, N) bool. ``a`` is 0 where not visible (a masked
    probability or score gradient), and ``0 * NaN`` is NaN: a non-finite key or value that a row
    cannot see would reach it. The non-finite entries of ``b`` are replaced by 0 for the product,
    and their exact contribution (``a * b`` over the visible pairs only) is added back, one tile
    at a time, for the tiles that hold any.
    """
    bad = ~torch.isfinite(b)
    out = torch.bmm(a, b.masked_fill(bad, 0))
    for t in bad.flatten(1).any(dim=1).nonzero().squeeze(1).tolist():
        pairs = (visible[t][:, :, None] & bad[t][None]).any(dim=1).any(dim=1)  # rows that see a bad entry
        rows = pairs.nonzero().squeeze(1)
        if rows.numel():
            extra = torch.where(visible[t, rows][:, :, None] & bad[t][None], a[t, rows][:, :, None] * b[t][None], 0.0)
            out[t, rows] += extra.sum(dim=1)
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
        visible = None if self.ctx.finite else s != float("-inf")
        p = s.sub_(part_max[..., None]).exp_()  # in place: s is not needed again
        part_sum = p.sum(dim=-1)[present]
        vt = self.v_blocks.tile(group)
        part_acc = (torch.bmm(p, vt) if visible is None else _masked_bmm(p, vt, visible))[present]
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


def _forward(q, k, v, static, block_indices, causal, scale, finite=True):
    ctx = _Context(q, k, static, causal, scale, finite)
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
        visible = None if ctx.finite else s != float("-inf")
        p = s.sub_(lse[..., None]).exp_()  # (n, M, bs) probabilities, 0 where masked
        # dout may be an expanded (stride-0) tensor: index it as (token, head), never flatten it.
        dot = torch.where(present[..., None], self.dout[safe // ctx.hq, safe % ctx.hq].to(ctx.dtype), 0.0)
        self._add(self.dv_blk, group, torch.bmm(p.transpose(1, 2), dot))
        ds = torch.bmm(dot, self.v_blocks.tile(group).transpose(1, 2))  # dP
        del dot
        ds = ds.sub_(delta[..., None]).mul_(p)  # dS = P * (dP - delta), unscaled
        del p, s
        if visible is None:
            self.dq.index_add_(0, rows[present], torch.bmm(ds, kt)[present], alpha=ctx.scale)
            self._add(self.dk_blk, group, torch.bmm(ds.transpose(1, 2), qt), alpha=ctx.scale)
            return
        # Non-finite inputs: dP of a masked pair reads a value the row cannot see (replace dS
        # there), and neither product may multiply a masked 0 by a non-finite key or query.
        ds = torch.where(visible, ds, 0.0)
        self.dq.index_add_(0, rows[present], _masked_bmm(ds, kt, visible)[present], alpha=ctx.scale)
        dk = _masked_bmm(ds.transpose(1, 2), qt, visible.transpose(1, 2))
        self._add(self.dk_blk, group, dk, alpha=ctx.scale)


def _backward(q, k, v, out, lse, dout, static, block_indices, causal, scale, finite=True):
    ctx = _Context(q, k, static, causal, scale, finite)
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

# ----------------------------------------------------------------------------------------------
# Flash formulation of the tile path (CPU): the same pairs, computed by the CPU flash-attention
# kernels, which return the log-sum-exp and take it back in the backward.
#   * own blocks (causal): one batched causal call, the sequence cut into (n_blocks, block_size)
#     (each sequence's full blocks are one contiguous run; a tail block is its own call);
#   * every other selected key block: one non-causal call over the query rows that chose it,
#     grouped per (key block, KV head) with the query heads of that KV head stacked as rows
#     (K/V are read in place, never repeated), at most ``_FLASH_ROWS`` rows per call;
#   * partials are merged by log-sum-exp into the output (the merge weights exp(lse_i - lse)
#     are within ~|lse| * eps of exact, far inside the float32 tolerance).
# Backward: each call's backward, given the FINAL output and log-sum-exp, returns that call's
# exact dQ / dK / dV contributions (P = exp(S - lse), delta = rowsum(dO * O)), so no partial
# output is saved. Used on CPU for self-attention layouts (causal) or any layout (non-causal)
# when every query row selects its own block in causal mode (the gate always does); other
# cases (chunked prefill / decoding, user indices without the own block, CUDA) run the tiles
# above. A group only ever holds rows of the key block's own sequence, so a NaN in one
# sequence cannot reach another.

_FLASH_ROWS = 8192  # query rows per non-own call (bounds the gathered temporaries)
# Used from these sizes on, where it is the faster formulation. Below them the tiles are as fast,
# and more accurate: the CPU flash kernels' float32 gradients sit near the contract's 3x bound
# (docs/design.md section 1) and, on some tiny inputs, above it (dense SDPA itself, on the
# 40-token mqa-bs12-kall-noncausal case of tests/test_torch_path.py: 1.15x of the bound).
_FLASH_MIN_BLOCK = 64
_FLASH_MIN_KEYS = 1024
_FLASH_OWN_BLOCKS = 8  # own blocks per call when the result is copied (not a view of the output)
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _flash_applicable(q: torch.Tensor, static: _StaticLayout, block_indices: torch.Tensor, causal: bool) -> bool:
    layout = static.layout
    if q.device.type != "cpu" or layout.block_size < _FLASH_MIN_BLOCK or layout.cu_k[-1] < _FLASH_MIN_KEYS:
        return False
    if not causal:
        return True
    if layout.cu_q != layout.cu_k:
        return False
    own = (layout.q_pos // layout.block_size).to(block_indices.dtype)  # (Tq,) local own block
    return bool((block_indices == own[:, None, None]).any(dim=-1).all())


def _own_runs(static: _StaticLayout) -> list[tuple[int, int, int]]:
    """(first token, blocks, block length) of the own-block calls: consecutive sequences' full
    blocks form one run while no tail block interrupts them; each tail block is its own run."""
    layout, bs = static.layout, static.layout.block_size
    runs: list[list[int]] = []
    for a, b in zip(layout.cu_k[:-1], layout.cu_k[1:], strict=True):
        full, tail = (b - a) // bs, (b - a) % bs
        if full:
            if runs and runs[-1][2] == bs and runs[-1][0] + runs[-1][1] * bs == a:
                runs[-1][1] += full
            else:
                runs.append([a, full, bs])
        if tail:
            runs.append([a + full * bs, 1, tail])
    return [tuple(r) for r in runs]


def _own_chunks(static: _StaticLayout, total: int):
    """Own-block calls (token range start, blocks, block length); one call when a single run
    covers every token (its result is then a view of the output, no copy)."""
    for start, n, length in _own_runs(static):
        if start == 0 and n * length == total:
            yield start, n, length
            continue
        for b in range(0, n, _FLASH_OWN_BLOCKS):
            yield start + b * length, min(_FLASH_OWN_BLOCKS, n - b), length


def _blocked(x: torch.Tensor, start: int, n: int, length: int) -> torch.Tensor:
    """Tokens start : start + n * length of x (T, H, D) as (n, H, length, D) (a view)."""
    return x[start : start + n * length].view(n, length, *x.shape[1:]).transpose(1, 2)


def _other_groups(static: _StaticLayout, block_indices: torch.Tensor, hq: int, hkv: int, causal: bool):
    """Yield (rows, first key token, key length, KV head): the flat (token * Hq + head) query rows
    that selected a key block other than their own, per (key block, KV head), in chunks."""
    layout = static.layout
    idx = block_indices.long()
    keep = idx != PAD_INDEX
    if causal:
        keep &= idx != (layout.q_pos // layout.block_size)[:, None, None]
    token, head, slot = keep.nonzero(as_tuple=True)
    if token.numel() == 0:
        return
    block = layout.block_offset[layout.q_seq[token]] + idx[token, head, slot]
    group = block * hkv + head // (hq // hkv)
    del slot, keep, idx
    group, order = torch.sort(group, stable=True)
    rows = (token * hq + head)[order]
    del token, head, order
    groups, counts = torch.unique_consecutive(group, return_counts=True)
    del group
    starts, lengths = static.layout.block_start.tolist(), static.layout.block_len.tolist()
    first = 0
    for g, c in zip(groups.tolist(), counts.tolist(), strict=True):
        blk, kv_head = divmod(g, hkv)
        for a in range(first, first + c, _FLASH_ROWS):
            yield rows[a : min(a + _FLASH_ROWS, first + c)], starts[blk], lengths[blk], kv_head
        first += c


def _flash_inputs(q, k, v):
    dtype = _compute_dtype(q.dtype)  # fp16 / bf16 run in float32, as the tiles do
    return dtype, q.to(dtype), k.to(dtype), v.to(dtype)


def _flash_forward(q, k, v, static, block_indices, causal, scale):
    dtype, qc, kc, vc = _flash_inputs(q, k, v)
    t, hq, d = q.shape
    hkv = k.shape[1]
    out = lse = None
    if causal:
        for start, n, length in _own_chunks(static, t):
            o, l = _flash_fwd(*(_blocked(x, start, n, length) for x in (qc, kc, vc)), 0.0, True, scale=scale)
            o, l = o.transpose(1, 2).reshape(n * length, hq, d), l.transpose(1, 2).reshape(n * length, hq)
            if n * length == t:  # views of the kernel's (n, length, Hq) results: no copy
                out, lse = o, l
                continue
            if out is None:
                out, lse = qc.new_empty(t, hq, d), qc.new_empty(t, hq)
            out[start : start + n * length], lse[start : start + n * length] = o, l
    else:
        out, lse = qc.new_zeros(t, hq, d), qc.new_full((t, hq), float("-inf"))
    # Merge as flash attention does: out holds sum_i w_i * o_i with w_i = exp(lse_i - lse) relative
    # to a running maximum ``lse`` and their sum in ``total``; normalised at the end. (Merging
    # normalised partials by logaddexp would round the lse once per merge, and the backward's
    # P = exp(S - lse) is sensitive to exactly that.)
    total = qc.new_ones(t, hq) if causal else qc.new_zeros(t, hq)
    out_flat, max_flat, total_flat, q_flat = out.view(-1, d), lse.view(-1), total.view(-1), qc.view(-1, d)
    for rows, start, length, kv_head in _other_groups(static, block_indices, hq, hkv, causal):
        kb, vb = (x[start : start + length, kv_head][None, None] for x in (kc, vc))
        o, l = _flash_fwd(q_flat.index_select(0, rows)[None, None], kb, vb, 0.0, False, scale=scale)
        o, l = o[0, 0], l[0, 0]
        old = max_flat.index_select(0, rows)
        new = torch.maximum(old, l)
        w_old, w_new = torch.exp(old - new), torch.exp(l - new)
        out_flat.index_copy_(0, rows, out_flat.index_select(0, rows).mul_(w_old[:, None]).add_(o.mul_(w_new[:, None])))
        total_flat.index_copy_(0, rows, total_flat.index_select(0, rows).mul_(w_old).add_(w_new))
        max_flat.index_copy_(0, rows, new)
    out = out.div_(total[..., None]).to(q.dtype)
    return out, lse.add_(total.log_())


def _flash_backward(q, k, v, out, lse, dout, static, block_indices, causal, scale):
    dtype, qc, kc, vc = _flash_inputs(q, k, v)
    oc, gc, lc = out.to(dtype), dout.to(dtype).contiguous(), lse.to(dtype).contiguous()
    t, hq, d = q.shape
    hkv = k.shape[1]
    dq = dk = dv = None
    if causal:
        for start, n, length in _own_chunks(static, t):
            blocked = [_blocked(x, start, n, length) for x in (gc, qc, kc, vc, oc)]
            lse_b = lc[start : start + n * length].view(n, length, hq).transpose(1, 2)
            gq, gk, gv = _flash_bwd(*blocked, lse_b, 0.0, True, scale=scale)
            gq = gq.transpose(1, 2).reshape(n * length, hq, d)
            gk, gv = (x.transpose(1, 2).reshape(n * length, hkv, d) for x in (gk, gv))
            if n * length == t:
                dq, dk, dv = gq, gk, gv
                continue
            if dq is None:
                dq, dk, dv = qc.new_empty(t, hq, d), kc.new_zeros(k.shape), vc.new_zeros(v.shape)
            dq[start : start + n * length], dk[start : start + n * length], dv[start : start + n * length] = gq, gk, gv
    if dq is None:
        dq, dk, dv = qc.new_zeros(q.shape), kc.new_zeros(k.shape), vc.new_zeros(v.shape)
    dq_flat, q_flat, g_flat, o_flat, l_flat = dq.view(-1, d), qc.view(-1, d), gc.view(-1, d), oc.view(-1, d), lc.view(-1)
    for rows, start, length, kv_head in _other_groups(static, block_indices, hq, hkv, causal):
        kb, vb = (x[start : start + length, kv_head][None, None] for x in (kc, vc))
        gq, gk, gv = _flash_bwd(*(x.index_select(0, rows)[None, None] for x in (g_flat, q_flat)), kb, vb,
                                *(x.index_select(0, rows)[None, None] for x in (o_flat, l_flat)), 0.0, False,
                                scale=scale)
        dq_flat.index_add_(0, rows, gq[0, 0])
        dk[start : start + length, kv_head] += gk[0, 0]
        dv[start : start + length, kv_head] += gv[0, 0]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Dense-mask formulation for short sequences of one length (CPU): dense attention under the
# selection mask, through the CPU flash-attention kernels (native GQA, returns the lse), one
# query chunk at a time over its causal key prefix.

# Used while the attended-pair ratio of dense causal attention over MoBA,
# (L / 2) / ((top_k - 1/2) * block_size), is below this (above it the tile path is faster) ...
_DENSE_MASK_MAX_PAIR_RATIO = 2.5
# ... and while the (N, Hq, L, L) mask stays below this many elements.
_DENSE_MASK_MAX_ELEMENTS = 1 << 24
# Causal query chunks (each over its key prefix): the masked-out upper triangle costs
# (1 + 1/chunks) / 2 of a full square instead of all of it.
_DENSE_MASK_CHUNKS = 8


def _chunks(length: int, causal: bool) -> list[tuple[int, int]]:
    """Query row ranges [a, b); each attends to keys [0, b) (all keys when not causal)."""
    n = _DENSE_MASK_CHUNKS if causal and length >= 4 * _DENSE_MASK_CHUNKS else 1
    bounds = [c * length // n for c in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class _DenseMask:
    """Additive selection masks of N sequences of length L: 0 where the query attends the key,
    -inf elsewhere (the flash kernel's mask convention), built per query chunk."""

    def __init__(self, block_indices, n: int, length: int, block_size: int, causal: bool, dtype):
        hq = block_indices.shape[1]
        n_blocks = (length + block_size - 1) // block_size
        idx = block_indices.reshape(n, length, hq, -1).transpose(1, 2).long()  # (N, Hq, L, slots)
        idx = torch.where(idx == PAD_INDEX, n_blocks, idx)  # padding writes an extra, dropped column
        sel = torch.zeros(n, hq, length, n_blocks + 1, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
        zero = torch.zeros((), dtype=dtype, device=idx.device)
        self.block_bias = torch.where(sel[..., :n_blocks], zero, float("-inf"))  # (N, Hq, L, n_blocks)
        self.causal, self.length, self.block_size = causal, length, block_size

    def __call__(self, a: int, b: int) -> torch.Tensor:
        """(N, Hq, b - a, keys) for queries a:b; keys 0:b when causal, else all."""
        keys = b if self.causal else self.length
        n_blocks = (keys + self.block_size - 1) // self.block_size
        bias = self.block_bias[:, :, a:b, :n_blocks]
        # Each block's bias repeated over its keys, into a fresh tensor.
        mask = bias.new_empty(*bias.shape, self.block_size).copy_(bias[..., None]).flatten(-2)[..., :keys]
        if self.causal:  # only the square of keys a:b holds future keys of queries a:b
            future = torch.ones(b - a, b - a, dtype=torch.bool, device=mask.device).triu_(1)
            mask[..., a:b].masked_fill_(future, float("-inf"))
        return mask


def _as_bhld(x: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """(N * L, H, D) -> (N, H, L, D) view."""
    return x.reshape(n, length, *x.shape[1:]).transpose(1, 2)


def _dense_mask_forward(q, k, v, block_indices, cu_q, block_size, causal, scale):
    n, length = len(cu_q) - 1, cu_q[1] - cu_q[0]
    masks = _DenseMask(block_indices, n, length, block_size, causal, q.dtype)
    qb, kb, vb = (_as_bhld(x, n, length) for x in (q, k, v))
    out = torch.empty(n, length, *q.shape[1:], dtype=q.dtype, device=q.device)
    lse = torch.empty(n, length, q.shape[1], dtype=_compute_dtype(q.dtype), device=q.device)
    for a, b in _chunks(length, causal):
        keys = b if causal else length
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qb[:, :, a:b], kb[:, :, :keys], vb[:, :, :keys], 0.0, False, attn_mask=masks(a, b), scale=scale
        )
        out[:, a:b] = o.transpose(1, 2)
        lse[:, a:b] = l.transpose(1, 2)
    return out.view(q.shape), lse.view(q.shape[:2])


def _dense_mask_backward(dout, q, k, v, out, lse, block_indices, cu_q, block_size, causal, scale):
    n, length = len(cu_q) - 1, cu_q[1] - cu_q[0]
    masks = _DenseMask(block_indices, n, length, block_size, causal, q.dtype)
    qb, kb, vb, ob, gb = (_as_bhld(x, n, length) for x in (q, k, v, out, dout))
    lseb = lse.view(n, length, -1).transpose(1, 2).to(torch.float32 if q.dtype != torch.float64 else q.dtype)
    dq = torch.empty(n, length, *q.shape[1:], dtype=q.dtype, device=q.device)
    dk = torch.zeros(n, length, *k.shape[1:], dtype=torch.float32 if k.dtype != torch.float64 else k.dtype,
                     device=k.device)
    dv = torch.zeros_like(dk)
    for a, b in _chunks(length, causal):
        keys = b if causal else length
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            gb[:, :, a:b], qb[:, :, a:b], kb[:, :, :keys], vb[:, :, :keys], ob[:, :, a:b], lseb[:, :, a:b].contiguous(),
            0.0, False, attn_mask=masks(a, b), scale=scale,
        )
        dq[:, a:b] = gq.transpose(1, 2)
        dk[:, :keys] += gk.transpose(1, 2)
        dv[:, :keys] += gv.transpose(1, 2)
    return dq.view(q.shape), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Non-finite keys or values. The dense-mask, flash and SDPA formulations let a masked key or value
# that is not finite reach rows that cannot see it (an additive -inf mask, 0 * NaN in P @ V). The
# sequences holding one run the tiles with exact masking (``finite=False``); every other sequence
# runs exactly as without them (bitwise), with the non-finite sequences' keys and values zeroed.


@dataclass
class _NonFiniteSequences:
    """The sequences whose keys or values hold a non-finite value, as a packed sub-batch."""

    tq: torch.Tensor  # (tq,) their query tokens
    tk: torch.Tensor  # (tk,) their key tokens
    cu_q: list[int]  # boundaries of the sub-batch
    cu_k: list[int]
    k_tokens: torch.Tensor  # (Tk,) bool: key tokens of these sequences

    @staticmethod
    def find(k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int]) -> _NonFiniteSequences | None:
        if all_finite(k, v):  # the usual case: one pass over k and v
            return None
        bad = ~(torch.isfinite(k).flatten(1).all(dim=1) & torch.isfinite(v).flatten(1).all(dim=1))  # (Tk,)
        ends = torch.tensor(cu_k[1:], device=k.device)
        seqs = sorted(set(torch.searchsorted(ends, bad.nonzero().squeeze(1), right=True).tolist()))
        tq = [torch.arange(cu_q[n], cu_q[n + 1]) for n in seqs]
        tk = [torch.arange(cu_k[n], cu_k[n + 1]) for n in seqs]
        sub_q, sub_k = [0], [0]
        for n in seqs:
            sub_q.append(sub_q[-1] + cu_q[n + 1] - cu_q[n])
            sub_k.append(sub_k[-1] + cu_k[n + 1] - cu_k[n])
        tk_all = torch.cat(tk).to(k.device)
        k_tokens = torch.zeros(k.shape[0], dtype=torch.bool, device=k.device)
        k_tokens[tk_all] = True
        return _NonFiniteSequences(torch.cat(tq).to(k.device), tk_all, sub_q, sub_k, k_tokens)

    def sanitized(self, k: torch.Tensor, v: torch.Tensor):
        """k, v with these sequences' tokens zeroed (replaced, not multiplied)."""
        return tuple(x.masked_fill(self.k_tokens[:, None, None], 0) for x in (k, v))


# ----------------------------------------------------------------------------------------------
# Custom ops: autograd and torch.compile see one opaque op per direction (the tile grouping is
# data dependent: nonzero, unique, .item(); it stays inside the ops, and so do the chunk loops).
# method: "tile" (any layout) or "dense_mask" (CPU, one length L for queries and keys).


@torch.library.custom_op("moba::torch_attention_fwd", mutates_args=())
def torch_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    block_size: int,
    causal: bool,
    scale: float,
    method: str = "tile",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA forward over given block indices: (out (Tq, Hq, D) in q.dtype, lse (Tq, Hq) float32;
    float64 for float64 inputs)."""
    if q.shape[0] == 0:
        return torch.zeros_like(q), q.new_zeros(q.shape[:2], dtype=_compute_dtype(q.dtype))
    sub = _NonFiniteSequences.find(k, v, cu_q, cu_k)
    if sub is None:
        return _dispatch_forward(q, k, v, block_indices, cu_q, cu_k, block_size, causal, scale, method)
    out, lse = _dispatch_forward(q, *sub.sanitized(k, v), block_indices, cu_q, cu_k, block_size, causal, scale, method)
    static = _static_layout(sub.cu_q, sub.cu_k, block_size, q.device)
    o, l = _forward(q[sub.tq], k[sub.tk], v[sub.tk], static, block_indices[sub.tq], causal, scale, finite=False)
    out, lse = out.clone(), lse.clone()  # may be views of a kernel's result
    out[sub.tq], lse[sub.tq] = o, l
    return out, lse


def _dispatch_forward(q, k, v, block_indices, cu_q, cu_k, block_size, causal, scale, method):
    if method == "dense_mask":
        return _dense_mask_forward(q, k, v, block_indices, cu_q, block_size, causal, scale)
    static = _static_layout(cu_q, cu_k, block_size, q.device)
    if _flash_applicable(q, static, block_indices, causal):
        return _flash_forward(q, k, v, static, block_indices, causal, scale)
    return _forward(q, k, v, static, block_indices, causal, scale)


@torch_attention_fwd.register_fake
def _(q, k, v, block_indices, cu_q, cu_k, block_size, causal, scale, method="tile"):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=_compute_dtype(q.dtype))


@torch.library.custom_op("moba::torch_attention_bwd", mutates_args=())
def torch_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_indices: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    block_size: int,
    causal: bool,
    scale: float,
    method: str = "tile",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoBA backward: (dq, dk, dv) in the dtypes of q, k, v."""
    if q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    sub = _NonFiniteSequences.find(k, v, cu_q, cu_k)
    if sub is None:
        return _dispatch_backward(dout, q, k, v, out, lse, block_indices, cu_q, cu_k, block_size, causal, scale, method)
    # The other sequences as without the non-finite ones (their rows of out / lse zeroed, so that
    # nothing non-finite enters), then the non-finite sequences alone through the exact tiles.
    q_rows = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    q_rows[sub.tq] = True
    out_s, lse_s = out.masked_fill(q_rows[:, None, None], 0), lse.masked_fill(q_rows[:, None], 0)
    dq, dk, dv = _dispatch_backward(dout, q, *sub.sanitized(k, v), out_s, lse_s, block_indices, cu_q, cu_k,
                                    block_size, causal, scale, method)
    static = _static_layout(sub.cu_q, sub.cu_k, block_size, q.device)
    gq, gk, gv = _backward(q[sub.tq], k[sub.tk], v[sub.tk], out[sub.tq], lse[sub.tq], dout[sub.tq], static,
                           block_indices[sub.tq], causal, scale, finite=False)
    dq, dk, dv = dq.clone(), dk.clone(), dv.clone()
    dq[sub.tq], dk[sub.tk], dv[sub.tk] = gq, gk, gv
    return dq, dk, dv


def _dispatch_backward(dout, q, k, v, out, lse, block_indices, cu_q, cu_k, block_size, causal, scale, method):
    if method == "dense_mask":
        return _dense_mask_backward(dout, q, k, v, out, lse, block_indices, cu_q, block_size, causal, scale)
    static = _static_layout(cu_q, cu_k, block_size, q.device)
    if _flash_applicable(q, static, block_indices, causal):
        return _flash_backward(q, k, v, out, lse, dout, static, block_indices, causal, scale)
    return _backward(q, k, v, out, lse, dout, static, block_indices, causal, scale)


@torch_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, block_indices, cu_q, cu_k, block_size, causal, scale, method="tile"):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


register_attention_autograd(torch_attention_fwd, torch_attention_bwd)


@torch.library.custom_op("moba::torch_gate", mutates_args=())
def torch_gate(
    q: torch.Tensor, k: torch.Tensor, cu_q: list[int], cu_k: list[int], block_size: int, top_k: int, causal: bool
) -> torch.Tensor:
    """``moba.ops.gate.select_packed`` as an op: (Tq, Hq, width) int32 local block indices."""
    static = _static_layout(cu_q, cu_k, block_size, q.device)
    return select_packed(q, k, static.layout, top_k, causal).to(torch.int32)


@torch_gate.register_fake
def _(q, k, cu_q, cu_k, block_size, top_k, causal):
    return q.new_empty((q.shape[0], q.shape[1], gate_width(max_blocks(cu_k, block_size), top_k)), dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# The gated entry point (moba_attn_func / moba_attn_varlen_func without block_indices)


def _sdpa(q, k, v, scale, causal: bool) -> torch.Tensor:
    """(N, L, Hq, D) x (N, Lk, Hkv, D) -> (N, L, Hq, D) via torch SDPA (native GQA)."""
    gqa = True if q.shape[2] != k.shape[2] else False  # a plain bool (a guard, not a SymBool) under compile
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale, enable_gqa=gqa
    )
    return out.transpose(1, 2)


def _uniform_length(cu_q: list[int], cu_k: list[int]):
    """L when every sequence has L queries and L keys (self-attention, one length), else None."""
    if len(cu_q) != len(cu_k) or len(cu_q) < 2:
        return None
    length = cu_q[1] - cu_q[0]
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True):
        if b - a != length or d - c != length or a != c:
            return None
    return length


def _dense_attention_packed(q, k, v, cu_q, cu_k, causal, scale) -> torch.Tensor:
    """Dense attention (what MoBA is when top_k covers every block) over packed sequences."""
    length = _uniform_length(cu_q, cu_k)
    if length is not None:
        n = len(cu_q) - 1
        return _sdpa(*(x.view(n, length, *x.shape[1:]) for x in (q, k, v)), scale, causal).reshape(q.shape)
    parts = []
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True):
        if b == a:
            continue
        if causal and b - a != d - c:  # queries aligned to the end of their keys: bottom-right mask
            pos = torch.arange(d - c, device=q.device)
            mask = pos[None, :] <= pos[d - c - (b - a) :, None]
            gqa = q.shape[1] != k.shape[1]
            part = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1),
                                                  v[c:d].transpose(0, 1), attn_mask=mask, scale=scale,
                                                  enable_gqa=gqa).transpose(0, 1)
        else:
            part = _sdpa(q[None, a:b], k[None, c:d], v[None, c:d], scale, causal)[0]
        parts.append(part)
    return torch.cat(parts, dim=0) if parts else torch.zeros_like(q)


def gated_path(cu_q: list[int], cu_k: list[int], n_heads: int, block_size: int, top_k: int, device="cpu") -> str:
    """Which formulation ``moba_attention_packed`` runs: "dense", "dense_mask" or "tile"."""
    if top_k >= max_blocks(cu_k, block_size):
        return "dense"
    length = _uniform_length(cu_q, cu_k)
    if length is not None and torch.device(device).type == "cpu":
        pair_ratio = length / (2 * (top_k - 0.5) * block_size)
        mask_elements = (len(cu_q) - 1) * n_heads * length * length
        if pair_ratio < _DENSE_MASK_MAX_PAIR_RATIO and mask_elements <= _DENSE_MASK_MAX_ELEMENTS:
            return "dense_mask"
    return "tile"


def moba_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    block_size: int,
    top_k: int,
    causal: bool,
    softmax_scale: float,
) -> torch.Tensor:
    """MoBA attention with the gate, in the cheapest exact formulation (PyTorch, autograd).

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D); cu_q / cu_k: host lists (SymInts under torch.compile)
    of the N + 1 sequence boundaries. Returns (Tq, Hq, D) in q's dtype.

    * "dense": top_k covers every block of every sequence: dense attention (torch SDPA), no gate;
    * "dense_mask": CPU, one length L for all sequences, L short relative to top_k * block_size:
      the gate, then dense attention under the selection mask (CPU flash kernels);
    * "tile": the gate, then the tile path.
    The choice depends on lengths only: under torch.compile it is a guard, not a recompile per length.
    """
    if q.shape[0] == 0:
        return q.clone()  # clone keeps the graph
    path = gated_path(cu_q, cu_k, q.shape[1], block_size, top_k, q.device)
    if path == "dense":
        sub = None if torch.compiler.is_compiling() else _NonFiniteSequences.find(k, v, cu_q, cu_k)
        if sub is None:
            return _dense_attention_packed(q, k, v, cu_q, cu_k, causal, softmax_scale)
        # SDPA lets a masked non-finite value through (0 * NaN in P @ V): those sequences run the
        # tiles (over every block), the others SDPA exactly as without them.
        out = _dense_attention_packed(q, *sub.sanitized(k, v), cu_q, cu_k, causal, softmax_scale)
        qs, ks, vs = q[sub.tq], k[sub.tk], v[sub.tk]
        block_indices = torch_gate(qs.detach(), ks.detach(), sub.cu_q, sub.cu_k, block_size, top_k, causal)
        part = torch_attention_fwd(qs, ks, vs, block_indices, sub.cu_q, sub.cu_k, block_size, causal, softmax_scale)[0]
        return out.index_copy(0, sub.tq, part)
    block_indices = torch_gate(q.detach(), k.detach(), cu_q, cu_k, block_size, top_k, causal)
    return torch_attention_fwd(q, k, v, block_indices, cu_q, cu_k, block_size, causal, softmax_scale, path)[0]


def sparse_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    block_indices: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention of packed queries over given key blocks: the tile path (PyTorch, autograd).

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D); block_indices: (Tq, Hq, n_slots) local block indices
    (validated, PAD_INDEX-padded). Returns the output (Tq, Hq, D) in q's dtype and the
    log-sum-exp (Tq, Hq) of the scaled scores (float32; float64 for float64 inputs).
    """
    if q.shape[0] == 0:
        return q.clone(), q.new_zeros(q.shape[:2], dtype=_compute_dtype(q.dtype))  # clone keeps the graph
    return torch_attention_fwd(
        q, k, v, block_indices, list(layout.cu_q), list(layout.cu_k), int(layout.block_size), bool(causal),
        float(softmax_scale),
    )
