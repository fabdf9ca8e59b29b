"""MoBA attention kernels (forward, backward dq, backward dk/dv) and their launchers.

Work decomposition (chosen deliberately; two for the forward and dq, picked per call):

* "union" (per query tile): one program per (tile of ``BLOCK_M`` consecutive queries of one
  sequence, query head) walks the *union* of the key blocks its rows selected, in ascending
  order, with a k-way merge of the rows' sorted index lists (the next block is the smallest
  current index over the rows; rows that chose it are "on", the others are masked to -inf).
  One online softmax per row: no partial results in global memory, no merge pass, no
  atomics, O(|union|) merge steps per tile whatever the number of slots. Its cost is MMA
  work on rows that did not choose a block of the union: cheap when neighbouring queries
  pick the same blocks (they always share the own block), but on uncorrelated selections
  (random inputs: 64 queries x 2 random picks) the union approaches every past block, i.e.
  dense causal attention.
* "gather" (per key block, as the MoBA reference implementation does with flash-attn
  varlen): the launcher groups, with a stable sort, the (token, query head) rows that chose
  each (key block, KV head) pair; one program per chunk of ``BLOCK_M`` of those rows
  computes a partial softmax over that block only and writes a partial (out, lse) (forward)
  or a partial dq (backward) per (row, slot); the launcher merges the ``n_slots`` partials of
  every row in slot order (log-sum-exp weights / a sum): no wasted MMA rows, deterministic,
  but ``n_slots`` float32 partial rows per query go through global memory.
* ``choose_decomposition`` ("auto") counts the MMA rows each would compute (union blocks x
  BLOCK_M vs. selecting rows rounded up to BLOCK_M per pair) and picks union unless it does
  more than 1.5x the gather work (the margin pays for the merge traffic). Both paths are
  exact; the choice only moves work.
* dk/dv: always per key tile: one program per (``BLOCK_N`` key tile of one key block, KV
  head) loops over the gathered rows that chose the block (query heads of a GQA group land in
  the same list, so K/V are never repeated) and accumulates dk, dv in registers. A block
  chosen by many rows (a "sink") has its list split into chunks, one program each, whose
  float32 partials ``_dkdv_reduce_kernel`` sums in chunk order (``dkdv_work``): no atomics,
  deterministic (stable row order, fixed chunk order).

Masks: rows past the end of a sequence, keys past the end of a tail block, head-dim
padding to the next power of two (``HEAD_DIM`` is the padded size, ``d_real`` the real
one), the per-row block selection, and (causal) key position <= query position.
Scores use base-2 exponentials (``exp2``) with ``scale * log2(e)`` folded in; the stored
log-sum-exp is natural-log based, float32, per (token, query head).

Inputs are packed varlen: q (Tq, Hq, D), k/v (Tk, Hkv, D); sequence n owns query tokens
``cu_q[n]:cu_q[n+1]`` and key tokens ``cu_k[n]:cu_k[n+1]``; queries are aligned to the end
of their key sequence (``cu_q == cu_k`` for self-attention, fewer queries for decoding).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

#: Value that replaces a padding slot in the sorted block-index tensor the kernels read.
BIG_INDEX = 1 << 30

# Tile configurations, keyed by the padded head dim. The launchers and the ahead-of-time
# compile tests both read these tables (tests enumerate ``kernel_configs()``).
# (BLOCK_M, BLOCK_N, num_warps, num_stages); for dk/dv BLOCK_M counts query rows per step and
# BLOCK_N the keys a program owns.
#
# Chosen from the static report (bench/kernel_report.py, triton 3.9.0, bf16 = fp16, no GPU):
# zero spills and zero LDL/STL on sm_90 *and* sm_80, every matmul a wgmma on sm_90, and a
# wgmma M side of 64 rows per warpgroup (4 warps per 64 rows: 8 warps on 64 rows made both
# warpgroups share one 64-row score tile). Registers sm_90 / sm_80 (+ spill bytes if any),
# "TMA" = K/V through tensor descriptors (``TMA_HEAD_DIMS``; sm_80 compiles the same
# specialisation, the launcher never passes it there):
#   fwd  D=128: (128, 32, 8, 1) TMA 197 / 228, plain 213 / 218   [(64, 64, 8, 2) 238 / 255 with
#               rows shared by the warpgroups; (128, 64, 8, 2) 251 / 255 + 16 B;
#               (128, 64, 8, 1) 233 / 255 + 60 B; (64, 64, 4, 2) 255 + 344 B]
#   fwd  D=64:  (64, 64, 4, 2)  TMA 167 / 255, plain 214 / 252   [(128, 64, 8, 2) 208 / 255 + 92 B]
#   dq   D=128: (128, 32, 8, 1) plain 209 / 255   [TMA 180 / 255 + 12 B; TMA (128, 16, 8, 1)
#               166 / 220 but 16-key steps; (128, 64, 8, 2) 254 / 255 + 136 B; (64, 64, 8, 2) 255 / 255]
#   dq   D=64:  (64, 32, 4, 1)  TMA 155 / 228   [TMA (64, 32, 4, 2) 161 / 255 + 16 B;
#               plain (64, 64, 4, 2) 251 / 255 + 84 B; (64, 64, 8, 2) 200 / 255 + 52 B]
#   dkdv D=128: (16, 128, 8, 2) 207 / 239   [(32, 128, 8, 2) 243 / 255 + 80 B; (64, 64, 8, 2) 255 + 160 B;
#               (32, 64, 4, 2) 250 / 254, but twice the q/dO reads per key]
#   dkdv D=64:  (32, 128, 8, 2) 181 / 213   [(64, 64, 4, 2) 245 / 255; (64, 128, 8, 2) 245 / 255 + 72 B]
# (the dk/dv kernel computes transposed (keys x rows) tiles, so its 128 keys are the wgmma M
# side: 64 keys per warpgroup; its K/V tile is loaded once per program, so no TMA there).
# Occupancy: 1 CTA of 8 warps or 2 of 4 per SM (3 of 4 for the D=64 TMA forward and dq):
# registers, not shared memory, limit it. Other head dims: untuned, compile-tested.
FWD_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    128: (128, 32, 8, 1),
    256: (64, 32, 8, 1),
}
DQ_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 32, 4, 1),
    128: (128, 32, 8, 1),
    256: (64, 32, 8, 1),
}
# The gather kernels (forward, dq) keep the tables they had (their own tuning).
FWD_GATHER_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    128: (64, 64, 8, 2),
    256: (64, 32, 8, 1),
}
DQ_GATHER_CONFIGS = dict(FWD_GATHER_CONFIGS)
DKDV_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (32, 128, 8, 2),
    128: (16, 128, 8, 2),
    256: (32, 64, 8, 1),
}


#: K/V loads of the union forward and dq through TMA tensor descriptors: None = automatic
#: (``tma_loads``), True / False force it (tests run the descriptor path in the interpreter).
TMA_LOADS: bool | None = None
#: Head dims whose union kernels use TMA K/V loads (from the static report, see the tables):
#: dq at D=128 would need BLOCK_N = 16 to stay spill-free with them on sm_80's compile.
TMA_HEAD_DIMS = {"fwd": (64, 128), "dq": (64,)}


def _scratch_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_loads(kernel: str, head_dim: int, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the union ``kernel`` ("fwd" or "dq") loads K/V through device-side TMA
    descriptors (its ``USE_TMA``) at padded head dim ``head_dim``.

    Triton 3.9 dropped ``tl.make_block_ptr``; ``tl.make_tensor_descriptor`` compiles to TMA
    (UTMALDG) on sm_90. Used for the (kernel, head dim) pairs in ``TMA_HEAD_DIMS`` when the
    active Triton target is CUDA sm_90+ and TMA's alignment rules hold for k and v: 16-byte
    aligned base, token and head strides (so every head's rows start 16-byte aligned). The
    descriptors live in a per-launch global scratch buffer (128 B each, two per program) that
    Triton takes from ``triton.set_allocator``: if none is set, a torch one is installed.
    """
    if TMA_LOADS is not None:
        return bool(TMA_LOADS)
    if head_dim not in TMA_HEAD_DIMS[kernel]:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception:  # noqa: BLE001 - no usable driver: plain loads
        return False
    if target.backend != "cuda" or not isinstance(target.arch, int) or target.arch < 90:
        return False
    for t in (k, v):
        es = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * es) % 16 or (t.stride(1) * es) % 16:
            return False
    from triton.runtime import _allocation  # Triton's own allocator slot (no public getter)

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch_allocator)
    return True


