"""MoBA attention kernels (forward, backward dq, backward dk/dv) and their launchers.

Work decomposition (chosen deliberately):

* Forward and dq: one program per (query tile of ``BLOCK_M`` consecutive tokens of one
  sequence, query head). The program walks the *union* of the key blocks selected by its
  rows in ascending order with a k-way merge of the rows' (sorted) index lists: the next
  block is the smallest current index over the rows; rows that chose it are "on", the
  others are masked to -inf for that block. Every row sees its blocks in the same order and
  one online softmax per row needs no partial outputs in global memory, no merge pass and no
  atomics. The cost is wasted MMA work on rows that did not choose a block of the union;
  neighbouring queries share their own block (always) and tend to pick the same past blocks
  (the gate scores of neighbouring queries are correlated), so the union stays close to
  ``top_k`` blocks in practice, and the merge costs O(|union|) per tile, independent of the
  number of slots. The alternative (gather, per key block, the queries that chose it, as the
  MoBA reference implementation does with flash-attn varlen) does no wasted MMA work but
  writes ``top_k`` partial (out, lse) per query and needs a merge pass; we use that
  decomposition only where it pays, in the dk/dv backward.
* dk/dv: one program per (``BLOCK_N`` key tile of one key block, KV head). The launcher
  builds, with a stable sort, the list of (query token, query head) rows that selected each
  (block, KV head) (query heads of a GQA group land in the same list, so K/V are never
  repeated); the program gathers those rows ``BLOCK_M`` at a time and accumulates dk, dv
  in registers. Each key tile is owned by exactly one program, so there are no atomics and
  the result is deterministic (same row order every run).

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

import torch
import triton
import triton.language as tl

#: Value that replaces a padding slot in the sorted block-index tensor the kernels read.
BIG_INDEX = 1 << 30
_LOG2E = 1.4426950408889634

# Tile configurations, keyed by the padded head dim. The launchers and the ahead-of-time
# compile tests both read these tables (tests enumerate ``kernel_configs()``).
# (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    128: (64, 64, 8, 2),
    256: (64, 32, 8, 1),
}
DQ_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    128: (64, 64, 8, 2),
    256: (64, 32, 8, 1),
}
DKDV_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    128: (64, 64, 8, 2),
    256: (32, 64, 8, 1),
}


def padded_head_dim(d: int) -> int:
    """Head dim rounded up to a power of two (at least 16, the smallest tl.dot size)."""
    if d > 256:
        raise ValueError(f"the Triton backend supports head dims up to 256, got {d}")
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, IDX,
    TILE_SEQ, TILE_START, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    scale, n_heads_q, group, n_slots, block_size, causal, d_real,
    BIG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1-D grid, query heads fastest: the heads of a GQA group run side by side and share
    # their K/V tiles through L2; no grid dimension limit (65535) on long inputs.
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid // n_heads_q
    pid_h = pid % n_heads_q
    seq = tl.load(TILE_SEQ + pid_m).to(tl.int64)
    q_start = tl.load(TILE_START + pid_m).to(tl.int64)
    q0 = tl.load(CU_Q + seq).to(tl.int64)
    q1 = tl.load(CU_Q + seq + 1).to(tl.int64)
    k0 = tl.load(CU_K + seq).to(tl.int64)
    k1 = tl.load(CU_K + seq + 1).to(tl.int64)
    kv_head = pid_h // group
    seq_len_k = k1 - k0

    offs_m = q_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query token
    row_ok = offs_m < q1  # (BLOCK_M,)
    q_pos = offs_m - q0 + (seq_len_k - (q1 - q0))  # (BLOCK_M,) position inside the key sequence
    q_pos_last = tl.minimum(q_start + BLOCK_M, q1) - 1 - q0 + (seq_len_k - (q1 - q0))  # scalar
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)

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
        for n0 in range(0, n_end, BLOCK_N):
            k_pos = block_first + n0 + offs_n  # (BLOCK_N,) key position inside the sequence
            k_ok = (n0 + offs_n) < block_len  # (BLOCK_N,)
            kv_mask = k_ok[:, None] & d_ok[None, :]  # (BLOCK_N, HEAD_DIM)
            k = tl.load(K + (k0 + k_pos)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) float32
            valid = sel[:, None] & k_ok[None, :]  # (BLOCK_M, BLOCK_N)
            valid = valid & ((k_pos[None, :] <= q_pos[:, None]) | (causal == 0))
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # (BLOCK_M,)
            alpha = tl.exp2(m_i - m_safe)  # (BLOCK_M,)
            p = tl.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + (k0 + k_pos)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # (BLOCK_M, HEAD_DIM)
            m_i = m_new
        slot = slot + sel.to(tl.int32)
        nxt = tl.load(idx_row + slot, mask=sel & (slot < n_slots), other=BIG)  # (BLOCK_M,)
        cur = tl.where(sel, nxt, cur)
        j = tl.min(cur, axis=0)

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
):
    # 1-D grid, query heads fastest: the heads of a GQA group run side by side and share
    # their K/V tiles through L2; no grid dimension limit (65535) on long inputs.
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid // n_heads_q
    pid_h = pid % n_heads_q
    seq = tl.load(TILE_SEQ + pid_m).to(tl.int64)
    q_start = tl.load(TILE_START + pid_m).to(tl.int64)
    q0 = tl.load(CU_Q + seq).to(tl.int64)
    q1 = tl.load(CU_Q + seq + 1).to(tl.int64)
    k0 = tl.load(CU_K + seq).to(tl.int64)
    k1 = tl.load(CU_K + seq + 1).to(tl.int64)
    kv_head = pid_h // group
    seq_len_k = k1 - k0

    offs_m = q_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = offs_m < q1  # (BLOCK_M,)
    q_pos = offs_m - q0 + (seq_len_k - (q1 - q0))  # (BLOCK_M,)
    q_pos_last = tl.minimum(q_start + BLOCK_M, q1) - 1 - q0 + (seq_len_k - (q1 - q0))  # scalar
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
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
        for n0 in range(0, n_end, BLOCK_N):
            k_pos = block_first + n0 + offs_n  # (BLOCK_N,)
            k_ok = (n0 + offs_n) < block_len  # (BLOCK_N,)
            kv_mask = k_ok[:, None] & d_ok[None, :]  # (BLOCK_N, HEAD_DIM)
            k = tl.load(K + (k0 + k_pos)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
            v = tl.load(V + (k0 + k_pos)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
            valid = sel[:, None] & k_ok[None, :]  # (BLOCK_M, BLOCK_N)
            valid = valid & ((k_pos[None, :] <= q_pos[:, None]) | (causal == 0))
            p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
            dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
            dq += tl.dot(ds.to(k.dtype), k)  # (BLOCK_M, HEAD_DIM)
        slot = slot + sel.to(tl.int32)
        nxt = tl.load(idx_row + slot, mask=sel & (slot < n_slots), other=BIG)  # (BLOCK_M,)
        cur = tl.where(sel, nxt, cur)
        j = tl.min(cur, axis=0)

    dq = dq * scale
    tl.store(DQ + offs_m[:, None] * stride_dqt + pid_h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    ROWS, ROW_PTR, BLOCK_START, BLOCK_LEN, Q_KEY_TOKEN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    scale, n_heads_q, n_heads_kv, n_key_tiles, causal, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # 1-D grid: no grid dimension limit on long inputs
    pid_n = pid % n_key_tiles  # key tile inside the block
    pid_g = pid // n_key_tiles  # (global block, KV head) pair
    block = pid_g // n_heads_kv
    kv_head = pid_g % n_heads_kv
    block_len = tl.load(BLOCK_LEN + block).to(tl.int64)
    n0 = pid_n * BLOCK_N
    if n0 < block_len:
        block_start = tl.load(BLOCK_START + block).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        k_ok = (n0 + offs_n) < block_len  # (BLOCK_N,)
        k_tok = block_start + n0 + offs_n  # (BLOCK_N,) global key token
        offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
        d_ok = offs_d < d_real  # (HEAD_DIM,)
        kv_mask = k_ok[:, None] & d_ok[None, :]  # (BLOCK_N, HEAD_DIM)
        r_begin = tl.load(ROW_PTR + pid_g).to(tl.int64)
        r_end = tl.load(ROW_PTR + pid_g + 1).to(tl.int64)
        live = (offs_n * 0 + (r_end - r_begin)) > 0  # (BLOCK_N,) false when no query chose this block
        load_mask = kv_mask & live[:, None]  # (BLOCK_N, HEAD_DIM): then no K/V traffic
        k = tl.load(K + k_tok[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=load_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(V + k_tok[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
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
            q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
            do = tl.load(DO + tok[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
                         mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
            lse2 = tl.load(LSE + row, mask=r_ok, other=0.0) * 1.4426950408889634  # (BLOCK_M,)
            delta = tl.load(DELTA + row, mask=r_ok, other=0.0)  # (BLOCK_M,)
            q_tok = tl.load(Q_KEY_TOKEN + tok, mask=r_ok, other=0).to(tl.int64)  # (BLOCK_M,)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
            valid = r_ok[:, None] & k_ok[None, :]  # (BLOCK_M, BLOCK_N)
            valid = valid & ((k_tok[None, :] <= q_tok[:, None]) | (causal == 0))
            p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)  # (BLOCK_N, HEAD_DIM)
            dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)  # (BLOCK_N, HEAD_DIM)
        dk = dk * scale
        tl.store(DK + k_tok[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + k_tok[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


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


def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    if q.shape[0] * q.shape[1] * max(1, q.shape[2]) >= 2**31 or k.shape[0] * k.shape[1] >= 2**31:
        raise ValueError("tensors too large for int32 row indices")


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sorted_indices: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    cu_q_t: torch.Tensor,
    cu_k_t: torch.Tensor,
    block_size: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA forward. q (Tq, Hq, D), k/v (Tk, Hkv, D) with unit last stride; sorted_indices
    (Tq, Hq, n_slots) int32 from ``sort_block_indices``; cu_q_t/cu_k_t the int32 tensors of
    cu_q/cu_k on q's device. Returns out (Tq, Hq, D) in q.dtype and lse (Tq, Hq) float32."""
    _check_inputs(q, k, v)
    tq, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((tq, hq), dtype=torch.float32, device=q.device)
    if tq == 0:
        return out, lse
    head_dim = padded_head_dim(d)
    block_m, block_n, warps, stages = FWD_CONFIGS[head_dim]
    tile_seq, tile_start = query_tiles(cu_q, block_m, q.device)
    _fwd_kernel[(tile_seq.numel() * hq,)](
        q, k, v, out, lse, sorted_indices,
        tile_seq, tile_start, cu_q_t, cu_k_t,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        scale, hq, hq // hkv, sorted_indices.shape[-1], block_size, int(causal), d,
        BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def selection_rows(
    sorted_indices: torch.Tensor, q_seq: torch.Tensor, block_offset: torch.Tensor, n_blocks: int, n_heads_kv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the selection: for every (global block, KV head) pair, the rows
    ``token * Hq + head`` that selected it.

    Returns (rows int32 (nnz,), row_ptr int32 (n_blocks * Hkv + 1,)), rows grouped by pair
    in ascending row order (stable sort: deterministic).
    """
    tq, hq, n_slots = sorted_indices.shape
    flat = sorted_indices.reshape(-1)
    valid = (flat != BIG_INDEX).nonzero().squeeze(1)  # positions (token * Hq + head) * n_slots + slot
    row = valid // n_slots
    token = row // hq
    head = row % hq
    block = block_offset[q_seq[token]] + flat[valid].long()
    pair = block * n_heads_kv + head // (hq // n_heads_kv)
    order = torch.argsort(pair, stable=True)
    rows = row[order].to(torch.int32)
    counts = torch.bincount(pair, minlength=n_blocks * n_heads_kv)
    row_ptr = torch.zeros(n_blocks * n_heads_kv + 1, dtype=torch.int32, device=sorted_indices.device)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return rows.contiguous(), row_ptr


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sorted_indices: torch.Tensor,
    cu_q: list[int],
    cu_q_t: torch.Tensor,
    cu_k_t: torch.Tensor,
    q_seq: torch.Tensor,
    q_key_token: torch.Tensor,
    block_offset: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    block_size: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoBA backward from the saved float32 lse. Layout tensors as in ``moba._layout.BlockLayout``
    (q_seq, q_key_token (Tq,), block_offset (N,), block_start/block_len (G,)).
    Returns dq, dk, dv in the dtypes of q, k, v."""
    _check_inputs(q, k, v)
    dout = dout.contiguous()
    tq, hq, d = q.shape
    hkv = k.shape[1]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if tq == 0:
        return dq, dk.zero_(), dv.zero_()
    head_dim = padded_head_dim(d)
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (Tq, Hq) rowsum(dO * O)
    lse = lse.contiguous()

    block_m, block_n, warps, stages = DQ_CONFIGS[head_dim]
    tile_seq, tile_start = query_tiles(cu_q, block_m, q.device)
    _bwd_dq_kernel[(tile_seq.numel() * hq,)](
        q, k, v, dout, lse, delta, dq, sorted_indices,
        tile_seq, tile_start, cu_q_t, cu_k_t,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        scale, hq, hq // hkv, sorted_indices.shape[-1], block_size, int(causal), d,
        BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages,
    )

    n_blocks = block_start.numel()
    # Keys outside every block do not exist (every key token is in exactly one block), but a
    # zero-length key sequence contributes no block: keep dk/dv defined everywhere.
    if n_blocks == 0:
        return dq, dk.zero_(), dv.zero_()
    rows, row_ptr = selection_rows(sorted_indices, q_seq, block_offset, n_blocks, hkv)
    block_m, block_n, warps, stages = DKDV_CONFIGS[head_dim]
    q_key_token = q_key_token.to(torch.int32)
    n_key_tiles = triton.cdiv(block_size, block_n)
    _bwd_dkdv_kernel[(n_key_tiles * n_blocks * hkv,)](
        q, k, v, dout, lse, delta, dk, dv,
        rows, row_ptr, block_start.to(torch.int32), block_len.to(torch.int32), q_key_token,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        scale, hq, hkv, n_key_tiles, int(causal), d,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages,
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
        const = dict(BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn)
        yield f"fwd_d{head_dim}", _fwd_kernel, dict(zip(names, types, strict=True)), const, warps, stages
    for head_dim, (bm, bn, warps, stages) in DQ_CONFIGS.items():
        names = ["Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "IDX", "TILE_SEQ", "TILE_START", "CU_Q", "CU_K"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*fp32", ptr, "*i32", "*i32", "*i32", "*i32", "*i32"] + ["i64"] * 10
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                  "stride_dot", "stride_doh", "stride_dqt", "stride_dqh"]
        names += ["scale", "n_heads_q", "group", "n_slots", "block_size", "causal", "d_real"]
        types += _ATTN_SCALARS
        const = dict(BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn)
        yield f"dq_d{head_dim}", _bwd_dq_kernel, dict(zip(names, types, strict=True)), const, warps, stages
    for head_dim, (bm, bn, warps, stages) in DKDV_CONFIGS.items():
        names = ["Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV",
                 "ROWS", "ROW_PTR", "BLOCK_START", "BLOCK_LEN", "Q_KEY_TOKEN"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*fp32", ptr, ptr, "*i32", "*i32", "*i32", "*i32", "*i32"]
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                  "stride_dot", "stride_doh", "stride_dkt", "stride_dkh", "stride_dvt", "stride_dvh"]
        types += ["i64"] * 12
        names += ["scale", "n_heads_q", "n_heads_kv", "n_key_tiles", "causal", "d_real"]
        types += ["fp32", "i32", "i32", "i32", "i32", "i32"]
        const = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn)
        yield f"dkdv_d{head_dim}", _bwd_dkdv_kernel, dict(zip(names, types, strict=True)), const, warps, stages


__all__ = [
    "BIG_INDEX", "DKDV_CONFIGS", "DQ_CONFIGS", "FWD_CONFIGS", "attention_backward", "attention_forward",
    "kernel_configs", "padded_head_dim", "query_tiles", "selection_rows", "sort_block_indices",
]
