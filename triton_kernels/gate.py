"""MoBA gate kernels: block mean-pooling of keys, then fused gate scores + top-k selection.

* ``_block_mean_kernel``: one program per (global key block, KV head); sums the block's keys
  in float32 ``BLOCK_T`` tokens at a time and writes the mean, (G, Hkv, D) float32. A tail
  block is averaged over the tokens it has.
* ``_gate_topk_kernel``: one program per (tile of ``BLOCK_M`` queries of one sequence, query
  head; GQA: query head h reads the means of KV head h // group). It walks only the tile's
  candidate blocks ``BLOCK_B`` at a time (causal: blocks before the own block of the tile's
  last row, which are complete; non-causal: every block of the sequence), scores them on
  tensor cores and keeps a running top-k per row in registers: for half inputs one pass with
  one half-precision product per chunk plus an exact re-check of the kept pairs (a second,
  float32 pass only in tiles whose cut is a near tie; "Score precision" below). The
  (S, n_blocks) score matrix never exists in global memory.

  Running selection: a (BLOCK_M, SORT_WIDTH) register tile of (score, block) pairs, unsorted;
  its first ``n_work`` columns hold the best candidates so far (empty: score -inf, block BIG +
  column, below every real candidate), the rest are locked as (+inf, -1), never replaced. Per
  chunk, best first: the chunk's best remaining pair of every row replaces that row's worst kept
  pair while it ranks above it; the first pair that does not ends the row's chunk, so a chunk
  costs one max/min reduction once the selection is good and at most min(n_work, BLOCK_B) + 1
  rounds. At the end the own block and the picks are sorted ascending (``tl.sort``), padding
  (``PAD_INDEX`` = -1) last, and written as (Tq, Hq, width) int32.

  Order and ties: (score descending, block index ascending), so among equal scores the lower
  block wins; a NaN score ranks first (as in ``torch.topk``). Every kept block is distinct.

  Score precision (docs/design.md step 3: float32 scores). Tensor cores only, in two passes
  for the training dtypes:
  - float16 / bfloat16 q, first pass: ONE tensor-core product in q's own dtype (exact for q),
    against the block means minus the sequence's first block mean m0, rounded to q's dtype.
    Subtracting m0 changes every score of a row by the same q . m0, so the order is unchanged,
    and the rounding error now scales with the means' spread, not with their size (trained
    keys share a large common component, which the mean over a block only enlarges). The pass
    keeps the ``SORT_WIDTH - 1`` best pairs per row (at least ``MIN_EXTRA_KEPT`` beyond the
    n_pick needed) and ``rej_ub``, the highest score + error bound among the pairs it left out.
    Bound, per row and chunk: |first-pass score - (float32 score - q . m0)| <=
    |q| (err_rel max|mean - m0| + err_abs) with err_rel = 2 (u + 2**-23 + 3 gamma), err_abs =
    2 (3 gamma |m0| + HEAD_DIM eta + 2**-90), u the unit roundoff of q's dtype
    (``UNIT_ROUNDOFF``), eta its subnormals' absolute rounding (``SUBNORMAL_ROUNDOFF``), gamma =
    HEAD_DIM 2**-24 for float32 accumulation (Cauchy-Schwarz for sum |q_i||dev_i|; the factor 2
    covers the rounding of the bound's own arithmetic). A deviation that overflows q's dtype
    (float16: |mean - m0| > 65504) marks its rows uncertified.
  - Re-check: the kept pairs get float32 scores on the FMA units (q . mean, ``_exact_score``)
    and the n_pick best of them by (score, block) are the picks. The row is certified when its
    lowest pick minus q . m0 (less its rounding) exceeds ``rej_ub``: then no pair left out can
    outrank a pick. If any row of the tile is not certified (a near tie at the cut, exact ties,
    inf/NaN in q or the means), the whole tile runs the pass again with float32 scores (below)
    and counts itself in ``FALLBACKS``: the result is always the float32 selection.
  - float32 scores (the fallback, and float32 q): half q is exact in TF32, so the float32 means
    are split m = hi + lo (hi: m with its low 13 mantissa bits cleared, exact in TF32) and
    s = q.hi + q.lo in two TF32 products with float32 accumulation; float32 q uses
    ``input_precision="tf32x3"`` (hi*hi + hi*lo + lo*hi, ~2**-22 relative per product).
  Either is float32 accuracy up to summation order, which already differs between any two
  float32 matmuls (the torch reference's included), so the selection equals the float32
  reference's except where two scores agree to float32 rounding, where no float32
  implementation is canonical. Cost on sm_90: one bf16 wgmma per chunk (a quarter of the two
  TF32 ones: half the products at twice the rate), SORT_WIDTH - 1 float32 dot products per row
  for the re-check, and the float32 pass again only in tiles with a near tie. Under the
  interpreter (no bfloat16 ``tl.dot``) the first pass multiplies the same rounded operands in
  float32 (``LP_DOT`` = 3): the same products, so the same bound. The tests compare with the
  torch gate on random data (also with a large common key component, where no tile may fall
  back), force near ties and inf/NaN into the fallback and check its count, and pin exact ties
  and scores that differ only below TF32's precision.

  Limits: the selection tile is SORT_WIDTH = next_power_of_2(top_k) wide; above
  ``MAX_SORT_WIDTH`` (32, i.e. top_k <= 32) the launcher (``moba.ops.triton_impl._select``) falls back to the
  torch gate (``moba.ops.gate.select_packed``). When ``top_k - 1`` covers every candidate the
  launcher skips the kernel and writes the dense selection directly; ``top_k = 1`` writes the
  own block.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import on_inputs_device
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
#: Pairs beyond the n_pick picks that the first (half-precision) pass keeps per row, at least:
#: the re-check decides among them exactly, so the bound only has to separate the n_pick-th
#: pair from the (n_pick + extra + 1)-th, several order statistics apart.
MIN_EXTRA_KEPT = 4
#: Unit roundoff of the first pass's product dtype (2**-p, p significant bits): q is exact in
#: its own dtype, the centred means are rounded to it.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: Absolute rounding error of a subnormal in that dtype (half its smallest subnormal), which the
#: relative bound above does not cover: float16 deviations below 2**-14 lose relative precision.
SUBNORMAL_ROUNDOFF = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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
def _worst(top_s, top_i):
    """The worst kept pair of every row (BLOCK_M,): lowest score, ties to the higher block."""
    thr_s = tl.min(top_s, 1)
    thr_i = tl.max(tl.where(top_s == thr_s[:, None], top_i, -1), 1)
    return thr_s, thr_i


@triton.jit
def _scan_blocks(
    q, q_norm, m0, MEANS, first_block, kv_head, n_heads_kv, d_real, hi, own, row_ok, n_work, causal,
    err_rel, err_abs,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, SORT_WIDTH: tl.constexpr,
    BIG: tl.constexpr, MODE: tl.constexpr,
):
    """One pass over the tile's candidate blocks (local ids < ``hi``) keeping a running top-
    ``n_work`` per row by (score descending, block ascending).

    MODE 0 (float32 q): float32 scores by tf32x3. MODE 1 (half q): float32 scores as two TF32
    products. MODE 2 (half q, the first pass): one product in q's dtype (``MODE 3``: the same
    operands multiplied in float32, for the interpreter, which has no bfloat16 dot) of q and the
    block means minus the sequence's first block mean ``m0``, rounded to q's dtype.

    Returns (top_s, top_i, top_e) (BLOCK_M, SORT_WIDTH), columns >= n_work locked as (+inf, -1),
    empty working slots (-inf, BIG + column); top_e (MODE >= 2) is the error bound of each kept
    score; and per row (BLOCK_M,): rej_ub, an upper bound of every candidate that is not kept
    (its score plus its bound; -inf when none was dropped), and bad, set where a bound is not
    finite (inf/NaN in q or the means): such rows are never certified (MODE >= 2).
    """
    cols = tl.arange(0, SORT_WIDTH)  # (SORT_WIDTH,)
    work = cols[None, :] < n_work  # (1, SORT_WIDTH)
    top_s = tl.where(work, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, SORT_WIDTH], tl.float32)
    top_i = tl.where(work, BIG + cols[None, :], -1) + tl.zeros([BLOCK_M, SORT_WIDTH], tl.int32)
    top_e = tl.zeros([BLOCK_M, SORT_WIDTH], tl.float32)
    rej_ub = tl.full([BLOCK_M], float("-inf"), tl.float32)
    bad = ~(q_norm < float("inf"))  # (BLOCK_M,) inf/NaN in q (MODE >= 2)
    thr_s, thr_i = _worst(top_s, top_i)
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real
    offs_b = tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    for b0 in range(0, hi, BLOCK_B):
        blk = b0 + offs_b  # (BLOCK_B,) local block index
        b_ok = blk < hi  # (BLOCK_B,)
        means = tl.load(MEANS + ((first_block + blk)[:, None] * n_heads_kv + kv_head) * d_real + offs_d[None, :],
                        mask=b_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_B, HEAD_DIM) float32
        if MODE == 0:
            s = tl.dot(q.to(tl.float32), tl.trans(means), input_precision="tf32x3")  # (BLOCK_M, BLOCK_B)
        elif MODE == 1:
            # half q is exact in TF32: two TF32 products against the means' hi/lo split suffice
            qf = q.to(tl.float32)
            m_hi = (means.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # 11 bits
            s = tl.dot(qf, tl.trans(m_hi), input_precision="tf32")
            s = tl.dot(qf, tl.trans(means - m_hi), s, input_precision="tf32")
        else:
            dev = tl.where(b_ok[:, None], means - m0[None, :], 0.0)  # (BLOCK_B, HEAD_DIM) centred
            dev_lp = dev.to(q.dtype)
            # a deviation beyond q's dtype range (float16: |mean - m0| > 65504) rounds to inf
            lp_inf = ~(tl.abs(dev_lp.to(tl.float32)) < float("inf"))  # (BLOCK_B, HEAD_DIM)
            chunk_overflow = tl.max(tl.max(lp_inf.to(tl.int32), 1), 0) > 0
            if MODE == 2:
                s = tl.dot(q, tl.trans(dev_lp))  # one tensor-core product, float32 accumulation
            else:
                s = tl.dot(q.to(tl.float32), tl.trans(dev_lp.to(tl.float32)), input_precision="ieee")
            # |score error| <= |q| |dev| err_rel + |q| err_abs: one bound per row for the chunk
            # (max/min may drop NaN on the GPU; sums and compares do not: test those)
            sq = tl.sum(dev * dev, 1)  # (BLOCK_B,)
            chunk_bad = tl.max((~(sq < float("inf"))).to(tl.int32), 0) > 0  # inf/NaN in a mean
            chunk_norm = tl.sqrt(tl.max(tl.where(sq < float("inf"), sq, 0.0), 0))  # scalar
            e_row = q_norm * (chunk_norm * err_rel + err_abs)  # (BLOCK_M,)
            bad = bad | chunk_bad | chunk_overflow | ~(e_row < float("inf"))
        if MODE < 2:
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
        # At most min(n_work, BLOCK_B) rounds; once the selection is good, usually none.
        while tl.max(ins.to(tl.int32), 0) > 0:
            # the row's worst kept pair (unique: kept blocks are distinct), (BLOCK_M, SORT_WIDTH)
            slot = ins[:, None] & (top_s == thr_s[:, None]) & (top_i == thr_i[:, None])
            if MODE >= 2:  # the evicted pair leaves the kept set: its bound joins rej_ub
                out_e = tl.sum(tl.where(slot, top_e, 0.0), 1)
                rej_ub = tl.where(ins, tl.maximum(rej_ub, thr_s + out_e), rej_ub)
                top_e = tl.where(slot, e_row[:, None], top_e)
            top_s = tl.where(slot, c_s[:, None], top_s)
            top_i = tl.where(slot, c_i[:, None], top_i)
            # only inserting rows lose the pair: a finished row's best remaining pair must stay
            # in its chunk scores, it is the one its bound (rej_ub) has to cover
            taken = (idx == c_i[:, None]) & ins[:, None]  # (BLOCK_M, BLOCK_B)
            s = tl.where(taken, float("-inf"), s)
            idx = tl.where(taken, NOT_CAND, idx)
            thr_s, thr_i = _worst(top_s, top_i)
            c_s = tl.max(s, 1)
            c_i = tl.min(tl.where(s == c_s[:, None], idx, NOT_CAND), 1)
            ins = ins & _better(c_s, c_i, thr_s, thr_i)
        if MODE >= 2:  # the chunk's best pair left out bounds every pair left out
            rej_ub = tl.maximum(rej_ub, c_s + e_row)
    return top_s, top_i, top_e, rej_ub, bad


@triton.jit
def _exact_score(Q, MEANS, offs_m, row_ok, pid_h, stride_qt, stride_qh, blk, blk_ok, first_block, kv_head,
                 n_heads_kv, d_real, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr):
    """float32 score q . mean(block) of every row (BLOCK_M,) for one block per row (``blk``,
    local ids; 0 where not ``blk_ok``), on the FMA units, ``D_CHUNK`` dims at a time."""
    acc = tl.zeros(blk.shape, tl.float32)
    offs_c = tl.arange(0, D_CHUNK)
    for d0 in tl.static_range(0, HEAD_DIM, D_CHUNK):
        d_ok = (d0 + offs_c) < d_real
        qc = tl.load(Q + offs_m[:, None] * stride_qt + pid_h * stride_qh + d0 + offs_c[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        mc = tl.load(MEANS + ((first_block + blk)[:, None] * n_heads_kv + kv_head) * d_real + d0 + offs_c[None, :],
                     mask=(row_ok & blk_ok)[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(qc * mc, 1)
    return acc


@triton.jit
def _gate_topk_kernel(
    Q, MEANS, OUT, FALLBACKS,
    TILE_SEQ, TILE_START, CU_Q, CU_K, BLOCK_OFFSET,
    stride_qt, stride_qh,
    n_heads_q, n_heads_kv, group, block_size, n_pick, width, causal, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, SORT_WIDTH: tl.constexpr,
    BIG: tl.constexpr, UNIT_ROUNDOFF: tl.constexpr, SUBNORMAL_ROUNDOFF: tl.constexpr, LP_DOT: tl.constexpr,
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
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, HEAD_DIM) q's dtype

    # Candidate blocks of the tile: causal, the complete blocks before the last row's own block.
    own_last = tl.max(tl.where(row_ok, own, 0), 0)
    hi = tl.where(causal != 0, own_last, n_blocks)
    cols = tl.arange(0, SORT_WIDTH)  # (SORT_WIDTH,)
    zero_rows = tl.zeros([BLOCK_M], tl.float32)
    m0 = tl.zeros([HEAD_DIM], tl.float32)

    if Q.dtype.element_ty == tl.float32:
        top_s, top_i, top_e, rej_ub, bad = _scan_blocks(
            q, zero_rows, m0, MEANS, first_block, kv_head, n_heads_kv, d_real, hi, own, row_ok, n_pick, causal,
            0.0, 0.0, HEAD_DIM, BLOCK_M, BLOCK_B, SORT_WIDTH, BIG, 0)
    else:
        # First pass: one product in q's dtype, centred on the first block's mean, keeping the
        # SORT_WIDTH - 1 best pairs per row (more than the n_pick needed) and a bound on the rest.
        m0 = tl.load(MEANS + (first_block * n_heads_kv + kv_head) * d_real + offs_d, mask=d_ok, other=0.0)
        qf = q.to(tl.float32)
        q_norm = tl.sqrt(tl.sum(qf * qf, 1))  # (BLOCK_M,)
        m0_norm = tl.sqrt(tl.sum(m0 * m0, 0))  # scalar
        # error bound of a first-pass score against the float32 score of the same pair, both
        # measured from q . m0 (see the module docstring): |q| (|dev| err_rel + err_abs)
        gamma = HEAD_DIM * 2.0**-24  # float32 accumulation over HEAD_DIM terms
        err_rel = 2.0 * (UNIT_ROUNDOFF + 2.0**-23 + 3.0 * gamma)
        # + the absolute rounding of subnormal deviations: sum_i |q_i| eta <= sqrt(D) |q| eta <= D |q| eta
        err_abs = 2.0 * (3.0 * gamma * m0_norm + HEAD_DIM * SUBNORMAL_ROUNDOFF + 2.0**-90)
        n_keep = SORT_WIDTH - 1
        keep_s, keep_i, keep_e, rej_ub, bad = _scan_blocks(
            q, q_norm, m0, MEANS, first_block, kv_head, n_heads_kv, d_real, hi, own, row_ok, n_keep, causal,
            err_rel, err_abs, HEAD_DIM, BLOCK_M, BLOCK_B, SORT_WIDTH, BIG, LP_DOT)
        # Exact float32 scores of the kept pairs, and the best n_pick of them by (score, block).
        kept = (keep_i >= 0) & (keep_i < BIG)  # (BLOCK_M, SORT_WIDTH)
        exact = tl.full([BLOCK_M, SORT_WIDTH], float("-inf"), tl.float32)
        for j in range(n_keep):
            blk_j = tl.sum(tl.where(cols[None, :] == j, keep_i, 0), 1)  # (BLOCK_M,)
            ok_j = (blk_j >= 0) & (blk_j < BIG)
            s_j = _exact_score(Q, MEANS, offs_m, row_ok, pid_h, stride_qt, stride_qh, tl.where(ok_j, blk_j, 0), ok_j,
                               first_block, kv_head, n_heads_kv, d_real, HEAD_DIM, 32)
            exact = tl.where((cols[None, :] == j) & ok_j[:, None], s_j[:, None], exact)
        s0 = _exact_score(Q, MEANS, offs_m, row_ok, pid_h, stride_qt, stride_qh, tl.zeros([BLOCK_M], tl.int64),
                          row_ok, first_block, kv_head, n_heads_kv, d_real, HEAD_DIM, 32)  # q . m0
        bad = bad | (tl.max(tl.where(kept & (exact != exact), 1, 0), 1) > 0)
        avail = kept
        top_i = tl.where(cols[None, :] < n_pick, BIG + cols[None, :], -1) + tl.zeros([BLOCK_M, SORT_WIDTH], tl.int32)
        worst = tl.full([BLOCK_M], float("inf"), tl.float32)  # lowest exact score taken
        for r in range(n_pick):
            b_s = tl.max(tl.where(avail, exact, float("-inf")), 1)
            b_i = tl.min(tl.where(avail & (exact == b_s[:, None]), keep_i, NOT_CAND), 1)
            found = b_i != NOT_CAND
            top_i = tl.where((cols[None, :] == r) & found[:, None], b_i[:, None], top_i)
            worst = tl.where(found, b_s, worst)
            avail = avail & (keep_i != b_i[:, None])
        # Certified: every pair left out scores below the lowest pick, by the bound.
        lhs = (worst - s0) - 2.0**-22 * (tl.abs(worst) + tl.abs(s0))
        certified = (rej_ub == float("-inf")) | (lhs > rej_ub)
        certified = (certified & ~bad) | ~row_ok
        if tl.min(certified.to(tl.int32), 0) == 0:
            # Some row's cut falls inside the bound (near ties, exact ties, inf/NaN): this tile
            # scores every candidate in float32 instead.
            tl.atomic_add(FALLBACKS, 1)
            top_s, top_i, top_e, rej_ub, bad = _scan_blocks(
                q, zero_rows, m0, MEANS, first_block, kv_head, n_heads_kv, d_real, hi, own, row_ok, n_pick,
                causal, 0.0, 0.0, HEAD_DIM, BLOCK_M, BLOCK_B, SORT_WIDTH, BIG, 1)

    chosen = tl.where((top_i >= 0) & (top_i < BIG) & (cols[None, :] < n_pick), top_i, BIG)  # picks, rest BIG
    chosen = tl.where(cols[None, :] == SORT_WIDTH - 1, own[:, None], chosen)  # (BLOCK_M, SORT_WIDTH)
    chosen = tl.sort(chosen, dim=1)  # ascending, BIG last
    chosen = tl.where(chosen == BIG, -1, chosen)
    tl.store(OUT + (offs_m[:, None] * n_heads_q + pid_h) * width + cols[None, :], chosen,
             mask=row_ok[:, None] & (cols[None, :] < width))


@on_inputs_device
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


@on_inputs_device
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
    fallbacks: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoBA gate for packed q (Tq, Hq, D), k (Tk, Hkv, D) with the layout tensors of
    ``moba._core.layout.BlockLayout``. Returns (Tq, Hq, min(top_k, nb_max)) int32 local block
    indices, ascending, -1-padded (the semantics of ``moba.ops.gate.select_from_means``).
    ``nb_max``: blocks of the longest sequence, a host int (``BlockLayout.max_blocks_per_seq``);
    None reads it from ``seq_n_blocks`` (a host sync). ``fallbacks``: an optional int32 (1,)
    counter to which the kernel adds the number of (query tile, head) programs that re-scored
    their candidates in float32 (half inputs)."""
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
    sort_width = gate_sort_width(n_pick)
    if sort_width is None:
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
    if fallbacks is None:
        fallbacks = torch.zeros(1, dtype=torch.int32, device=q.device)
    _gate_topk_kernel[(tile_seq.numel() * hq,)](
        q, means, out, fallbacks, tile_seq, tile_start, cu_q_t, cu_k_t, block_offset.to(torch.int32),
        q.stride(0), q.stride(1),
        hq, hkv, hq // hkv, block_size, n_pick, width, int(causal), d,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_B=block_b, SORT_WIDTH=sort_width, BIG=_BIG,
        UNIT_ROUNDOFF=UNIT_ROUNDOFF.get(q.dtype, 0.0), SUBNORMAL_ROUNDOFF=SUBNORMAL_ROUNDOFF.get(q.dtype, 0.0),
        LP_DOT=_lp_dot(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out


def gate_sort_width(n_pick: int) -> int | None:
    """Width of the gate's register selection for ``n_pick = top_k - 1`` picks: the picks, the
    own block and at least ``MIN_EXTRA_KEPT`` more pairs for the first pass to keep, rounded up
    to a power of two and capped at ``MAX_SORT_WIDTH`` (None: the picks do not fit)."""
    if n_pick + 1 > MAX_SORT_WIDTH:
        return None
    return min(MAX_SORT_WIDTH, triton.next_power_of_2(n_pick + 1 + MIN_EXTRA_KEPT))


def _lp_dot(dtype: torch.dtype) -> int:
    """Scan mode of the first pass: 2 = the tensor-core product in q's dtype; 3 = the same
    rounded operands multiplied in float32, under the interpreter (no bfloat16 ``tl.dot``)."""
    return 3 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 2


def kernel_configs(dtype: str):
    """Every (name, kernel, signature, constexprs, num_warps, num_stages) the gate launchers
    can launch for inputs of ``dtype``, from the config tables above (SORT_WIDTH: the
    smallest (top_k = 2) and the largest (``MAX_SORT_WIDTH``) the launcher uses). Integer
    arguments are i32 as at launch (Python ints below 2**31)."""
    ptr = "*" + dtype
    for head_dim, (block_t, warps) in MEAN_CONFIGS.items():
        sig = dict(K=ptr, MEANS="*fp32", BLOCK_START="*i32", BLOCK_LEN="*i32",
                   stride_kt="i64", stride_kh="i64", n_heads_kv="i32", d_real="i32")
        yield f"mean_d{head_dim}", _block_mean_kernel, sig, dict(HEAD_DIM=head_dim, BLOCK_T=block_t), warps, 1
    for head_dim, (block_m, block_b, warps, stages) in GATE_CONFIGS.items():
        for sort_width in (gate_sort_width(1), MAX_SORT_WIDTH):
            sig = dict(Q=ptr, MEANS="*fp32", OUT="*i32", FALLBACKS="*i32", TILE_SEQ="*i32", TILE_START="*i32", CU_Q="*i32",
                       CU_K="*i32", BLOCK_OFFSET="*i32", stride_qt="i32", stride_qh="i32",
                       n_heads_q="i32", n_heads_kv="i32", group="i32", block_size="i32", n_pick="i32",
                       width="i32", causal="i32", d_real="i32")
            const = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_B=block_b, SORT_WIDTH=sort_width, BIG=_BIG,
                         UNIT_ROUNDOFF=UNIT_ROUNDOFF.get(_DTYPES[dtype], 0.0),
                         SUBNORMAL_ROUNDOFF=SUBNORMAL_ROUNDOFF.get(_DTYPES[dtype], 0.0), LP_DOT=2)
            yield f"gate_d{head_dim}_w{sort_width}", _gate_topk_kernel, sig, const, warps, stages