#: dk/dv: a (key block, KV head) pair's row list longer than this many rows is split into
#: chunks of this many rows, one program each, whose float32 partials a second kernel sums in
#: chunk order. None: automatic (``dkdv_work``). Tests set it small to run the split path.
DKDV_SPLIT_ROWS: int | None = None
#: Smallest automatic split (rows): below it one pass costs less than the partials' traffic.
DKDV_MIN_SPLIT_ROWS = 4096


class DkdvWork(NamedTuple):
    """The dk/dv grid's work items (one program per item and key tile) and the heavy pairs' reduce."""

    pair: torch.Tensor  # (I,) int32 (global block, KV head) pair of every item
    begin: torch.Tensor  # (I,) int32 first position in ``rows``
    end: torch.Tensor  # (I,) int32 one past the last position
    part: torch.Tensor  # (I,) int32 partial index of a heavy pair's chunk, -1 = the whole list
    red_pair: torch.Tensor  # (R,) int32 heavy pairs
    red_first: torch.Tensor  # (R,) int32 first partial of each heavy pair (its chunks are consecutive)
    red_count: torch.Tensor  # (R,) int32 chunks of each heavy pair
    n_parts: int  # total partials (sum of red_count)


def dkdv_work(row_ptr: torch.Tensor, block_m: int, split_rows: int | None = None) -> DkdvWork:
    """Split the row lists of heavy (key block, KV head) pairs for the dk/dv kernel (issue 14, item 5).

    A block chosen by every query (a "sink", e.g. block 0) would otherwise keep one program per
    key tile walking all its rows while the rest of the GPU idles. A pair with more than
    ``split_rows`` rows becomes ceil(rows / split_rows) chunks; each writes float32 partial
    dk/dv that ``_dkdv_reduce_kernel`` sums in chunk order (deterministic, no atomics). Other
    pairs (the common case) stay one pass writing dk/dv directly.

    Automatic ``split_rows`` (None and ``DKDV_SPLIT_ROWS`` None): twice the mean rows per pair,
    rounded up to ``block_m``, at least ``DKDV_MIN_SPLIT_ROWS``: no program walks more than
    about twice the mean, and the partials number at most half the pairs, so their memory is
    at most 4 B x Tk x Hkv x D (twice k's size in 16 bits). row_ptr: (P + 1,) int32.
    """
    if split_rows is None:
        split_rows = DKDV_SPLIT_ROWS
    counts = (row_ptr[1:] - row_ptr[:-1]).long()  # (P,)
    n_pairs = counts.numel()
    if split_rows is None:
        mean = -(-int(row_ptr[-1]) // max(1, n_pairs))
        split_rows = max(DKDV_MIN_SPLIT_ROWS, -(-2 * mean // block_m) * block_m)
    if not isinstance(split_rows, int) or isinstance(split_rows, bool) or split_rows < 1:
        raise ValueError(f"dkdv_split_rows must be a positive int or None, got {split_rows!r}")
    dev = row_ptr.device
    heavy = counts > split_rows  # (P,)
    n_items = torch.where(heavy, (counts + split_rows - 1) // split_rows, 1)  # (P,)
    pair = torch.repeat_interleave(torch.arange(n_pairs, device=dev), n_items)  # (I,)
    first = torch.cumsum(n_items, 0) - n_items  # (P,) first item of every pair
    local = torch.arange(pair.numel(), device=dev) - first[pair]  # (I,) chunk index inside its pair
    begin = row_ptr[:-1].long()[pair] + local * split_rows
    end = torch.minimum(begin + split_rows, row_ptr[1:].long()[pair])
    is_part = heavy[pair]  # (I,)
    part = torch.where(is_part, torch.cumsum(is_part.long(), 0) - 1, -1)  # (I,)
    red_pair = heavy.nonzero().squeeze(1)  # (R,)
    red_first = part[first[red_pair]]
    red_count = n_items[red_pair]
    i32 = dict(dtype=torch.int32)
    return DkdvWork(pair.to(**i32), begin.to(**i32), end.to(**i32), part.to(**i32), red_pair.to(**i32),
                    red_first.to(**i32), red_count.to(**i32), int(is_part.sum()))


def padded_head_dim(d: int) -> int:
    """Head dim rounded up to a power of two (at least 16, the smallest tl.dot size)."""
    if d > 256:
        raise ValueError(f"the Triton backend supports head dims up to 256, got {d}")
    return max(16, triton.next_power_of_2(d))


@triton.jit
def query_tile(pid, TILE_SEQ, TILE_START, CU_Q, CU_K, n_heads_q):
    """1-D program id (query heads fastest) -> (query head, sequence, first query token of the
    tile, the sequence's query range q0:q1 and key range k0:k1), all int64 scalars."""
    pid_m = pid // n_heads_q
    pid_h = pid % n_heads_q
    seq = tl.load(TILE_SEQ + pid_m).to(tl.int64)
    q_start = tl.load(TILE_START + pid_m).to(tl.int64)
    q0 = tl.load(CU_Q + seq).to(tl.int64)
    q1 = tl.load(CU_Q + seq + 1).to(tl.int64)
    k0 = tl.load(CU_K + seq).to(tl.int64)
    k1 = tl.load(CU_K + seq + 1).to(tl.int64)
    return pid_h, seq, q_start, q0, q1, k0, k1


@triton.jit
def next_union_block(idx_row, cur, sel, slot, n_slots, BIG: tl.constexpr):
    """One step of the k-way merge over the rows' sorted index lists: the rows that took the
    current block (``sel``) move to their next slot. Returns the rows' new current blocks
    (BLOCK_M,), their cursors (BLOCK_M,) and the next block of the union (scalar, BIG = done)."""
    slot = slot + sel.to(tl.int32)
    nxt = tl.load(idx_row + slot, mask=sel & (slot < n_slots), other=BIG)  # (BLOCK_M,)
    cur = tl.where(sel, nxt, cur)
    return cur, slot, tl.min(cur, axis=0)


@triton.jit
def gather_chunk(pid, CHUNK_PAIR, CHUNK_START, ROW_PTR, BLOCK_START, BLOCK_LEN, ROWS, Q_KEY_TOKEN,
                 n_heads_q, n_heads_kv, causal, BLOCK_M: tl.constexpr):
    """1-D program id of a "gather" kernel -> its chunk of BLOCK_M rows that selected one (key
    block, KV head) pair: positions in ROWS (BLOCK_M,) and their mask, the rows' token / query
    head / key-token position (BLOCK_M,), the KV head, the block's first key token and length,
    and how many of its keys any row of the chunk may see (n_end; causal cuts the tail)."""
    pair = tl.load(CHUNK_PAIR + pid).to(tl.int64)
    r0 = tl.load(CHUNK_START + pid).to(tl.int64)
    r_end = tl.load(ROW_PTR + pair + 1).to(tl.int64)
    block = pair // n_heads_kv
    kv_head = pair % n_heads_kv
    block_start = tl.load(BLOCK_START + block).to(tl.int64)
    block_len = tl.load(BLOCK_LEN + block).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_M)
    r_ok = offs_r < r_end
    row = tl.load(ROWS + offs_r, mask=r_ok, other=0).to(tl.int64)  # token * Hq + head
    tok = row // n_heads_q
    head = row % n_heads_q
    q_tok = tl.load(Q_KEY_TOKEN + tok, mask=r_ok, other=0).to(tl.int64)
    # Causal: keys after the chunk's last query are masked for every row.
    q_tok_last = tl.max(tl.where(r_ok, q_tok, -1), 0)
    n_end = tl.where(causal != 0, tl.minimum(block_len, q_tok_last - block_start + 1), block_len)
    return offs_r, r_ok, row, tok, head, q_tok, kv_head, block_start, block_len, n_end


@triton.jit
def gather_block_scores(q, K, stride_kt, stride_kh, kv_head, block_start, block_len, n0, offs_n, offs_d, d_ok,
                        r_ok, q_tok, qk_scale, causal):
    """Keys n0:n0+BLOCK_N of a gather chunk's block: the key tile (BLOCK_N, HEAD_DIM), its
    global key tokens and load mask, and the rows' scaled scores (BLOCK_M, BLOCK_N, log2
    units) with the mask of the (row, key) pairs that count."""
    k_ok = (n0 + offs_n) < block_len
    k_tok = block_start + n0 + offs_n  # global key token
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + k_tok[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    valid = r_ok[:, None] & k_ok[None, :]
    valid = valid & ((k_tok[None, :] <= q_tok[:, None]) | (causal == 0))
    return k, k_tok, kv_mask, s, valid


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, IDX,
    TILE_SEQ, TILE_START, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    scale, n_heads_q, group, n_slots, block_size, causal, d_real,
    BIG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    # 1-D grid, query heads fastest: the heads of a GQA group run side by side and share
    # their K/V tiles through L2; no grid dimension limit (65535) on long inputs.
    pid = tl.program_id(0).to(tl.int64)
    pid_h, seq, q_start, q0, q1, k0, k1 = query_tile(pid, TILE_SEQ, TILE_START, CU_Q, CU_K, n_heads_q)
    kv_head = pid_h // group
    seq_len_k = k1 - k0

    offs_m = q_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query token
    row_ok = offs_m < q1  # (BLOCK_M,)
    # Positions inside the key sequence: the tile's first query and the tile's last one.
    q_pos0 = q_start - q0 + (seq_len_k - (q1 - q0))  # scalar
    q_pos_last = tl.minimum(q_start + BLOCK_M, q1) - 1 - q0 + (seq_len_k - (q1 - q0))  # scalar
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_mi = tl.arange(0, BLOCK_M)  # (BLOCK_M,) int32 row offset inside the tile

    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    q = tl.load(
        Q + offs_m[:, None] * stride_qt + pid_h * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # (BLOCK_M, HEAD_DIM)

    idx_row = IDX + (offs_m * n_heads_q + pid_h) * n_slots  # (BLOCK_M,) pointers to index rows
    slot = tl.zeros([BLOCK_M], dtype=tl.int32)  # (BLOCK_M,) merge cursor per row
    cur = tl.load(idx_row, mask=row_ok, other=BIG)  # (BLOCK_M,) next block of every row
    j = tl.min(cur, axis=0)  # scalar: next block of the union

    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # (BLOCK_M,) running max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # (BLOCK_M,) running sum
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # (BLOCK_M, HEAD_DIM)

    while j < BIG:
        sel = cur == j  # (BLOCK_M,) rows that selected block j
        block_first = j.to(tl.int64) * block_size
        block_len = tl.minimum(seq_len_k - block_first, block_size)
        # Causal: keys after the tile's last query are masked for every row (own block).
        n_end = tl.where(causal != 0, tl.minimum(block_len, q_pos_last - block_first + 1), block_len)
        # int32 query positions relative to the block's first key (the causal mask's compare)
        q_rel = (q_pos0 - block_first).to(tl.int32) + offs_mi  # (BLOCK_M,)
        k_blk = K + (k0 + block_first) * stride_kt + kv_head * stride_kh  # scalar: the block's first key
        v_blk = V + (k0 + block_first) * stride_vt + kv_head * stride_vh
        if USE_TMA:  # sm_90 TMA: descriptors bounded by this block and the real head dim (zero fill
            # past them: a tail block never reads the next sequence's keys); see tma_loads()
            k_desc = tl.make_tensor_descriptor(k_blk, shape=[block_len.to(tl.int32), d_real], strides=[stride_kt, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
            v_desc = tl.make_tensor_descriptor(v_blk, shape=[block_len.to(tl.int32), d_real], strides=[stride_vt, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
        for n0 in range(0, n_end, BLOCK_N):
            k_rel = n0 + offs_n  # (BLOCK_N,) key offset inside the block
            k_ok = k_rel < block_len  # (BLOCK_N,)
            kv_mask = k_ok[:, None] & d_ok[None, :]  # (BLOCK_N, HEAD_DIM)
            # int64 scalar tile base + int32 in-tile offsets: fewer registers than int64 pointer
            # tiles (BLOCK_N * stride_kt < 2**31 as Hkv <= 65535 and D <= 256)
            if USE_TMA:
                k = k_desc.load([tl.cast(n0, tl.int32), 0])  # (BLOCK_N, HEAD_DIM)
            else:
                k = tl.load(k_blk + n0 * stride_kt + (offs_n[:, None] * stride_kt + offs_d[None, :]),
                            mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) float32
            valid = sel[:, None] & k_ok[None, :]  # (BLOCK_M, BLOCK_N)
            valid = valid & ((k_rel[None, :] <= q_rel[:, None]) | (causal == 0))
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # (BLOCK_M,)
            alpha = tl.exp2(m_i - m_safe)  # (BLOCK_M,)
            p = tl.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
            l_i = l_i * alpha + tl.sum(p, 1)
            if USE_TMA:
                v = v_desc.load([tl.cast(n0, tl.int32), 0])  # (BLOCK_N, HEAD_DIM)
            else:
                v = tl.load(v_blk + n0 * stride_vt + (offs_n[:, None] * stride_vt + offs_d[None, :]),
                            mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # (BLOCK_M, HEAD_DIM)
            m_i = m_new
        cur, slot, j = next_union_block(idx_row, cur, sel, slot, n_slots, BIG)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # (BLOCK_M,)
    out = acc / l_safe[:, None]  # (BLOCK_M, HEAD_DIM)
    tl.store(O + offs_m[:, None] * stride_ot + pid_h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # (BLOCK_M,) natural log
    tl.store(LSE + offs_m * n_heads_q + pid_h, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, IDX,
    TILE_SEQ, TILE_START, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    scale, n_heads_q, group, n_slots, block_size, causal, d_real,
    BIG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    # 1-D grid, query heads fastest: the heads of a GQA group run side by side and share
    # their K/V tiles through L2; no grid dimension limit (65535) on long inputs.
    pid = tl.program_id(0).to(tl.int64)
    pid_h, seq, q_start, q0, q1, k0, k1 = query_tile(pid, TILE_SEQ, TILE_START, CU_Q, CU_K, n_heads_q)
    kv_head = pid_h // group
    seq_len_k = k1 - k0

    offs_m = q_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = offs_m < q1  # (BLOCK_M,)
    q_pos0 = q_start - q0 + (seq_len_k - (q1 - q0))  # scalar: the tile's first query in the key sequence
    q_pos_last = tl.minimum(q_start + BLOCK_M, q1) - 1 - q0 + (seq_len_k - (q1 - q0))  # scalar
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_mi = tl.arange(0, BLOCK_M)  # (BLOCK_M,) int32 row offset inside the tile
    row_mask = row_ok[:, None] & d_ok[None, :]  # (BLOCK_M, HEAD_DIM)

    q = tl.load(Q + offs_m[:, None] * stride_qt + pid_h * stride_qh + offs_d[None, :],
                mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + offs_m[:, None] * stride_dot + pid_h * stride_doh + offs_d[None, :],
                 mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
    lse2 = tl.load(LSE + offs_m * n_heads_q + pid_h, mask=row_ok, other=0.0) * 1.4426950408889634  # (BLOCK_M,)
    delta = tl.load(DELTA + offs_m * n_heads_q + pid_h, mask=row_ok, other=0.0)  # (BLOCK_M,)

    idx_row = IDX + (offs_m * n_heads_q + pid_h) * n_slots  # (BLOCK_M,)
    slot = tl.zeros([BLOCK_M], dtype=tl.int32)  # (BLOCK_M,)
    cur = tl.load(idx_row, mask=row_ok, other=BIG)  # (BLOCK_M,)
    j = tl.min(cur, axis=0)

    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # (BLOCK_M, HEAD_DIM)
    while j < BIG:
        sel = cur == j  # (BLOCK_M,)
        block_first = j.to(tl.int64) * block_size
        block_len = tl.minimum(seq_len_k - block_first, block_size)
        # Causal: keys after the tile's last query are masked for every row (own block).
        n_end = tl.where(causal != 0, tl.minimum(block_len, q_pos_last - block_first + 1), block_len)
        q_rel = (q_pos0 - block_first).to(tl.int32) + offs_mi  # (BLOCK_M,) query position - block's first key
        k_blk = K + (k0 + block_first) * stride_kt + kv_head * stride_kh  # scalar: the block's first key
        v_blk = V + (k0 + block_first) * stride_vt + kv_head * stride_vh
        if USE_TMA:  # sm_90 TMA: descriptors bounded by this block and the real head dim (zero fill
            # past them: a tail block never reads the next sequence's keys); see tma_loads()
            k_desc = tl.make_tensor_descriptor(k_blk, shape=[block_len.to(tl.int32), d_real], strides=[stride_kt, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
            v_desc = tl.make_tensor_descriptor(v_blk, shape=[block_len.to(tl.int32), d_real], strides=[stride_vt, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
        for n0 in range(0, n_end, BLOCK_N):
            k_rel = n0 + offs_n  # (BLOCK_N,) key offset inside the block
            k_ok = k_rel < block_len  # (BLOCK_N,)
            kv_mask = k_ok[:, None] & d_ok[None, :]  # (BLOCK_N, HEAD_DIM)
            if USE_TMA:
                k = k_desc.load([tl.cast(n0, tl.int32), 0])  # (BLOCK_N, HEAD_DIM)
                v = v_desc.load([tl.cast(n0, tl.int32), 0])  # (BLOCK_N, HEAD_DIM)
            else:  # int64 scalar tile base + int32 in-tile offsets (see _fwd_kernel)
                k = tl.load(k_blk + n0 * stride_kt + (offs_n[:, None] * stride_kt + offs_d[None, :]),
                            mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
                v = tl.load(v_blk + n0 * stride_vt + (offs_n[:, None] * stride_vt + offs_d[None, :]),
                            mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
            valid = sel[:, None] & k_ok[None, :]  # (BLOCK_M, BLOCK_N)
            valid = valid & ((k_rel[None, :] <= q_rel[:, None]) | (causal == 0))
            p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
            dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
            dq += tl.dot(ds.to(k.dtype), k)  # (BLOCK_M, HEAD_DIM)
        cur, slot, j = next_union_block(idx_row, cur, sel, slot, n_slots, BIG)

    dq = dq * scale
    tl.store(DQ + offs_m[:, None] * stride_dqt + pid_h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, PART_DK, PART_DV,
    ROWS, ITEM_PAIR, ITEM_BEGIN, ITEM_END, ITEM_PART, BLOCK_START, BLOCK_LEN, Q_KEY_TOKEN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    scale, n_heads_q, n_heads_kv, n_key_tiles, block_size, causal, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (work item, key tile): a work item is a (key block, KV head) pair's whole
    # row list, or one chunk of a heavy pair's list (see dkdv_work); chunks write float32
    # partials that _dkdv_reduce_kernel sums in chunk order.
    pid = tl.program_id(0).to(tl.int64)  # 1-D grid: no grid dimension limit on long inputs
    pid_n = pid % n_key_tiles  # key tile inside the block
    item = pid // n_key_tiles
    pair = tl.load(ITEM_PAIR + item).to(tl.int64)  # (global block, KV head) pair
    block = pair // n_heads_kv
    kv_head = pair % n_heads_kv
    block_len = tl.load(BLOCK_LEN + block).to(tl.int64)
    n0 = pid_n * BLOCK_N
    if n0 < block_len:
        tile_first = tl.load(BLOCK_START + block).to(tl.int64) + n0  # global token of the tile's first key
        offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        k_ok = (n0 + offs_n) < block_len  # (BLOCK_N,)
        offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
        d_ok = offs_d < d_real  # (HEAD_DIM,)
        kv_mask = k_ok[:, None] & d_ok[None, :]  # (BLOCK_N, HEAD_DIM)
        r_begin = tl.load(ITEM_BEGIN + item).to(tl.int64)
        r_end = tl.load(ITEM_END + item).to(tl.int64)
        live = (offs_n * 0 + (r_end - r_begin)) > 0  # (BLOCK_N,) false when no query chose this block
        load_mask = kv_mask & live[:, None]  # (BLOCK_N, HEAD_DIM): then no K/V traffic
        # int64 scalar tile base + int32 in-tile offsets (BLOCK_N * stride < 2**31: Hkv <= 65535, D <= 256)
        k = tl.load(K + tile_first * stride_kt + kv_head * stride_kh + (offs_n[:, None] * stride_kt + offs_d[None, :]),
                    mask=load_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(V + tile_first * stride_vt + kv_head * stride_vh + (offs_n[:, None] * stride_vt + offs_d[None, :]),
                    mask=load_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)  # (BLOCK_N, HEAD_DIM)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)  # (BLOCK_N, HEAD_DIM)
        qk_scale = scale * 1.4426950408889634
        offs_r = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        for r0 in range(r_begin, r_end, BLOCK_M):
            r_ok = (r0 + offs_r) < r_end  # (BLOCK_M,)
            row = tl.load(ROWS + r0 + offs_r, mask=r_ok, other=0).to(tl.int64)  # (BLOCK_M,) token * Hq + head
            tok = row // n_heads_q  # (BLOCK_M,)
            head = row % n_heads_q  # (BLOCK_M,)
            row_mask = r_ok[:, None] & d_ok[None, :]  # (BLOCK_M, HEAD_DIM)
            q = tl.load(Q + (tok * stride_qt + head * stride_qh)[:, None] + offs_d[None, :],
                        mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
            # int32 query position relative to the tile's first key (the causal compare)
            q_rel = (tl.load(Q_KEY_TOKEN + tok, mask=r_ok, other=0).to(tl.int64) - tile_first).to(tl.int32)  # (BLOCK_M,)
            lse2 = tl.load(LSE + row, mask=r_ok, other=0.0) * 1.4426950408889634  # (BLOCK_M,)
            # Transposed tiles (keys x rows): every matmul has the BLOCK_N keys as its M side,
            # one 64-row wgmma slice per warpgroup, and dk/dv accumulate without a transpose.
            s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M)
            valid = k_ok[:, None] & r_ok[None, :]  # (BLOCK_N, BLOCK_M)
            valid = valid & ((offs_n[:, None] <= q_rel[None, :]) | (causal == 0))
            p_t = tl.where(valid, tl.exp2(s_t - lse2[None, :]), 0.0)  # (BLOCK_N, BLOCK_M)
            do = tl.load(DO + (tok * stride_dot + head * stride_doh)[:, None] + offs_d[None, :],
                         mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
            dv += tl.dot(p_t.to(do.dtype), do)  # (BLOCK_N, HEAD_DIM)
            delta = tl.load(DELTA + row, mask=r_ok, other=0.0)  # (BLOCK_M,)
            dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M)
            dk += tl.dot(ds_t.to(q.dtype), q)  # (BLOCK_N, HEAD_DIM)
        part = tl.load(ITEM_PART + item)
        if part < 0:  # the pair's whole list: final dk, dv
            tl.store(DK + tile_first * stride_dkt + kv_head * stride_dkh + (offs_n[:, None] * stride_dkt + offs_d[None, :]),
                     (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
            tl.store(DV + tile_first * stride_dvt + kv_head * stride_dvh + (offs_n[:, None] * stride_dvt + offs_d[None, :]),
                     dv.to(DV.dtype.element_ty), mask=kv_mask)
        else:  # one chunk of a heavy pair: float32 partials (part, block_size, d_real)
            p_off = (part.to(tl.int64) * block_size + n0) * d_real
            tl.store(PART_DK + p_off + (offs_n[:, None] * d_real + offs_d[None, :]), dk, mask=kv_mask)
            tl.store(PART_DV + p_off + (offs_n[:, None] * d_real + offs_d[None, :]), dv, mask=kv_mask)


@triton.jit
def _dkdv_reduce_kernel(
    PART_DK, PART_DV, DK, DV, RED_PAIR, RED_FIRST, RED_COUNT, BLOCK_START, BLOCK_LEN,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    scale, n_heads_kv, n_key_tiles, block_size, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (heavy pair, key tile): the pair's chunk partials summed in chunk order
    # (deterministic, no atomics), then dk * scale and dv stored in the inputs' dtype.
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid % n_key_tiles
    red = pid // n_key_tiles
    pair = tl.load(RED_PAIR + red).to(tl.int64)
    block = pair // n_heads_kv
    kv_head = pair % n_heads_kv
    block_len = tl.load(BLOCK_LEN + block).to(tl.int64)
    n0 = pid_n * BLOCK_N
    if n0 < block_len:
        tile_first = tl.load(BLOCK_START + block).to(tl.int64) + n0
        first = tl.load(RED_FIRST + red).to(tl.int64)
        count = tl.load(RED_COUNT + red)
        offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
        mask = ((n0 + offs_n) < block_len)[:, None] & (offs_d < d_real)[None, :]  # (BLOCK_N, HEAD_DIM)
        tile = offs_n[:, None] * d_real + offs_d[None, :]  # (BLOCK_N, HEAD_DIM) int32
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for c in range(0, count):
            p_off = ((first + c) * block_size + n0) * d_real
            dk += tl.load(PART_DK + p_off + tile, mask=mask, other=0.0)
            dv += tl.load(PART_DV + p_off + tile, mask=mask, other=0.0)
        tl.store(DK + tile_first * stride_dkt + kv_head * stride_dkh + (offs_n[:, None] * stride_dkt + offs_d[None, :]),
                 (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + tile_first * stride_dvt + kv_head * stride_dvh + (offs_n[:, None] * stride_dvt + offs_d[None, :]),
                 dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_gather_kernel(
    Q, K, V, PART_O, PART_LSE,
    ROWS, CHUNK_PAIR, CHUNK_START, ROW_PTR, BLOCK_START, BLOCK_LEN, Q_KEY_TOKEN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    scale, n_heads_q, n_heads_kv, causal, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per chunk of BLOCK_M rows (token, query head) that selected one
    # (key block, KV head) pair: a partial softmax over that block only, written to
    # PART_O / PART_LSE at the rows' positions in ROWS (merged by the launcher).
    pid = tl.program_id(0).to(tl.int64)
    offs_r, r_ok, row, tok, head, q_tok, kv_head, block_start, block_len, n_end = gather_chunk(
        pid, CHUNK_PAIR, CHUNK_START, ROW_PTR, BLOCK_START, BLOCK_LEN, ROWS, Q_KEY_TOKEN,
        n_heads_q, n_heads_kv, causal, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = r_ok[:, None] & d_ok[None, :]  # (BLOCK_M, HEAD_DIM)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)

    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # (BLOCK_M,)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # (BLOCK_M,)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # (BLOCK_M, HEAD_DIM)
    for n0 in range(0, n_end, BLOCK_N):
        _, k_tok, kv_mask, s, valid = gather_block_scores(
            q, K, stride_kt, stride_kh, kv_head, block_start, block_len, n0, offs_n, offs_d, d_ok,
            r_ok, q_tok, qk_scale, causal)  # s, valid: (BLOCK_M, BLOCK_N)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # (BLOCK_M,)
        alpha = tl.exp2(m_i - m_safe)  # (BLOCK_M,)
        p = tl.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + k_tok[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # (BLOCK_M, HEAD_DIM)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # (BLOCK_M,)
    tl.store(PART_O + offs_r[:, None] * d_real + offs_d[None, :], acc / l_safe[:, None], mask=row_mask)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # (BLOCK_M,)
    tl.store(PART_LSE + offs_r, lse, mask=r_ok)


@triton.jit
def _bwd_dq_gather_kernel(
    Q, K, V, DO, LSE, DELTA, PART_DQ,
    ROWS, CHUNK_PAIR, CHUNK_START, ROW_PTR, BLOCK_START, BLOCK_LEN, Q_KEY_TOKEN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    scale, n_heads_q, n_heads_kv, causal, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Same chunks as _fwd_gather_kernel; writes the rows' dq contribution of this block to
    # PART_DQ at their positions in ROWS (summed per row by the launcher, deterministically).
    pid = tl.program_id(0).to(tl.int64)
    offs_r, r_ok, row, tok, head, q_tok, kv_head, block_start, block_len, n_end = gather_chunk(
        pid, CHUNK_PAIR, CHUNK_START, ROW_PTR, BLOCK_START, BLOCK_LEN, ROWS, Q_KEY_TOKEN,
        n_heads_q, n_heads_kv, causal, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = r_ok[:, None] & d_ok[None, :]  # (BLOCK_M, HEAD_DIM)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + tok[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
                 mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
    lse2 = tl.load(LSE + row, mask=r_ok, other=0.0) * 1.4426950408889634  # (BLOCK_M,)
    delta = tl.load(DELTA + row, mask=r_ok, other=0.0)  # (BLOCK_M,)

    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # (BLOCK_M, HEAD_DIM)
    for n0 in range(0, n_end, BLOCK_N):
        k, k_tok, kv_mask, s, valid = gather_block_scores(
            q, K, stride_kt, stride_kh, kv_head, block_start, block_len, n0, offs_n, offs_d, d_ok,
            r_ok, q_tok, qk_scale, causal)  # k: (BLOCK_N, HEAD_DIM); s, valid: (BLOCK_M, BLOCK_N)
        v = tl.load(V + k_tok[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq += tl.dot(ds.to(k.dtype), k)  # (BLOCK_M, HEAD_DIM)
    tl.store(PART_DQ + offs_r[:, None] * d_real + offs_d[None, :], dq * scale, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Launchers


def sort_block_indices(block_indices: torch.Tensor) -> torch.Tensor:
    """(Tq, Hq, n_slots) local block indices (PAD_INDEX = -1 anywhere) -> int32, ascending,
    padding replaced by ``BIG_INDEX`` (what the kernels' merge loop reads)."""
    idx = block_indices.to(torch.int32)
    idx = torch.where(idx < 0, torch.full_like(idx, BIG_INDEX), idx)
    return idx.sort(dim=-1).values.contiguous()


def query_tiles(cu_q: list[int], block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of ``block_m`` consecutive queries that never cross a sequence boundary.

    Returns (tile_seq, tile_start), int32 (n_tiles,): sequence id and first query token.
    """
    seqs, starts = [], []
    for n, (a, b) in enumerate(zip(cu_q[:-1], cu_q[1:], strict=True)):
        for s in range(a, b, block_m):
            seqs.append(n)
            starts.append(s)
    kw = dict(dtype=torch.int32, device=device)
    return torch.tensor(seqs, **kw), torch.tensor(starts, **kw)


#: Largest value an int32 index tensor (or a CUDA grid's x dimension) holds.
INT32_MAX = 2**31 - 1


def _check_inputs(q, k, v, n_slots: int = 1):
    """Reject only what the launchers cannot index. Pointer offsets are int64 in every kernel
    (program ids and loaded indices are cast before the pointer math), so element counts such
    as T * Hq * D are not limited (S = 512K or 1M with 32 heads is fine). What is 32-bit:

    * the "gather" row ids ``token * Hq + head`` (``rows``, int32) and the union / gate grids
      (at most one program per (token, query head)): Tq * Hq <= 2**31 - 1;
    * positions in ``rows`` (``row_ptr``, chunk starts, int32; also the gather grid) up to the
      selected (row, slot) count, at most Tq * Hq * n_slots: <= 2**31 - 1;
    * token indices (``cu_seqlens``, tile starts, block starts, query key tokens, int32):
      Tq, Tk <= 2**31 - 1;
    * the block-mean kernel's grid is (blocks, Hkv): Hkv <= 65535 (a CUDA grid's y limit).

    The dk/dv grid (key tiles per block x blocks x Hkv) depends on the layout; a launch past
    the CUDA limit fails loudly at launch, it cannot corrupt memory.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    tq, hq = q.shape[0], q.shape[1]
    tk, hkv = k.shape[0], k.shape[1]
    if tq * hq > INT32_MAX:
        raise ValueError(f"q has {tq} tokens x {hq} heads = {tq * hq} rows; int32 row ids allow at most 2**31 - 1")
    if tq * hq * n_slots > INT32_MAX:
        raise ValueError(f"q tokens x heads x selected blocks = {tq} x {hq} x {n_slots} = {tq * hq * n_slots}; "
                         f"the int32 selection offsets allow at most 2**31 - 1")
    if max(tq, tk) > INT32_MAX:
        raise ValueError(f"at most 2**31 - 1 tokens (int32 token indices), got {tq} query and {tk} key tokens")
    if hkv > 65535:
        raise ValueError(f"at most 65535 KV heads (the block-mean grid's y dimension), got {hkv}")


class KernelLayout(NamedTuple):
    """What the launchers need of ``moba._layout.BlockLayout``, on q's device."""

    cu_q: list[int]  # host list (N + 1,)
    cu_q_t: torch.Tensor  # (N + 1,) int32
    cu_k_t: torch.Tensor  # (N + 1,) int32
    q_seq: torch.Tensor  # (Tq,) sequence of every query token
    q_key_token: torch.Tensor  # (Tq,) global key-token index of every query's position
    block_offset: torch.Tensor  # (N,) global id of every sequence's first block
    block_start: torch.Tensor  # (G,) first key token of every block
    block_len: torch.Tensor  # (G,) tokens of every block
    block_size: int


class _Selection(NamedTuple):
    """The selection grouped by (global block, KV head) pair ("gather" view)."""

    rows: torch.Tensor  # (nnz,) int32 row = token * Hq + head, grouped by pair, stable order
    row_ptr: torch.Tensor  # (P + 1,) int32, P = G * Hkv
    slot_pos: torch.Tensor  # (Tq * Hq, n_slots) int64 position in ``rows`` of every slot, -1 = padding


def _selection(sorted_indices: torch.Tensor, lay: KernelLayout, n_heads_kv: int) -> _Selection:
    tq, hq, n_slots = sorted_indices.shape
    n_pairs = lay.block_start.numel() * n_heads_kv
    flat = sorted_indices.reshape(-1)
    valid = (flat != BIG_INDEX).nonzero().squeeze(1)  # positions (token * Hq + head) * n_slots + slot
    row = valid // n_slots
    token = row // hq
    head = row % hq
    block = lay.block_offset[lay.q_seq[token]] + flat[valid].long()
    pair = block * n_heads_kv + head // (hq // n_heads_kv)
    order = torch.argsort(pair, stable=True)
    rows = row[order].to(torch.int32).contiguous()
    counts = torch.bincount(pair, minlength=n_pairs)
    row_ptr = torch.zeros(n_pairs + 1, dtype=torch.int32, device=flat.device)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    slot_pos = torch.full((flat.numel(),), -1, dtype=torch.int64, device=flat.device)
    slot_pos[valid[order]] = torch.arange(valid.numel(), device=flat.device)
    return _Selection(rows, row_ptr, slot_pos.view(tq * hq, n_slots))


def selection_rows(sorted_indices: torch.Tensor, lay: KernelLayout, n_heads_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (global block, KV head) pair, the rows ``token * Hq + head`` that selected it:
    (rows int32 (nnz,), row_ptr int32 (G * Hkv + 1,)), ascending rows inside a pair."""
    sel = _selection(sorted_indices, lay, n_heads_kv)
    return sel.rows, sel.row_ptr


def _chunks(sel: _Selection, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of ``block_m`` rows of one pair: (chunk_pair, chunk_start) int32, start = position in rows."""
    counts = (sel.row_ptr[1:] - sel.row_ptr[:-1]).long()
    n_chunks = (counts + block_m - 1) // block_m
    pair = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), n_chunks)
    first = torch.cumsum(n_chunks, 0) - n_chunks
    local = torch.arange(pair.numel(), device=counts.device) - first[pair]
    start = sel.row_ptr[:-1].long()[pair] + local * block_m
    return pair.to(torch.int32), start.to(torch.int32)


def choose_decomposition(sorted_indices: torch.Tensor, lay: KernelLayout, sel: _Selection, head_dim: int) -> str:
    """"union" or "gather" for the forward and dq, from the MMA rows each would compute.

    union: every (query tile, head) computes BLOCK_M rows for every block of its union;
    gather: every (block, KV head) pair computes its selecting rows, rounded up to BLOCK_M.
    The gather path also writes and merges n_slots partial results per row, hence the
    margin. (An untuned heuristic: no GPU measured it.)
    """
    tq, hq, n_slots = sorted_indices.shape
    bm_union = FWD_CONFIGS[head_dim][0]
    bm_gather = FWD_GATHER_CONFIGS[head_dim][0]
    cu = lay.cu_q_t.long()
    index_in_seq = torch.arange(tq, device=cu.device) - cu[lay.q_seq]
    tiles_per_seq = (cu[1:] - cu[:-1] + bm_union - 1) // bm_union
    tile = (torch.cumsum(tiles_per_seq, 0) - tiles_per_seq)[lay.q_seq] + index_in_seq // bm_union  # (Tq,)
    n_blocks = max(1, lay.block_start.numel())
    local = sorted_indices.long()  # (Tq, Hq, n_slots)
    key = (tile[:, None, None] * hq + torch.arange(hq, device=cu.device)[None, :, None]) * (n_blocks + 1)
    key = key + torch.where(local == BIG_INDEX, n_blocks, local)
    union_blocks = torch.unique(key[local != BIG_INDEX]).numel()
    counts = (sel.row_ptr[1:] - sel.row_ptr[:-1]).long()
    gather_rows = int(((counts + bm_gather - 1) // bm_gather).sum()) * bm_gather
    return "union" if union_blocks * bm_union <= 1.5 * gather_rows else "gather"


def _resolve(decomposition: str, sorted_indices, lay, sel, head_dim) -> str:
    if decomposition == "auto":
        return choose_decomposition(sorted_indices, lay, sel, head_dim)
    if decomposition not in ("union", "gather"):
        raise ValueError(f"decomposition must be 'auto', 'union' or 'gather', got {decomposition!r}")
    return decomposition


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sorted_indices: torch.Tensor,
    lay: KernelLayout,
    causal: bool,
    scale: float,
    decomposition: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA forward. q (Tq, Hq, D), k/v (Tk, Hkv, D) with unit last stride; sorted_indices
    (Tq, Hq, n_slots) int32 from ``sort_block_indices``. ``decomposition``: "union" (per query
    tile), "gather" (per key block, then a merge) or "auto" (``choose_decomposition``).
    Returns out (Tq, Hq, D) in q.dtype and lse (Tq, Hq) float32."""
    _check_inputs(q, k, v, sorted_indices.shape[-1])
    tq, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((tq, hq), dtype=torch.float32, device=q.device)
    if tq == 0:
        return out, lse
    head_dim = padded_head_dim(d)
    n_slots = sorted_indices.shape[-1]
    sel = _selection(sorted_indices, lay, hkv) if decomposition != "union" else None
    if _resolve(decomposition, sorted_indices, lay, sel, head_dim) == "union":
        block_m, block_n, warps, stages = FWD_CONFIGS[head_dim]
        tile_seq, tile_start = query_tiles(lay.cu_q, block_m, q.device)
        _fwd_kernel[(tile_seq.numel() * hq,)](
            q, k, v, out, lse, sorted_indices,
            tile_seq, tile_start, lay.cu_q_t, lay.cu_k_t,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            scale, hq, hq // hkv, n_slots, lay.block_size, int(causal), d,
            BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=tma_loads("fwd", head_dim, k, v),
            num_warps=warps, num_stages=stages,
        )
        return out, lse

    block_m, block_n, warps, stages = FWD_GATHER_CONFIGS[head_dim]
    chunk_pair, chunk_start = _chunks(sel, block_m)
    nnz = sel.rows.numel()
    part_o = torch.empty((nnz, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((nnz,), dtype=torch.float32, device=q.device)
    if chunk_pair.numel():
        _fwd_gather_kernel[(chunk_pair.numel(),)](
            q, k, v, part_o, part_lse,
            sel.rows, chunk_pair, chunk_start, sel.row_ptr,
            lay.block_start.to(torch.int32), lay.block_len.to(torch.int32), lay.q_key_token.to(torch.int32),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            scale, hq, hkv, int(causal), d,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages,
        )
    # Merge the n_slots partial results of every row (log-sum-exp weights), deterministic.
    present = sel.slot_pos >= 0  # (Tq * Hq, n_slots)
    pos = sel.slot_pos.clamp(min=0)
    slot_lse = torch.where(present, part_lse[pos], float("-inf"))  # (Tq * Hq, n_slots)
    row_lse = torch.logsumexp(slot_lse, dim=-1)  # (Tq * Hq,)
    weight = torch.where(present, torch.exp(slot_lse - row_lse[:, None]), 0.0)  # (Tq * Hq, n_slots)
    merged = torch.zeros((tq * hq, d), dtype=torch.float32, device=q.device)
    for s in range(n_slots):
        # where(), not weight 0 times the partial: a padding slot reads rows[0]'s partial, which
        # belongs to another row (often another sequence) and may be NaN; 0 * NaN is NaN.
        merged += torch.where(present[:, s, None], weight[:, s, None] * part_o[pos[:, s]], 0.0)
    out.copy_(merged.view(tq, hq, d))
    lse.copy_(row_lse.view(tq, hq))
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sorted_indices: torch.Tensor,
    lay: KernelLayout,
    causal: bool,
    scale: float,
    decomposition: str = "auto",
    dkdv_split_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoBA backward from the saved float32 lse. Returns dq, dk, dv in the dtypes of q, k, v.
    dq uses ``decomposition`` as the forward does; dk/dv always gather per key tile, splitting
    the row lists longer than ``dkdv_split_rows`` (None: ``DKDV_SPLIT_ROWS`` or automatic, see
    ``dkdv_work``)."""
    _check_inputs(q, k, v, sorted_indices.shape[-1])
    dout = dout.contiguous()
    tq, hq, d = q.shape
    hkv = k.shape[1]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    n_blocks = lay.block_start.numel()
    if tq == 0 or n_blocks == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    head_dim = padded_head_dim(d)
    n_slots = sorted_indices.shape[-1]
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (Tq, Hq) rowsum(dO * O)
    lse = lse.contiguous()
    sel = _selection(sorted_indices, lay, hkv)
    block_start = lay.block_start.to(torch.int32)
    block_len = lay.block_len.to(torch.int32)
    q_key_token = lay.q_key_token.to(torch.int32)

    if _resolve(decomposition, sorted_indices, lay, sel, head_dim) == "union":
        block_m, block_n, warps, stages = DQ_CONFIGS[head_dim]
        tile_seq, tile_start = query_tiles(lay.cu_q, block_m, q.device)
        _bwd_dq_kernel[(tile_seq.numel() * hq,)](
            q, k, v, dout, lse, delta, dq, sorted_indices,
            tile_seq, tile_start, lay.cu_q_t, lay.cu_k_t,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            scale, hq, hq // hkv, n_slots, lay.block_size, int(causal), d,
            BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=tma_loads("dq", head_dim, k, v),
            num_warps=warps, num_stages=stages,
        )
    else:
        block_m, block_n, warps, stages = DQ_GATHER_CONFIGS[head_dim]
        chunk_pair, chunk_start = _chunks(sel, block_m)
        part_dq = torch.empty((sel.rows.numel(), d), dtype=torch.float32, device=q.device)
        if chunk_pair.numel():
            _bwd_dq_gather_kernel[(chunk_pair.numel(),)](
                q, k, v, dout, lse, delta, part_dq,
                sel.rows, chunk_pair, chunk_start, sel.row_ptr, block_start, block_len, q_key_token,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1),
                scale, hq, hkv, int(causal), d,
                HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps, num_stages=stages,
            )
        # Sum the per-slot contributions of every row in slot order: deterministic, no atomics.
        present = sel.slot_pos >= 0
        pos = sel.slot_pos.clamp(min=0)
        total = torch.zeros((tq * hq, d), dtype=torch.float32, device=q.device)
        for s in range(n_slots):
            # where(), not a product with the mask: see the forward merge (0 * NaN is NaN).
            total += torch.where(present[:, s, None], part_dq[pos[:, s]], 0.0)
        dq.copy_(total.view(tq, hq, d))

    block_m, block_n, warps, stages = DKDV_CONFIGS[head_dim]
    n_key_tiles = triton.cdiv(lay.block_size, block_n)
    work = dkdv_work(sel.row_ptr, block_m, dkdv_split_rows)
    n_parts = work.n_parts  # chunks of heavy pairs (0: every pair in one pass)
    part_dk = torch.empty((n_parts, lay.block_size, d), dtype=torch.float32, device=q.device)
    part_dv = torch.empty((n_parts, lay.block_size, d), dtype=torch.float32, device=q.device)
    _bwd_dkdv_kernel[(n_key_tiles * work.pair.numel(),)](
        q, k, v, dout, lse, delta, dk, dv, part_dk, part_dv,
        sel.rows, work.pair, work.begin, work.end, work.part, block_start, block_len, q_key_token,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        scale, hq, hkv, n_key_tiles, lay.block_size, int(causal), d,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages,
    )
    if n_parts:
        _dkdv_reduce_kernel[(n_key_tiles * work.red_pair.numel(),)](
            part_dk, part_dv, dk, dv, work.red_pair, work.red_first, work.red_count, block_start, block_len,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            scale, hkv, n_key_tiles, lay.block_size, d,
            HEAD_DIM=head_dim, BLOCK_N=block_n, num_warps=4,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile enumeration (used by tests/test_triton_compile.py)

_ATTN_SCALARS = ["fp32", "i32", "i32", "i32", "i32", "i32", "i32"]


def kernel_configs(dtype: str):
    """Every (name, kernel, signature, constexprs, num_warps, num_stages) the launchers can
    launch for inputs of ``dtype`` ("fp16", "bf16", "fp32"), from the config tables above."""
    ptr = "*" + dtype
    for head_dim, (bm, bn, warps, stages) in FWD_CONFIGS.items():
        names = ["Q", "K", "V", "O", "LSE", "IDX", "TILE_SEQ", "TILE_START", "CU_Q", "CU_K"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*i32", "*i32", "*i32", "*i32", "*i32"] + ["i64"] * 8
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot", "stride_oh"]
        names += ["scale", "n_heads_q", "group", "n_slots", "block_size", "causal", "d_real"]
        types += _ATTN_SCALARS
        const = dict(BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=False)
        yield f"fwd_d{head_dim}", _fwd_kernel, dict(zip(names, types, strict=True)), const, warps, stages
        if head_dim in TMA_HEAD_DIMS["fwd"] and dtype != "fp32":
            const = dict(const, USE_TMA=True)
            yield f"fwd_tma_d{head_dim}", _fwd_kernel, dict(zip(names, types, strict=True)), const, warps, stages
    for head_dim, (bm, bn, warps, stages) in DQ_CONFIGS.items():
        names = ["Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "IDX", "TILE_SEQ", "TILE_START", "CU_Q", "CU_K"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*fp32", ptr, "*i32", "*i32", "*i32", "*i32", "*i32"] + ["i64"] * 10
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                  "stride_dot", "stride_doh", "stride_dqt", "stride_dqh"]
        names += ["scale", "n_heads_q", "group", "n_slots", "block_size", "causal", "d_real"]
        types += _ATTN_SCALARS
        const = dict(BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=False)
        yield f"dq_d{head_dim}", _bwd_dq_kernel, dict(zip(names, types, strict=True)), const, warps, stages
        if head_dim in TMA_HEAD_DIMS["dq"] and dtype != "fp32":
            const = dict(const, USE_TMA=True)
            yield f"dq_tma_d{head_dim}", _bwd_dq_kernel, dict(zip(names, types, strict=True)), const, warps, stages
    for head_dim, (bm, bn, warps, stages) in DKDV_CONFIGS.items():
        names = ["Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV", "PART_DK", "PART_DV",
                 "ROWS", "ITEM_PAIR", "ITEM_BEGIN", "ITEM_END", "ITEM_PART", "BLOCK_START", "BLOCK_LEN", "Q_KEY_TOKEN"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*fp32", ptr, ptr, "*fp32", "*fp32"] + ["*i32"] * 8
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                  "stride_dot", "stride_doh", "stride_dkt", "stride_dkh", "stride_dvt", "stride_dvh"]
        types += ["i64"] * 12
        names += ["scale", "n_heads_q", "n_heads_kv", "n_key_tiles", "block_size", "causal", "d_real"]
        types += ["fp32", "i32", "i32", "i32", "i32", "i32", "i32"]
        const = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn)
        yield f"dkdv_d{head_dim}", _bwd_dkdv_kernel, dict(zip(names, types, strict=True)), const, warps, stages
        names = ["PART_DK", "PART_DV", "DK", "DV", "RED_PAIR", "RED_FIRST", "RED_COUNT", "BLOCK_START", "BLOCK_LEN",
                 "stride_dkt", "stride_dkh", "stride_dvt", "stride_dvh",
                 "scale", "n_heads_kv", "n_key_tiles", "block_size", "d_real"]
        types = ["*fp32", "*fp32", ptr, ptr] + ["*i32"] * 5 + ["i64"] * 4 + ["fp32"] + ["i32"] * 4
        const = dict(HEAD_DIM=head_dim, BLOCK_N=bn)
        yield f"dkdv_reduce_d{head_dim}", _dkdv_reduce_kernel, dict(zip(names, types, strict=True)), const, 4, 1
    common = ["ROWS", "CHUNK_PAIR", "CHUNK_START", "ROW_PTR", "BLOCK_START", "BLOCK_LEN", "Q_KEY_TOKEN"]
    for head_dim, (bm, bn, warps, stages) in FWD_GATHER_CONFIGS.items():
        names = ["Q", "K", "V", "PART_O", "PART_LSE"] + common
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh"]
        names += ["scale", "n_heads_q", "n_heads_kv", "causal", "d_real"]
        types = [ptr, ptr, ptr, "*fp32", "*fp32"] + ["*i32"] * 7 + ["i64"] * 6 + ["fp32"] + ["i32"] * 4
        const = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn)
        yield f"fwd_gather_d{head_dim}", _fwd_gather_kernel, dict(zip(names, types, strict=True)), const, warps, stages
    for head_dim, (bm, bn, warps, stages) in DQ_GATHER_CONFIGS.items():
        names = ["Q", "K", "V", "DO", "LSE", "DELTA", "PART_DQ"] + common
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_dot", "stride_doh"]
        names += ["scale", "n_heads_q", "n_heads_kv", "causal", "d_real"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*fp32", "*fp32"] + ["*i32"] * 7 + ["i64"] * 8 + ["fp32"] + ["i32"] * 4
        const = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn)
        yield f"dq_gather_d{head_dim}", _bwd_dq_gather_kernel, dict(zip(names, types, strict=True)), const, warps, stages


__all__ = [
    "BIG_INDEX", "DKDV_CONFIGS", "DKDV_SPLIT_ROWS", "DQ_CONFIGS", "DQ_GATHER_CONFIGS", "FWD_CONFIGS", "FWD_GATHER_CONFIGS",
    "TMA_HEAD_DIMS", "TMA_LOADS", "DkdvWork",
    "KernelLayout", "attention_backward", "attention_forward", "choose_decomposition", "dkdv_work", "kernel_configs", "tma_loads",
    "padded_head_dim", "query_tiles", "selection_rows", "sort_block_indices",
]
