"""Triton MoBA decode kernel: the newest queries of each row over their selected cached blocks.

Flash-decoding style. The key work of one (query, head) is ``n_slots`` selected blocks of
``block_size`` tokens, cut into units of ``BLOCK_N`` tokens; when batch x queries x heads is
too small to fill the GPU, the units are split over ``n_splits`` programs
(``_moba_decode_split_kernel``), each producing an unnormalised partial output with its
running max and sum, and ``_moba_decode_merge_kernel`` merges the splits with a
log-sum-exp combine. The cache is read in place through its strides (a transformers cache
(B, Hkv, L, D) is passed as a (B, L, Hkv, D) view), and only selected blocks are read.

Launchers only; no autograd (decoding is inference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_inputs_device

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp(_NEG - m) is 0, and _NEG - _NEG is not NaN


@triton.jit
def _moba_decode_split_kernel(
    Q, K, V, IDX, START, LEN, O_PART, M_PART, L_PART,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ib, stride_il, stride_ih, stride_iw,
    Lq, n_heads, n_slots, block_size, tiles_per_block, units_per_split, scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_SPLITS: tl.constexpr,
):
    pid_row = tl.program_id(0).to(tl.int64)  # b * Lq + i
    pid_h = tl.program_id(1).to(tl.int64)  # query head
    pid_s = tl.program_id(2).to(tl.int64)  # split
    b = pid_row // Lq
    i = pid_row % Lq
    hkv = pid_h // GROUP
    start = tl.load(START + b).to(tl.int64)
    length = tl.load(LEN + b).to(tl.int64)
    q_pos = length - Lq + i  # position of this query inside its row

    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + i * stride_ql + pid_h * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * scale  # (BLOCK_D,)

    m_i = tl.full([], _NEG, tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)  # (BLOCK_D,)

    total = n_slots * tiles_per_block
    u_begin = pid_s * units_per_split
    u_end = tl.minimum(u_begin + units_per_split, total)
    idx_base = IDX + b * stride_ib + i * stride_il + pid_h * stride_ih
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    for u in range(u_begin, u_end):
        slot = u // tiles_per_block
        tile = u % tiles_per_block
        blk = tl.load(idx_base + slot * stride_iw).to(tl.int64)
        offs_in = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) offset inside the block
        token = blk * block_size + offs_in  # (BLOCK_N,) position inside the row
        # blk == -1 (unused slot) gives token < 0 for every offs_in < block_size
        valid = (offs_in < block_size) & (token >= 0) & (token <= q_pos)
        pos = start + token  # (BLOCK_N,) position in the cache
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_base + pos[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_N,)
        s = tl.where(valid, s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(valid, tl.exp(s - m_new), 0.0)  # (BLOCK_N,)
        v = tl.load(v_base + pos[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)  # (BLOCK_D,)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    part = (pid_row * n_heads + pid_h) * N_SPLITS + pid_s  # O_PART (rows, Hq, N_SPLITS, D)
    tl.store(O_PART + part * HEAD_DIM + offs_d, acc, mask=d_mask)
    tl.store(M_PART + part, m_i)
    tl.store(L_PART + part, l_i)


@triton.jit
def _moba_decode_merge_kernel(
    O_PART, M_PART, L_PART, OUT,
    stride_ob, stride_ol, stride_oh, stride_od,
    Lq, n_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_row = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    b = pid_row // Lq
    i = pid_row % Lq
    offs_s = tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    s_mask = offs_s < N_SPLITS
    d_mask = offs_d < HEAD_DIM
    part = (pid_row * n_heads + pid_h) * N_SPLITS + offs_s  # (BLOCK_S,)
    m = tl.load(M_PART + part, mask=s_mask, other=_NEG)  # (BLOCK_S,)
    l = tl.load(L_PART + part, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(s_mask, tl.exp(m - m_max), 0.0)  # (BLOCK_S,)
    o = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l, axis=0)  # (BLOCK_D,)
    dst = OUT + b * stride_ob + i * stride_ol + pid_h * stride_oh + offs_d * stride_od
    tl.store(dst, out.to(OUT.dtype.element_ty), mask=d_mask)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 264  # an H100's 132 SMs, twice (the interpreter on CPU)


def decode_launch_config(batch_rows: int, n_heads: int, n_slots: int, block_size: int, head_dim: int,
                         target_programs: int = 264, n_splits: int | None = None) -> dict:
    """Tile sizes and split count for given shapes (shared by the launcher and compile tests)."""
    block_n = min(64, triton.next_power_of_2(block_size))
    tiles_per_block = triton.cdiv(block_size, block_n)
    total = n_slots * tiles_per_block
    if n_splits is None:
        n_splits = max(1, min(total, triton.cdiv(target_programs, max(1, batch_rows * n_heads))))
    n_splits = max(1, min(int(n_splits), total))
    units_per_split = triton.cdiv(total, n_splits)
    n_splits = triton.cdiv(total, units_per_split)  # no empty split
    return dict(
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        tiles_per_block=tiles_per_block,
        units_per_split=units_per_split,
        N_SPLITS=n_splits,
        BLOCK_S=triton.next_power_of_2(n_splits),
    )


@on_inputs_device
def moba_decode_triton(q, k_cache, v_cache, block_indices, starts, lengths, block_size: int, scale: float,
                       n_splits: int | None = None) -> torch.Tensor:
    """Launch the decode kernels.

    q: (B, Lq, Hq, D); k_cache, v_cache: (B, Lk, Hkv, D) any strides; block_indices:
    (B, Lq, Hq, W) local block ids (-1 unused); starts, lengths: (B,) int64 first cache
    position and token count of every row. Returns (B, Lq, Hq, D) in q's dtype.
    """
    b, lq, hq, d = q.shape
    hkv = k_cache.shape[2]
    width = block_indices.shape[-1]
    cfg = decode_launch_config(b * lq, hq, width, block_size, d, _target_programs(q.device), n_splits)
    rows = b * lq
    n_sp = cfg["N_SPLITS"]
    o_part = torch.empty(rows, hq, n_sp, d, dtype=torch.float32, device=q.device)
    m_part = torch.empty(rows, hq, n_sp, dtype=torch.float32, device=q.device)
    l_part = torch.empty(rows, hq, n_sp, dtype=torch.float32, device=q.device)
    out = torch.empty(b, lq, hq, d, dtype=q.dtype, device=q.device)
    idx = block_indices.to(torch.int32)
    _moba_decode_split_kernel[(rows, hq, n_sp)](
        q, k_cache, v_cache, idx, starts, lengths, o_part, m_part, l_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *idx.stride(),
        lq, hq, width, block_size, cfg["tiles_per_block"], cfg["units_per_split"], scale,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], N_SPLITS=n_sp,
    )
    _moba_decode_merge_kernel[(rows, hq)](
        o_part, m_part, l_part, out, *out.stride(), lq, hq,
        HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], N_SPLITS=n_sp, BLOCK_S=cfg["BLOCK_S"],
    )
    return out
