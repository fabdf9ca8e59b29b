"""MoBA gate kernels: block mean-pooling of keys, then fused gate scores + top-k selection.

* ``_block_mean_kernel``: one program per (global key block, KV head); sums the block's keys
  in float32 ``BLOCK_T`` tokens at a time and writes the mean, (G, Hkv, D) float32. A tail
  block is averaged over the tokens it has.
* ``_gate_topk_kernel``: one program per (tile of ``BLOCK_M`` queries of one sequence, query
  head; GQA: query head h reads the means of KV head h // group), one pass. It walks only the
  tile's candidate blocks ``BLOCK_B`` at a time (causal: blocks before the own block of the
  tile's last row, which are complete; non-causal: every block of the sequence), scores them
  with one ``tl.dot`` per chunk and keeps a running top-``n_pick`` (``n_pick = top_k - 1``) per
  row in registers. The (S, n_blocks) score matrix never exists in global memory, and the
  means are read once per tile.

  Running selection: a (BLOCK_M, SORT_WIDTH) register tile of (score, block) pairs, unsorted;
  columns < n_pick hold the best candidates so far (empty: score -inf, block BIG + column, below
  every real candidate), column n_pick the own block, the rest padding (both locked as
  (+inf, -1), never replaced). Per chunk, best first: the chunk's best remaining pair of every
  row replaces that row's worst kept pair while it ranks above it; the first pair that does not
  ends the row's chunk, so a chunk costs one max/min reduction once the selection is good and
  at most min(n_pick, BLOCK_B) + 1 rounds. At the end the own block and the picks are sorted
  ascending (``tl.sort``), padding (``PAD_INDEX`` = -1) last, and written as (Tq, Hq, width) int32.

  Order and ties: (score descending, block index ascending), so among equal scores the lower
  block wins; a NaN score ranks first (as in ``torch.topk``). Every kept block is distinct.

  Score precision (docs/design.md step 3: float32), on tensor cores, no fp32 FMA:
  - float16 / bfloat16 q (the training dtypes): q is exact in TF32 (11 significant bits).
    The float32 means are split m = hi + lo, hi = m with its low 13 mantissa bits cleared
    (exact in TF32), and s = q.hi + q.lo in two TF32 products with float32 accumulation: q.hi
    is exact, lo loses at most its bits below 2**-22 of m. Two wgmma per chunk on sm_90.
  - float32 q: ``input_precision="tf32x3"`` (q and m both split, hi*hi + hi*lo + lo*hi, the
    lo*lo term dropped, ~2**-22 relative per product). Three wgmma per chunk.
  Either is float32 accuracy up to summation order, which already differs between any two
  float32 matmuls (the torch reference's included), so the selection equals the float32
  reference's except where two scores agree to float32 rounding, where no float32
  implementation is canonical. The tests compare with the torch gate on random data and pin
  exact ties and scores that differ only below TF32's precision on data whose float32 scores
  are exact. Not chosen: one bf16 product (a quarter of the tensor-core time of two TF32
  ones) with an exact float32 re-check of near ties: the re-check needs a second pass for
  rows whose cut falls inside the error bound, and the interpreter cannot run bf16 dots to
  test it on CPU.

  Limits: the selection tile is SORT_WIDTH = next_power_of_2(top_k) wide; above
  ``MAX_SORT_WIDTH`` (32, i.e. top_k <= 32) the launcher (``moba.ops.triton_impl._select``) falls back to the
  torch gate (``moba.ops.gate.select_packed``). When ``top_k - 1`` covers every candidate the
  launcher skips the kernel and writes the dense selection directly; ``top_k = 1`` writes the
  own block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import padded_head_dim, query_tile, query_tiles

_BIG = 1 << 30
#: Block index of a chunk entry that is no candidate: ranks below every slot of the selection.
NOT_CAND = tl.constexpr(2**31 - 1)

# Keyed by the padded head dim: (BLOCK_M, BLOCK_B, num_warps, num_stages). Read by the
# launchers and by the ahead-of-time compile tests (``kernel_configs``).
GATE_CONFIGS = {
    16: (64, 32, 4, 2),
    32: (64, 32, 4, 2),
    64: (64, 32, 4, 2),
    128: (64, 16, 4, 2),  # BLOCK_B = 32 spills on sm_80 (the q split of tf32x3 lives in registers there)
    256: (32, 16, 4, 2),
}
# (BLOCK_T, num_warps)
MEAN_CONFIGS = {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (64, 4), 256: (32, 4)}
#: Widest selection (top_k rounded up to a power of two) the gate kernel keeps in registers:
#: 32 compiles without spills on sm_90 and sm_80 at D <= 128 (bench/kernel_report.py).
MAX_SORT_WIDTH = 32


@triton.jit
def _block_mean_kernel(
    K, MEANS, BLOCK_START, BLOCK_LEN,
    stride_kt, stride_kh, n_heads_kv, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    start = tl.load(BLOCK_START + pid_b).to(tl.int64)
    length = tl.load(BLOCK_LEN + pid_b).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    total = tl.zeros([HEAD_DIM], dtype=tl.float32)  # (HEAD_DIM,)
    for t0 in range(0, length, BLOCK_T):
        t_ok = (t0 + offs_t) < length  # (BLOCK_T,)
        k = tl.load(K + (start + t0 + offs_t)[:, None] * stride_kt + pid_h * stride_kh + offs_d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_T, HEAD_DIM)
        total += tl.sum(k.to(tl.float32), 0)
    mean = total / tl.maximum(length, 1).to(tl.float32)  # (HEAD_DIM,)
    tl.store(MEANS + (pid_b * n_heads_kv + pid_h) * d_real + offs_d, mean, mask=d_ok)


@triton.jit
def _better(s_a, i_a, s_b, i_b):
    """(score, block) pair a ranks above b: higher score, ties to the lower block index."""
    return (s_a > s_b) | ((s_a == s_b) & (i_a < i_b))


@triton.jit
def _gate_topk_kernel(
    Q, MEANS, OUT,
    TILE_SEQ, TILE_START, CU_Q, CU_K, BLOCK_OFFSET,
    stride_qt, stride_qh,
    n_heads_q, n_heads_kv, group, block_size, n_pick, width, causal, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, SORT_WIDTH: tl.constexpr,
    BIG: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # 1-D grid, query heads fastest
    pid_h, seq, q_start, q0, q1, k0, k1 = query_tile(pid, TILE_SEQ, TILE_START, CU_Q, CU_K, n_heads_q)
    first_block = tl.load(BLOCK_OFFSET + seq).to(tl.int64)
    kv_head = pid_h // group
    seq_len_k = k1 - k0
    n_blocks = ((seq_len_k + block_size - 1) // block_size).to(tl.int32)

    offs_m = q_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = offs_m < q1  # (BLOCK_M,)
    q_pos = offs_m - q0 + (seq_len_k - (q1 - q0))  # (BLOCK_M,)
    own = (q_pos // block_size).to(tl.int32)  # (BLOCK_M,) own block
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    q = tl.load(Q + offs_m[:, None] * stride_qt + pid_h * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_M, HEAD_DIM)

    # Running selection per row, unsorted: columns < n_pick hold the best candidates so far
    # (empty slot: score -inf, block BIG + column, below any real candidate); column n_pick
    # is the own block and columns above are padding, both locked (+inf, -1: never the worst).
    cols = tl.arange(0, SORT_WIDTH)  # (SORT_WIDTH,)
    work = cols[None, :] < n_pick  # (1, SORT_WIDTH)
    top_s = tl.where(work, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, SORT_WIDTH], tl.float32)
    top_i = tl.where(work, BIG + cols[None, :], -1) + tl.zeros([BLOCK_M, SORT_WIDTH], tl.int32)
    # the worst kept pair of every row (BLOCK_M,): a candidate enters only if it ranks above
    thr_s = tl.min(top_s, 1)
    thr_i = tl.max(tl.where(top_s == thr_s[:, None], top_i, -1), 1)

    # Candidate blocks of the tile: causal, the complete blocks before the last row's own block.
    own_last = tl.max(tl.where(row_ok, own, 0), 0)
    hi = tl.where(causal != 0, own_last, n_blocks)
    offs_b = tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    for b0 in range(0, hi, BLOCK_B):
        blk = b0 + offs_b  # (BLOCK_B,) local block index
        b_ok = blk < hi  # (BLOCK_B,)
        means = tl.load(MEANS + ((first_block + blk)[:, None] * n_heads_kv + kv_head) * d_real + offs_d[None, :],
                        mask=b_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_B, HEAD_DIM) float32
        if Q.dtype.element_ty == tl.float32:
            s = tl.dot(q, tl.trans(means), input_precision="tf32x3")  # (BLOCK_M, BLOCK_B) float32
        else:
            # half q is exact in TF32: two TF32 products against the means' hi/lo split suffice
            m_hi = (means.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # 11 bits
            s = tl.dot(q, tl.trans(m_hi), input_precision="tf32")  # (BLOCK_M, BLOCK_B) float32
            s = tl.dot(q, tl.trans(means - m_hi), s, input_precision="tf32")
        s = tl.where(s != s, float("inf"), s)  # NaN ranks first, as in torch.topk
        cand_causal = blk[None, :] < own[:, None]  # (BLOCK_M, BLOCK_B)
        cand_all = (blk[None, :] != own[:, None]) & b_ok[None, :]  # (BLOCK_M, BLOCK_B)
        cand = tl.where(causal != 0, cand_causal, cand_all) & row_ok[:, None]
        # a non-candidate ranks below every empty slot: never inserted
        s = tl.where(cand, s, float("-inf"))
        idx = tl.where(cand, blk[None, :], NOT_CAND)  # (BLOCK_M, BLOCK_B)
        # best remaining pair of the chunk per row (BLOCK_M,)
        c_s = tl.max(s, 1)
        c_i = tl.min(tl.where(s == c_s[:, None], idx, NOT_CAND), 1)
        ins = _better(c_s, c_i, thr_s, thr_i)  # (BLOCK_M,)
        # Best first: a row whose best remaining pair does not enter is done with this chunk.
        # At most min(n_pick, BLOCK_B) rounds; once the selection is good, usually none.
        while tl.max(ins.to(tl.int32), 0) > 0:
            # the row's worst kept pair (unique: kept blocks are distinct), (BLOCK_M, SORT_WIDTH)
            slot = ins[:, None] & (top_s == thr_s[:, None]) & (top_i == thr_i[:, None])
            top_s = tl.where(slot, c_s[:, None], top_s)
            top_i = tl.where(slot, c_i[:, None], top_i)
            taken = idx == c_i[:, None]  # (BLOCK_M, BLOCK_B)
            s = tl.where(taken, float("-inf"), s)
            idx = tl.where(taken, NOT_CAND, idx)
            thr_s = tl.min(top_s, 1)
            thr_i = tl.max(tl.where(top_s == thr_s[:, None], top_i, -1), 1)
            c_s = tl.max(s, 1)
            c_i = tl.min(tl.where(s == c_s[:, None], idx, NOT_CAND), 1)
            ins = ins & _better(c_s, c_i, thr_s, thr_i)

    chosen = tl.where((top_i >= 0) & (top_i < BIG), top_i, BIG)  # picks; empty and locked slots -> BIG
    chosen = tl.where(cols[None, :] == n_pick, own[:, None], chosen)  # (BLOCK_M, SORT_WIDTH)
    chosen = tl.sort(chosen, dim=1)  # ascending, BIG last
    chosen = tl.where(chosen == BIG, -1, chosen)
    tl.store(OUT + (offs_m[:, None] * n_heads_q + pid_h) * width + cols[None, :], chosen,
             mask=row_ok[:, None] & (cols[None, :] < width))


def block_means(k: torch.Tensor, block_start: torch.Tensor, block_len: torch.Tensor) -> torch.Tensor:
    """Mean key of every block: k (Tk, Hkv, D) -> (G, Hkv, D) float32."""
    g = block_start.numel()
    hkv, d = k.shape[1], k.shape[2]
    means = torch.empty((g, hkv, d), dtype=torch.float32, device=k.device)
    if g == 0:
        return means
    if k.stride(-1) != 1:
        k = k.contiguous()
    head_dim = padded_head_dim(d)
    block_t, warps = MEAN_CONFIGS[head_dim]
    _block_mean_kernel[(g, hkv)](
        k, means, block_start.to(torch.int32), block_len.to(torch.int32),
        k.stride(0), k.stride(1), hkv, d,
        HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=warps,
    )
    return means


def _dense_selection(q_pos, seq_n_blocks_per_q, block_size, hq, width, causal):
    """Every candidate selected (top_k - 1 >= every row's candidate count)."""
    blocks = torch.arange(width, device=q_pos.device, dtype=torch.int64)[None, :]
    if causal:
        keep = blocks <= (q_pos // block_size)[:, None]
    else:
        keep = blocks < seq_n_blocks_per_q[:, None]
    idx = torch.where(keep, blocks, torch.full_like(blocks, -1)).to(torch.int32)  # (Tq, width)
    return idx[:, None, :].expand(-1, hq, -1).contiguous()


def gate_select(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_q: list[int],
    cu_q_t: torch.Tensor,
    cu_k_t: torch.Tensor,
    q_pos: torch.Tensor,
    q_seq: torch.Tensor,
    seq_n_blocks: torch.Tensor,
    block_offset: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    block_size: int,
    top_k: int,
    causal: bool,
    nb_max: int | None = None,
) -> torch.Tensor:
    """MoBA gate for packed q (Tq, Hq, D), k (Tk, Hkv, D) with the layout tensors of
    ``moba._core.layout.BlockLayout``. Returns (Tq, Hq, min(top_k, nb_max)) int32 local block
    indices, ascending, -1-padded (the semantics of ``moba.ops.gate.select_from_means``).
    ``nb_max``: blocks of the longest sequence, a host int (``BlockLayout.max_blocks_per_seq``);
    None reads it from ``seq_n_blocks`` (a host sync)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    if nb_max is None:
        nb_max = int(seq_n_blocks.max()) if seq_n_blocks.numel() else 0
    width = max(1, min(top_k, nb_max))
    if tq == 0:
        return torch.full((0, hq, width), -1, dtype=torch.int32, device=q.device)
    n_pick = min(top_k - 1, nb_max)
    if n_pick >= nb_max - 1:  # every candidate of every row fits
        return _dense_selection(q_pos, seq_n_blocks[q_seq], block_size, hq, width, causal)
    if n_pick == 0:  # top_k = 1: the own block only
        return (q_pos // block_size).to(torch.int32)[:, None, None].expand(-1, hq, 1).contiguous()
    sort_width = triton.next_power_of_2(width)
    if sort_width > MAX_SORT_WIDTH:
        raise NotImplementedError(
            f"the Triton gate sorts at most {MAX_SORT_WIDTH} selected blocks per query in registers, "
            f"got top_k={top_k}; use the torch gate (moba.select_blocks) for such selections"
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    means = block_means(k, block_start, block_len)
    head_dim = padded_head_dim(d)
    block_m, block_b, warps, stages = GATE_CONFIGS[head_dim]
    tile_seq, tile_start = query_tiles(cu_q, block_m, q.device, cu_q_t)
    out = torch.empty((tq, hq, width), dtype=torch.int32, device=q.device)
    _gate_topk_kernel[(tile_seq.numel() * hq,)](
        q, means, out, tile_seq, tile_start, cu_q_t, cu_k_t, block_offset.to(torch.int32),
        q.stride(0), q.stride(1),
        hq, hkv, hq // hkv, block_size, n_pick, width, int(causal), d,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_B=block_b, SORT_WIDTH=sort_width, BIG=_BIG,
        num_warps=warps, num_stages=stages,
    )
    return out


def kernel_configs(dtype: str):
    """Every (name, kernel, signature, constexprs, num_warps, num_stages) the gate launchers
    can launch for inputs of ``dtype``, from the config tables above (SORT_WIDTH: the
    smallest (2, top_k = 2) and the largest (``MAX_SORT_WIDTH``) the launcher uses). Integer
    arguments are i32 as at launch (Python ints below 2**31)."""
    ptr = "*" + dtype
    for head_dim, (block_t, warps) in MEAN_CONFIGS.items():
        sig = dict(K=ptr, MEANS="*fp32", BLOCK_START="*i32", BLOCK_LEN="*i32",
                   stride_kt="i64", stride_kh="i64", n_heads_kv="i32", d_real="i32")
        yield f"mean_d{head_dim}", _block_mean_kernel, sig, dict(HEAD_DIM=head_dim, BLOCK_T=block_t), warps, 1
    for head_dim, (block_m, block_b, warps, stages) in GATE_CONFIGS.items():
        for sort_width in (2, MAX_SORT_WIDTH):
            sig = dict(Q=ptr, MEANS="*fp32", OUT="*i32", TILE_SEQ="*i32", TILE_START="*i32", CU_Q="*i32",
                       CU_K="*i32", BLOCK_OFFSET="*i32", stride_qt="i32", stride_qh="i32",
                       n_heads_q="i32", n_heads_kv="i32", group="i32", block_size="i32", n_pick="i32",
                       width="i32", causal="i32", d_real="i32")
            const = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_B=block_b, SORT_WIDTH=sort_width, BIG=_BIG)
            yield f"gate_d{head_dim}_w{sort_width}", _gate_topk_kernel, sig, const, warps, stages
