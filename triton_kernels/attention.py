"""MoBA attention kernels (forward, backward dq, backward dk/dv) and their launchers.

Work decomposition (chosen by bench/perf_model.py; two for the forward and dq, picked per call):

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
* "gather" (per super-tile and key block; FlashMoBA's gather-and-densify, in Triton): one
  program per (super-tile of ``gather_tile`` consecutive queries of one sequence, KV head)
  owns every (token, query head of the group) row of the tile and walks its *segments*: for
  each key block, in ascending order, the rows of the tile that selected it (all query heads
  of the group together, so K/V tiles are read once per chunk), ``BLOCK_M`` gathered rows at a
  time. A row's online softmax state (running max, sum, float32 output sum) is ONE per row,
  not per slot: it lives in global memory (``lse`` holds the max until the end; a (Tq * Hq, D)
  float32 sum and a (Tq * Hq,) softmax sum), is read, updated over the block and written back
  per segment; the program's last loop writes out and lse. No per-slot partials, no merge
  pass, no Python loop over slots, no atomics: a row has exactly one owner, which visits its
  blocks in ascending order (deterministic). dq the same way with one float32 dq sum per row.
  MMA rows are the selecting rows rounded up to BLOCK_M per segment; the price is the row
  state's read-modify-write, 8D + 16 bytes per (row, slot) plus a gathered q row (modelled at
  512K, block 512, top-3: 52 GB, ~12 ms of the forward kernel's ~80 ms of HBM time; the rest
  is K/V read once per 64-row chunk, as the per-slot design did; no L2 reuse assumed).
  The super-tile is the smallest power of two in ``GATHER_TILE_RANGE`` leaving at most
  ``GATHER_PROGRAMS`` programs (about 8 waves on 132 SMs): a larger tile puts more rows in
  each segment (fuller chunks on uncorrelated selections), a smaller one balances the SMs.
* ``choose_decomposition`` ("auto") counts the MMA rows each would compute (union blocks x
  BLOCK_M vs. the gather segments' rows rounded up to BLOCK_M) and picks union unless it does
  more than ``UNION_MARGIN`` (1.25) x the gather work. Both paths are exact; the choice only
  moves work. No host sync: the choice is a device flag (``Selection.choice``, saved for the
  backward), "auto" launches BOTH sides' forward (and dq) grids, sized from host-known shapes,
  with ``AUTO=True``, and every program of the side not chosen reads the flag and returns at
  once. That costs one more launch of empty programs per direction; a host read of the flag
  would drain the GPU before either launch. The price is memory: the gather side's float32
  row state (forward) and dq sum (backward) are allocated whichever side runs. Explicit
  "union" / "gather" launch one side with ``AUTO=False`` (no flag read compiled in).

Why this gather design (bench/perf_model.py, MODELLED on an H200, Hq=32/Hkv=8, D=128, bf16,
causal; forward + dq + selection glue of the attention, the tile efficiencies when this design
was chosen (commit 515a7c8; ``python -m bench.perf_model`` prints today's numbers); "per-slot"
is the previous gather path: one float32 (out, lse) / dq partial per (row, slot) and a
slot-by-slot merge in PyTorch; peak memory fwd+bwd vs dense flash):

  ======================  =========================  =========================  =====================
  shape                   union (corr. / random)     per-slot gather            this gather
  ======================  =========================  =========================  =====================
  128K, block 512, top-3  64.5 / 1324 ms, 0.74x      64.0 ms, 3.23x             56.9 ms, 1.03x
  512K, block 512, top-3  258 / 6615 ms, 0.74x       254 ms, 3.23x              227 ms, 1.03x
  512K, block 128, top-8  222 / 5835 ms, 1.06x       349 ms, 5.47x              204-205 ms, 1.09x
  ======================  =========================  =========================  =====================

The union path alone fails on uncorrelated (random) selections: its tiles' unions approach
every past block (23-29x the gather time above), so a second path is needed; per-slot
partials need 3.2-5.5x dense flash's peak memory (13-24x in the forward alone) and their
merge moves more bytes than the attention kernel itself. One fused merge kernel would keep the partials'
footprint (n_slots x (4D + 4) bytes per row); an fp32 accumulator per row (this design, as
FlashMoBA's forward keeps one per row) has the footprint of flash-attn's dq accumulator.
Not taken: a per-key-block program with atomics (nondeterministic); the selection in the
gate's layout directly (issue 14, item 1, the gate's owner).

The selection layout (``build_selection``, int32, ``Selection``) is built once, in the
forward, on device with torch ops and no host sync (no nonzero / unique / item / tolist:
padding sorts last, counts come from searchsorted, sizes are static bounds from the host
sequence boundaries), returned by the forward custom op and saved for the backward: rows per
(key block, KV head) (dk/dv), the gather segments and their per-program ranges, the
super-tiles, and the forward's decomposition. The block geometry (``kernel_layout``) is sent
in one pinned, non-blocking copy.
* dk/dv: always per key tile: one program per (``BLOCK_N`` key tile of one key block, KV
  head) loops over the gathered rows that chose the block (query heads of a GQA group land in
  the same list, so K/V are never repeated) and accumulates dk, dv in registers. A block
  chosen by many rows (a "sink") has its list split into chunks, one program each, whose
  float32 partials ``_dkdv_reduce_kernel`` sums in chunk order (``dkdv_work``): no atomics,
  deterministic (stable row order, fixed chunk order).
* delta = rowsum(dO * O), (Tq, Hq) float32, which dq and dk/dv read: ``_bwd_delta_kernel``,
  ``BLOCK_T`` (token, query head) rows per program, dO and O read once in their dtype and
  multiplied in float32 (the eager PyTorch it replaced cast both to float32 in memory).

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

import fractions
import itertools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._device import on_inputs_device

#: Value that replaces a padding slot in the sorted block-index tensor the kernels read.
BIG_INDEX = 1 << 30

# Tile configurations, keyed by the padded head dim. The launchers and the ahead-of-time
# compile tests both read these tables (tests enumerate ``kernel_configs()``).
# (BLOCK_M, BLOCK_N, num_warps, num_stages); for dk/dv BLOCK_M counts query rows per step and
# BLOCK_N the keys a program owns.
#
# Chosen from the static report (bench/kernel_report.py, bf16 = fp16, no GPU), on sm_90: zero
# spills and zero LDL/STL, every matmul a wgmma, and a software-pipelined main loop (K/V tiles of
# step i+1 in flight, in multi-buffered shared memory, while step i's wgmma runs: the report's
# "pipelined" column, from the TTGIR). num_stages is the pipeline depth; TMA (K/V through tensor
# descriptors, ``TMA_HEAD_DIMS``, sm_90 only) pipelines with far fewer registers than cp.async.
# wgmma M side: 64 rows per warpgroup (4 warps per 64 rows; 8 warps on 64 rows make both
# warpgroups compute the same 64-row scores: more HGMMA, the same registers per row).
# Registers on sm_90, triton 3.9.0 (bench/results/kernel-report-pipelined-triton3.9-2026-12-07.json):
#   fwd  D=128: (128, 32, 8, 3) TMA 201, 3-deep   [was (128, 32, 8, 1) 197, serial; (128, 32, 8, 2) TMA 190;
#               (128, 64, 8, 2) TMA 224, 64-key steps]
#   fwd  D=64:  (64, 64, 4, 2)  TMA 167, 2-deep
#   dq   D=128: (128, 32, 8, 2) TMA 191   [plain cp.async 219; was (128, 32, 8, 1) plain 209, serial]
#   dq   D=64:  (64, 32, 4, 2)  TMA 161   [was (64, 32, 4, 1) 155, serial]
#   dkdv D=128: (16, 128, 8, 2) 207, q/dO 2-deep (cp.async: gathered rows)
#   dkdv D=64:  (32, 128, 8, 2) 181
# (the dk/dv kernel computes transposed (keys x rows) tiles, so its 128 keys are the wgmma M
# side: 64 keys per warpgroup; its K/V tile is loaded once per program, so no TMA there).
# sm_80 (A100) launches the same tables with plain loads (cp.async pipelining); the report and
# its tests check those specialisations too. Occupancy: 1 CTA of 8 warps or 2-3 of 4 per SM:
# registers, not shared memory, limit it. Other head dims: untuned, compile-tested.
FWD_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    128: (128, 32, 8, 3),
    256: (64, 32, 8, 1),
}
DQ_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 32, 4, 2),
    128: (128, 32, 8, 2),
    256: (64, 32, 8, 1),
}
#: num_stages of the union dq without TMA (sm_80, or unaligned K/V) where it differs from
#: ``DQ_CONFIGS``: at D=128 two cp.async stages spill 48 B on sm_80 (255 registers).
DQ_PLAIN_STAGES = {128: 1}
# The gather kernels (forward, dq) have their own tables: their segment and chunk loops around
# the key loop cost registers. At D = 128 they read K/V through one TMA descriptor per segment's
# key block (``TMA_HEAD_DIMS``): with cp.async, two stages spill on sm_90 (forward (64, 32, 4, 2)
# 916 B, dq (64, 32, 8, 2) 152 B). Registers on sm_90, triton 3.9.0:
#   fwd  D=128: (64, 32, 8, 2) TMA 214, 2-deep   [(64, 32, 4, 2) TMA 255 + 72 B; (128, 32, 8, 2) TMA 252;
#               was (64, 32, 4, 1) 254, serial]
#   dq   D=128: (64, 32, 8, 2) TMA 234   [(64, 32, 4, 2) TMA 255 + 272 B; was (64, 32, 8, 1) 253, serial]
#   D=64: cp.async, 2-deep (forward 254, dq 244)
# 8 warps on 64 rows (both warpgroups on the same score tile) keep BLOCK_M = 64, the granule of
# the gather segments' MMA rows (``choose_decomposition``).
FWD_GATHER_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 32, 4, 2),
    128: (64, 32, 8, 2),
    256: (64, 32, 8, 1),
}
DQ_GATHER_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 32, 4, 2),
    128: (64, 32, 8, 2),
    256: (64, 32, 8, 1),
}
DKDV_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (32, 128, 8, 2),
    128: (16, 128, 8, 2),
    256: (32, 64, 8, 1),
}
#: Tiles that differ per Triton release ("major.minor", see ``versions``), where that release's
#: register allocation spills with the tables above: {release: {table name: {head dim: config}}},
#: applied once at import. Triton 3.6 (the torch 2.11 line), sm_90, from the static report: the
#: gather dq at D=128 with (64, 32, 8, 2) TMA spills 120 B (255 registers).
TRITON_CONFIG_OVERRIDES = {"3.6": {"DQ_GATHER_CONFIGS": {128: (64, 16, 8, 2)}}}


def _apply_config_overrides(version: str) -> None:
    from .versions import triton_minor

    for table, entries in TRITON_CONFIG_OVERRIDES.get(triton_minor(version), {}).items():
        globals()[table].update(entries)


_apply_config_overrides(triton.__version__)

# The backward's delta = rowsum(dO * O) (``_bwd_delta_kernel``): (BLOCK_T rows, num_warps) per
# padded head dim, BLOCK_T x HEAD_DIM = 2048 elements of dO and of O per 4-warp program (16 per
# thread). Static report (triton 3.9.0, bf16, no GPU), registers sm_90 / sm_80, no spills: with the
# 16-aligned strides the launchers pass 32-40 / 36-40 (vector loads, 12+ CTAs per SM); with
# unaligned strides (scalar loads, one 64-bit address per element) 40-128 / 46-128. 4096
# elements (D=128: 32 rows) need 248 / 250 there, 8192 (64 rows) spill 1.4 KB.
DELTA_CONFIGS = {
    16: (128, 4),
    32: (64, 4),
    64: (32, 4),
    128: (16, 4),
    256: (8, 4),
}


#: K/V loads of the forward and dq kernels through TMA tensor descriptors: None = automatic
#: (``tma_loads``), True / False force it (tests run the descriptor path in the interpreter).
TMA_LOADS: bool | None = None
#: Head dims whose kernels use TMA K/V loads on sm_90 (from the static report, see the tables):
#: pipelined TMA loads cost fewer registers than pipelined cp.async ones.
TMA_HEAD_DIMS = {"fwd": (64, 128), "dq": (64, 128), "fwd_gather": (128,), "dq_gather": (128,)}


def _scratch_allocator(size: int, alignment: int, stream):
    # the current device: the launchers run under ``on_inputs_device``, so it is q's
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def tma_loads(kernel: str, head_dim: int, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``kernel`` (union "fwd" or "dq", or "fwd_gather" / "dq_gather") loads K/V through
    device-side TMA descriptors (its ``USE_TMA``) at padded head dim ``head_dim``.

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
#: Automatic split = this many times the largest possible mean rows per pair. The partial
#: buffers are sized from the shapes (no host sync), so the factor bounds their memory: at most
#: P * 2 / DKDV_SPLIT_FACTOR chunks of (block_size, D) float32 for dk and for dv, i.e. with 4
#: together 4 B x Tk x Hkv x D (twice k's size in 16 bits), whether or not any pair is heavy.
DKDV_SPLIT_FACTOR = 4
#: Keys per program of the dk/dv reduce: two (keys, D) float32 sums in 4 warps stay in registers.
DKDV_REDUCE_BLOCK_N = 32


class DkdvWork(NamedTuple):
    """The dk/dv grid's work items (one program per item and key tile) and the heavy pairs' reduce.

    Sizes are static upper bounds computed from the shapes alone (no host sync): unused items
    have ``pair = -1`` and unused reduce entries ``red_pair = -1``; their programs exit at once."""

    pair: torch.Tensor  # (I,) int32 (global block, KV head) pair of every item, -1 = unused
    begin: torch.Tensor  # (I,) int32 first position in ``rows``
    end: torch.Tensor  # (I,) int32 one past the last position
    part: torch.Tensor  # (I,) int32 partial index of a heavy pair's chunk, -1 = the whole list
    red_pair: torch.Tensor  # (R,) int32 heavy pairs, -1 = unused
    red_first: torch.Tensor  # (R,) int32 first partial of each heavy pair (its chunks are consecutive)
    red_count: torch.Tensor  # (R,) int32 chunks of each heavy pair
    n_parts: int  # partial buffers to allocate (an upper bound on the chunks of heavy pairs)


def dkdv_work(row_ptr: torch.Tensor, block_m: int, split_rows: int | None = None,
              max_rows: int | None = None) -> DkdvWork:
    """Split the row lists of heavy (key block, KV head) pairs for the dk/dv kernel (issue 14, item 5).

    A block chosen by every query (a "sink", e.g. block 0) would otherwise keep one program per
    key tile walking all its rows while the rest of the GPU idles. A pair with more than
    ``split_rows`` rows becomes ceil(rows / split_rows) chunks; each writes float32 partial
    dk/dv that ``_dkdv_reduce_kernel`` sums in chunk order (deterministic, no atomics). Other
    pairs (the common case) stay one pass writing dk/dv directly.

    Built on device without reading a device value on the host: ``max_rows`` (a host int, at
    least ``row_ptr[-1]``; the caller passes Tq * Hq * n_slots; None reads ``row_ptr[-1]``, for
    tests) bounds every size. With R rows at most, at most R // split_rows pairs are heavy and
    they have at most 2 * R // split_rows chunks, so I <= P + R // split_rows items.

    Automatic ``split_rows`` (None and ``DKDV_SPLIT_ROWS`` None): ``DKDV_SPLIT_FACTOR`` times
    ``max_rows`` / P (the mean when every slot is used), rounded up to ``block_m``, at least
    ``DKDV_MIN_SPLIT_ROWS``: no program walks more than a few times the mean, and the partials
    number at most 2 P / ``DKDV_SPLIT_FACTOR`` (see there for their memory). row_ptr: (P + 1,) int32.
    """
    if split_rows is None:
        split_rows = DKDV_SPLIT_ROWS
    n_pairs = row_ptr.numel() - 1
    if max_rows is None:
        max_rows = int(row_ptr[-1])
    if split_rows is None:
        mean = -(-max_rows // max(1, n_pairs))
        split_rows = max(DKDV_MIN_SPLIT_ROWS, -(-DKDV_SPLIT_FACTOR * mean // block_m) * block_m)
    if not isinstance(split_rows, int) or isinstance(split_rows, bool) or split_rows < 1:
        raise ValueError(f"dkdv_split_rows must be a positive int or None, got {split_rows!r}")
    dev = row_ptr.device
    n_heavy_max = min(n_pairs, max_rows // split_rows)  # pairs with more than split_rows rows
    n_items_max = n_pairs + max_rows // split_rows
    n_parts_max = min(n_items_max, 2 * (max_rows // split_rows))
    counts = (row_ptr[1:] - row_ptr[:-1]).long()  # (P,)
    heavy = counts > split_rows  # (P,)
    n_items = torch.where(heavy, (counts + split_rows - 1) // split_rows, 1)  # (P,)
    item_end = torch.cumsum(n_items, 0)  # (P,) one past the last item of every pair
    first = item_end - n_items  # (P,) first item of every pair
    item = torch.arange(n_items_max, device=dev)  # (I,)
    pair = torch.searchsorted(item_end, item, right=True)  # (I,) == P past the last used item
    used = pair < n_pairs  # (I,)
    pair_c = pair.clamp(max=max(0, n_pairs - 1))
    local = item - first[pair_c]  # (I,) chunk index inside its pair
    begin = row_ptr[:-1].long()[pair_c] + local * split_rows
    end = torch.minimum(begin + split_rows, row_ptr[1:].long()[pair_c])
    is_part = used & heavy[pair_c]  # (I,)
    part = torch.where(is_part, torch.cumsum(is_part.long(), 0) - 1, -1)  # (I,)
    # Heavy pairs in ascending order: heavy pair p goes to entry (heavy pairs before p); the
    # others are written to a dump entry past the end, then cut off.
    rank = torch.where(heavy, torch.cumsum(heavy.long(), 0) - 1, n_heavy_max)  # (P,)
    red_pair = torch.full((n_heavy_max + 1,), -1, dtype=torch.long, device=dev)
    red_pair.scatter_(0, rank, torch.arange(n_pairs, device=dev))
    red_pair = red_pair[:n_heavy_max]  # (R,)
    red_c = red_pair.clamp(min=0, max=max(0, n_pairs - 1))
    red_first = torch.where(red_pair >= 0, part[first[red_c].clamp(max=max(0, n_items_max - 1))], 0)
    red_count = torch.where(red_pair >= 0, n_items[red_c], 0)
    i32 = dict(dtype=torch.int32)
    return DkdvWork(torch.where(used, pair, -1).to(**i32), begin.to(**i32), end.to(**i32), part.to(**i32),
                    red_pair.to(**i32), red_first.to(**i32), red_count.to(**i32), n_parts_max)


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
def gather_segment(s, SEG_START, SEG_END, SEG_PAIR, BLOCK_START, BLOCK_LEN, n_heads_kv):
    """Segment ``s`` of a "gather" program: the rows ``ROWS[r_begin:r_end]`` (one super-tile, one
    KV head) that selected one key block; returns r_begin, r_end and the block's first key token
    and length (int64 scalars)."""
    r_begin = tl.load(SEG_START + s).to(tl.int64)
    r_end = tl.load(SEG_END + s).to(tl.int64)
    block = tl.load(SEG_PAIR + s).to(tl.int64) // n_heads_kv
    block_start = tl.load(BLOCK_START + block).to(tl.int64)
    block_len = tl.load(BLOCK_LEN + block).to(tl.int64)
    return r_begin, r_end, block_start, block_len


@triton.jit
def gather_rows(r0, r_end, ROWS, Q_KEY_TOKEN, n_heads_q, causal, block_start, block_len, BLOCK_M: tl.constexpr):
    """Rows ``ROWS[r0:r0+BLOCK_M]`` of a segment (masked past r_end): their mask, row id
    ``token * Hq + head``, token, query head, key-token position (BLOCK_M,), and how many keys of
    the block any of them may see (n_end; causal cuts the tail after the last row's position)."""
    offs_r = r0 + tl.arange(0, BLOCK_M)
    r_ok = offs_r < r_end
    row = tl.load(ROWS + offs_r, mask=r_ok, other=0).to(tl.int64)  # token * Hq + head
    tok = row // n_heads_q
    head = row % n_heads_q
    q_tok = tl.load(Q_KEY_TOKEN + tok, mask=r_ok, other=0).to(tl.int64)
    q_tok_last = tl.max(tl.where(r_ok, q_tok, -1), 0)
    n_end = tl.where(causal != 0, tl.minimum(block_len, q_tok_last - block_start + 1), block_len)
    return r_ok, row, tok, head, q_tok, n_end


@triton.jit
def owned_rows(i0, t0, n_rows, group, kv_head, n_heads_q, BLOCK_M: tl.constexpr):
    """Rows i0:i0+BLOCK_M of the (token, query head) rows a gather program owns: the tokens of
    its super-tile (from t0, n_rows = tokens x group in all) x the query heads of its KV head."""
    i = i0 + tl.arange(0, BLOCK_M)
    ok = i < n_rows
    tok = t0 + i // group
    head = kv_head * group + i % group
    return ok, tok, head, tok * n_heads_q + head


@triton.jit
def block_descriptor(X, stride_t, stride_h, kv_head, block_start, block_len, d_real,
                     HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """TMA descriptor of one key block's (block_len, d_real) K or V rows of ``kv_head``, read in
    (BLOCK_N, HEAD_DIM) tiles; zero fill past the block and past d_real, so a tail block never
    reads the next sequence's keys (see ``tma_loads``)."""
    return tl.make_tensor_descriptor(X + block_start * stride_t + kv_head * stride_h,
                                     shape=[block_len.to(tl.int32), d_real], strides=[stride_t, 1],
                                     block_shape=[BLOCK_N, HEAD_DIM])


@triton.jit
def gather_kv_tile(X, desc, stride_t, stride_h, kv_head, block_start, block_len, n0, offs_n, offs_d, d_ok,
                   USE_TMA: tl.constexpr):
    """Keys n0:n0+BLOCK_N of a segment's block: the K or V tile (BLOCK_N, HEAD_DIM), through the
    block's TMA descriptor ``desc`` or a masked load (zeros past the block and past d_real)."""
    if USE_TMA:
        x = desc.load([tl.cast(n0, tl.int32), 0])
    else:
        kv_mask = ((n0 + offs_n) < block_len)[:, None] & d_ok[None, :]
        x = tl.load(X + (block_start + n0 + offs_n)[:, None] * stride_t + kv_head * stride_h + offs_d[None, :],
                    mask=kv_mask, other=0.0)
    return x


@triton.jit
def gather_block_scores(q, k, block_start, block_len, n0, offs_n, r_ok, q_tok, qk_scale, causal):
    """The rows' scaled scores against key tile n0:n0+BLOCK_N of a segment's block
    (BLOCK_M, BLOCK_N, log2 units) and the mask of the (row, key) pairs that count."""
    k_ok = (n0 + offs_n) < block_len
    k_tok = block_start + n0 + offs_n  # global key token
    s = tl.dot(q, tl.trans(k)) * qk_scale
    valid = r_ok[:, None] & k_ok[None, :]
    valid = valid & ((k_tok[None, :] <= q_tok[:, None]) | (causal == 0))
    return s, valid


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, IDX,
    TILE_SEQ, TILE_START, CU_Q, CU_K, CHOICE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    scale, n_heads_q, group, n_slots, block_size, causal, d_real,
    BIG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False, AUTO: tl.constexpr = False,
):
    if AUTO:  # "auto": both decompositions are launched; run only if the device flag chose union
        if tl.load(CHOICE) != 0:
            return
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
    TILE_SEQ, TILE_START, CU_Q, CU_K, CHOICE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    scale, n_heads_q, group, n_slots, block_size, causal, d_real,
    BIG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False, AUTO: tl.constexpr = False,
):
    if AUTO:  # "auto": run only if the forward's device flag chose union (see _fwd_kernel)
        if tl.load(CHOICE) != 0:
            return
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
    pair = tl.load(ITEM_PAIR + item).to(tl.int64)  # (global block, KV head) pair, -1 = unused item
    block = pair // n_heads_kv
    kv_head = pair % n_heads_kv
    block_len = tl.load(BLOCK_LEN + block, mask=pair >= 0, other=0).to(tl.int64)  # 0: the program exits
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
    pair = tl.load(RED_PAIR + red).to(tl.int64)  # -1 = unused entry
    block = pair // n_heads_kv
    kv_head = pair % n_heads_kv
    block_len = tl.load(BLOCK_LEN + block, mask=pair >= 0, other=0).to(tl.int64)  # 0: the program exits
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
def _bwd_delta_kernel(
    DO, O, DELTA,
    stride_dot, stride_doh, stride_ot, stride_oh,
    n_rows, n_heads_q, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program per BLOCK_T rows of the flattened (token, query head) rows: delta = rowsum(dO * O)
    # in float32 from the inputs' dtype, no float32 copies in memory. Row offsets in int64:
    # Tq * Hq * D passes 2**31 at 512K tokens x 32 heads x 128.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) int64
    token = rows // n_heads_q
    head = rows % n_heads_q
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    mask = (rows < n_rows)[:, None] & (offs_d < d_real)[None, :]  # (BLOCK_T, HEAD_DIM)
    do = tl.load(DO + (token * stride_dot + head * stride_doh)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    o = tl.load(O + (token * stride_ot + head * stride_oh)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # (BLOCK_T,)
    tl.store(DELTA + rows, delta, mask=rows < n_rows)


@triton.jit
def _fwd_gather_kernel(
    Q, K, V, O, LSE, ACC, L_SUM,
    ROWS, SEG_START, SEG_END, SEG_PAIR, PROG_PTR, ST_START, ST_END, BLOCK_START, BLOCK_LEN, Q_KEY_TOKEN, CHOICE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    scale, n_heads_q, n_heads_kv, causal, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, AUTO: tl.constexpr = False,
    USE_TMA: tl.constexpr = False,
):
    if AUTO:  # "auto": run only if the device flag chose gather; then ACC, L_SUM, O, LSE are
        # untouched here and the union kernel alone writes O and LSE (see _fwd_kernel)
        if tl.load(CHOICE) != 1:
            return
    # One program per (super-tile of one sequence's queries, KV head). It owns every row
    # (token of the tile, query head of the group) and walks its segments (key block, the rows
    # that chose it) in ascending block order, BLOCK_M gathered rows at a time. A row's running
    # softmax (max m in LSE, sum in L_SUM, fp32 output sum in ACC: one of each per row, not per
    # slot) is read, updated over the block and written back; only this program touches these
    # rows, so there are no atomics and no merge pass. The last loop writes out and lse.
    pid = tl.program_id(0).to(tl.int64)
    st = pid // n_heads_kv
    kv_head = pid % n_heads_kv
    group = n_heads_q // n_heads_kv
    t0 = tl.load(ST_START + st).to(tl.int64)
    n_rows = (tl.load(ST_END + st).to(tl.int64) - t0) * group
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    qk_scale = scale * 1.4426950408889634

    for i0 in range(0, n_rows, BLOCK_M):  # empty running state of the owned rows
        ok, tok, head, row = owned_rows(i0, t0, n_rows, group, kv_head, n_heads_q, BLOCK_M)
        tl.store(LSE + row, tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), mask=ok)
        tl.store(L_SUM + row, tl.zeros([BLOCK_M], dtype=tl.float32), mask=ok)
        tl.store(ACC + row[:, None] * d_real + offs_d[None, :], tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32),
                 mask=ok[:, None] & d_ok[None, :])
    tl.debug_barrier()  # other threads of this program read these rows next

    seg_begin = tl.load(PROG_PTR + pid).to(tl.int64)
    seg_stop = tl.load(PROG_PTR + pid + 1).to(tl.int64)
    for s in range(seg_begin, seg_stop):
        r_begin, r_end, block_start, block_len = gather_segment(s, SEG_START, SEG_END, SEG_PAIR, BLOCK_START,
                                                                BLOCK_LEN, n_heads_kv)
        k_desc = None
        v_desc = None
        if USE_TMA:  # sm_90: K/V tiles of this block through TMA (see tma_loads)
            k_desc = block_descriptor(K, stride_kt, stride_kh, kv_head, block_start, block_len, d_real, HEAD_DIM, BLOCK_N)
            v_desc = block_descriptor(V, stride_vt, stride_vh, kv_head, block_start, block_len, d_real, HEAD_DIM, BLOCK_N)
        for r0 in range(r_begin, r_end, BLOCK_M):
            r_ok, row, tok, head, q_tok, n_end = gather_rows(r0, r_end, ROWS, Q_KEY_TOKEN, n_heads_q, causal,
                                                             block_start, block_len, BLOCK_M)
            row_mask = r_ok[:, None] & d_ok[None, :]  # (BLOCK_M, HEAD_DIM)
            q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
            m_i = tl.load(LSE + row, mask=r_ok, other=float("-inf"))  # (BLOCK_M,) running max (base 2)
            l_i = tl.load(L_SUM + row, mask=r_ok, other=0.0)  # (BLOCK_M,) running sum
            acc = tl.load(ACC + row[:, None] * d_real + offs_d[None, :], mask=row_mask, other=0.0)  # float32
            for n0 in range(0, n_end, BLOCK_N):
                k = gather_kv_tile(K, k_desc, stride_kt, stride_kh, kv_head, block_start, block_len, n0, offs_n,
                                   offs_d, d_ok, USE_TMA)  # (BLOCK_N, HEAD_DIM)
                s_ij, valid = gather_block_scores(q, k, block_start, block_len, n0, offs_n, r_ok, q_tok, qk_scale,
                                                  causal)  # (BLOCK_M, BLOCK_N)
                s_ij = tl.where(valid, s_ij, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s_ij, 1))  # (BLOCK_M,)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # (BLOCK_M,)
                alpha = tl.exp2(m_i - m_safe)  # (BLOCK_M,)
                p = tl.exp2(s_ij - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = gather_kv_tile(V, v_desc, stride_vt, stride_vh, kv_head, block_start, block_len, n0, offs_n,
                                   offs_d, d_ok, USE_TMA)  # (BLOCK_N, HEAD_DIM)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            # pointers and masks rebuilt, not kept live across the key loop (registers)
            tl.store(LSE + row, m_i, mask=r_ok)
            tl.store(L_SUM + row, l_i, mask=r_ok)
            tl.store(ACC + row[:, None] * d_real + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])
            tl.debug_barrier()  # a later segment may hold the same rows in other threads

    for i0 in range(0, n_rows, BLOCK_M):  # normalise: out = acc / l, lse = m + log l
        ok, tok, head, row = owned_rows(i0, t0, n_rows, group, kv_head, n_heads_q, BLOCK_M)
        mask = ok[:, None] & d_ok[None, :]
        m_i = tl.load(LSE + row, mask=ok, other=float("-inf"))
        l_i = tl.load(L_SUM + row, mask=ok, other=0.0)
        acc = tl.load(ACC + row[:, None] * d_real + offs_d[None, :], mask=mask, other=0.0)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key: out 0, lse -inf
        tl.store(O + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=mask)
        tl.store(LSE + row, (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=ok)


@triton.jit
def _bwd_dq_gather_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DQ_ACC,
    ROWS, SEG_START, SEG_END, SEG_PAIR, PROG_PTR, ST_START, ST_END, BLOCK_START, BLOCK_LEN, Q_KEY_TOKEN, CHOICE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    scale, n_heads_q, n_heads_kv, causal, d_real,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, AUTO: tl.constexpr = False,
    USE_TMA: tl.constexpr = False,
):
    if AUTO:  # "auto": run only if the forward's device flag chose gather (DQ_ACC, DQ untouched otherwise)
        if tl.load(CHOICE) != 1:
            return
    # The forward gather's programs and segments; every row's float32 dq sum (DQ_ACC, one per
    # row) is read, increased by the block's contribution and written back, in ascending block
    # order: deterministic, no atomics. The last loop scales it and writes dq.
    pid = tl.program_id(0).to(tl.int64)
    st = pid // n_heads_kv
    kv_head = pid % n_heads_kv
    group = n_heads_q // n_heads_kv
    t0 = tl.load(ST_START + st).to(tl.int64)
    n_rows = (tl.load(ST_END + st).to(tl.int64) - t0) * group
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    d_ok = offs_d < d_real  # (HEAD_DIM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    qk_scale = scale * 1.4426950408889634

    for i0 in range(0, n_rows, BLOCK_M):
        ok, tok, head, row = owned_rows(i0, t0, n_rows, group, kv_head, n_heads_q, BLOCK_M)
        tl.store(DQ_ACC + row[:, None] * d_real + offs_d[None, :], tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32),
                 mask=ok[:, None] & d_ok[None, :])
    tl.debug_barrier()

    seg_begin = tl.load(PROG_PTR + pid).to(tl.int64)
    seg_stop = tl.load(PROG_PTR + pid + 1).to(tl.int64)
    for s in range(seg_begin, seg_stop):
        r_begin, r_end, block_start, block_len = gather_segment(s, SEG_START, SEG_END, SEG_PAIR, BLOCK_START,
                                                                BLOCK_LEN, n_heads_kv)
        k_desc = None
        v_desc = None
        if USE_TMA:  # sm_90: K/V tiles of this block through TMA (see tma_loads)
            k_desc = block_descriptor(K, stride_kt, stride_kh, kv_head, block_start, block_len, d_real, HEAD_DIM, BLOCK_N)
            v_desc = block_descriptor(V, stride_vt, stride_vh, kv_head, block_start, block_len, d_real, HEAD_DIM, BLOCK_N)
        for r0 in range(r_begin, r_end, BLOCK_M):
            r_ok, row, tok, head, q_tok, n_end = gather_rows(r0, r_end, ROWS, Q_KEY_TOKEN, n_heads_q, causal,
                                                             block_start, block_len, BLOCK_M)
            row_mask = r_ok[:, None] & d_ok[None, :]  # (BLOCK_M, HEAD_DIM)
            q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
            do = tl.load(DO + tok[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
                         mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)
            lse2 = tl.load(LSE + row, mask=r_ok, other=0.0) * 1.4426950408889634  # (BLOCK_M,)
            delta = tl.load(DELTA + row, mask=r_ok, other=0.0)  # (BLOCK_M,)
            dq = tl.load(DQ_ACC + row[:, None] * d_real + offs_d[None, :], mask=row_mask, other=0.0)  # float32
            for n0 in range(0, n_end, BLOCK_N):
                k = gather_kv_tile(K, k_desc, stride_kt, stride_kh, kv_head, block_start, block_len, n0, offs_n,
                                   offs_d, d_ok, USE_TMA)  # (BLOCK_N, HEAD_DIM)
                s_ij, valid = gather_block_scores(q, k, block_start, block_len, n0, offs_n, r_ok, q_tok, qk_scale,
                                                  causal)  # (BLOCK_M, BLOCK_N)
                v = gather_kv_tile(V, v_desc, stride_vt, stride_vh, kv_head, block_start, block_len, n0, offs_n,
                                   offs_d, d_ok, USE_TMA)  # (BLOCK_N, HEAD_DIM)
                p = tl.where(valid, tl.exp2(s_ij - lse2[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
                dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
                ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
                dq += tl.dot(ds.to(k.dtype), k)  # (BLOCK_M, HEAD_DIM)
            tl.store(DQ_ACC + row[:, None] * d_real + offs_d[None, :], dq, mask=r_ok[:, None] & d_ok[None, :])
            tl.debug_barrier()

    for i0 in range(0, n_rows, BLOCK_M):
        ok, tok, head, row = owned_rows(i0, t0, n_rows, group, kv_head, n_heads_q, BLOCK_M)
        mask = ok[:, None] & d_ok[None, :]
        dq = tl.load(DQ_ACC + row[:, None] * d_real + offs_d[None, :], mask=mask, other=0.0) * scale
        tl.store(DQ + tok[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers


def sort_block_indices(block_indices: torch.Tensor) -> torch.Tensor:
    """(Tq, Hq, n_slots) local block indices (PAD_INDEX = -1 anywhere) -> int32, ascending,
    padding replaced by ``BIG_INDEX`` (what the kernels' merge loop reads)."""
    idx = block_indices.to(torch.int32)
    idx = torch.where(idx < 0, torch.full_like(idx, BIG_INDEX), idx)
    return idx.sort(dim=-1).values.contiguous()


def _tiles(cu_q_t: torch.Tensor, tile: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiles of ``tile`` consecutive queries that never cross a sequence boundary, on device
    without a host sync (``n_tiles``, the count, comes from the host boundaries).

    Returns int32 (n_tiles,) sequence, first token and end token of every tile, and int64 (N,)
    the first tile of every sequence."""
    cu = cu_q_t.long()
    per_seq = (cu[1:] - cu[:-1] + tile - 1) // tile  # (N,)
    ends = torch.cumsum(per_seq, 0)
    first = ends - per_seq
    i = torch.arange(n_tiles, device=cu.device)
    seq = torch.searchsorted(ends, i, right=True)
    start = cu[seq] + (i - first[seq]) * tile
    end = torch.minimum(start + tile, cu[seq + 1])
    return seq.to(torch.int32), start.to(torch.int32), end.to(torch.int32), first


def n_query_tiles(cu_q: list[int], tile: int) -> int:
    """How many ``tile``-query tiles ``_tiles`` makes of the host boundaries ``cu_q``."""
    return sum(-(-(b - a) // tile) for a, b in zip(cu_q[:-1], cu_q[1:], strict=True))


def query_tiles(cu_q: list[int], block_m: int, device, cu_q_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of ``block_m`` consecutive queries that never cross a sequence boundary.

    Returns (tile_seq, tile_start), int32 (n_tiles,): sequence id and first query token. Built
    on device from ``cu_q_t`` (int32 (N + 1,), copied from ``cu_q`` when not given).
    """
    if cu_q_t is None:
        cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=device)
    seq, start, _, _ = _tiles(cu_q_t, block_m, n_query_tiles(cu_q, block_m))
    return seq, start


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
    """Block geometry the launchers need, on q's device (``kernel_layout``); int32 tensors."""

    cu_q: list[int]  # host list (N + 1,)
    cu_k: list[int]  # host list (N + 1,)
    cu_q_t: torch.Tensor  # (N + 1,)
    cu_k_t: torch.Tensor  # (N + 1,)
    q_seq: torch.Tensor  # (Tq,) sequence of every query token
    q_key_token: torch.Tensor  # (Tq,) global key-token index of every query's position
    block_offset: torch.Tensor  # (N,) global id of every sequence's first block
    block_start: torch.Tensor  # (G,) first key token of every block
    block_len: torch.Tensor  # (G,) tokens of every block
    block_size: int
    max_blocks: int  # most blocks of one sequence (host)


def kernel_layout(cu_q: list[int], cu_k: list[int], block_size: int, device) -> KernelLayout:
    """The geometry of ``block_size`` key blocks (the effective size, already clamped) from the
    host boundaries: per-block values computed on the host (O(blocks)) and sent in one copy
    (pinned, non-blocking on CUDA: no host sync); per-token values computed on device."""
    n_seq = len(cu_q) - 1
    lq = [b - a for a, b in zip(cu_q[:-1], cu_q[1:], strict=True)]
    lk = [b - a for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)]
    for n, (a, b) in enumerate(zip(lq, lk, strict=True)):
        if a > b:
            raise ValueError(f"sequence {n} has more queries ({a}) than keys ({b})")
    n_blocks = [-(-length // block_size) for length in lk]
    offsets = [0, *itertools.accumulate(n_blocks)]
    starts, lens = [], []
    for k0, length, nb in zip(cu_k[:-1], lk, n_blocks, strict=True):
        starts += range(k0, k0 + nb * block_size, block_size)
        lens += [min(block_size, length - j * block_size) for j in range(nb)]
    host = torch.tensor(list(cu_q) + list(cu_k) + offsets[:n_seq] + starts + lens, dtype=torch.int32)
    device = torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    cu_q_t, cu_k_t, block_offset, block_start, block_len = flat.split([n_seq + 1, n_seq + 1, n_seq, len(starts), len(starts)])
    tq = cu_q[-1]
    tok = torch.arange(tq, device=device)
    q_seq = torch.searchsorted(cu_q_t[1:].long(), tok, right=True)
    shift = (cu_k_t[1:] - cu_k_t[:-1]) - (cu_q_t[1:] - cu_q_t[:-1])  # queries end-aligned to their keys
    q_key_token = (cu_k_t[q_seq] + (tok - cu_q_t[q_seq]) + shift[q_seq]).to(torch.int32)
    return KernelLayout(list(cu_q), list(cu_k), cu_q_t, cu_k_t, q_seq.to(torch.int32), q_key_token, block_offset,
                        block_start, block_len, block_size, max(n_blocks, default=0))


#: The gather path's super-tile (queries of one sequence per program) is the smallest power of
#: two in this range that leaves at most ``GATHER_PROGRAMS`` programs (about 8 waves of 132
#: SMs): larger tiles put more rows in every (tile, block) segment, i.e. fuller BLOCK_M chunks
#: on uncorrelated selections; more programs balance the SMs.
GATHER_TILE_RANGE = (64, 16384)
GATHER_PROGRAMS = 1024


def gather_tile(total_q: int, n_heads_kv: int) -> int:
    """Queries per gather super-tile for ``total_q`` packed queries and ``n_heads_kv`` KV heads."""
    tile, largest = GATHER_TILE_RANGE
    while tile < largest and -(-total_q // tile) * n_heads_kv > GATHER_PROGRAMS:
        tile *= 2
    return tile


class Selection(NamedTuple):
    """The selection in the layouts the kernels read, built once in the forward on device
    (``build_selection``, int32, no host sync) and saved for the backward as one flat tensor.

    E = Tq * Hq * n_slots (every slot, padding included), P = G * Hkv (key block, KV head) pairs,
    S = segment bound (0 without the gather path), n_st super-tiles, n_prog = n_st * Hkv.
    """

    rows: torch.Tensor  # (E,) row = token * Hq + head, grouped by pair, ascending inside a pair; padding last
    row_ptr: torch.Tensor  # (P + 1,) rows of pair p: rows[row_ptr[p]:row_ptr[p + 1]]
    seg_start: torch.Tensor  # (S,) segment = the rows of one super-tile and pair, a range of ``rows``
    seg_end: torch.Tensor  # (S,)
    seg_pair: torch.Tensor  # (S,)
    prog_ptr: torch.Tensor  # (n_prog + 1,) segments of program (super-tile, KV head), ascending block
    st_start: torch.Tensor  # (n_st,) first token of every super-tile
    st_end: torch.Tensor  # (n_st,) end token of every super-tile
    choice: torch.Tensor  # (1,) 0 = union, 1 = gather (the forward's decomposition)


def selection_sizes(tq, hq: int, n_heads_kv: int, n_slots, lay_or_blocks, cu_q: list[int], with_segments: bool):
    """Sizes of the ``Selection`` fields, in field order (SymInt-safe in tq / n_slots: the custom
    op's fake uses it). ``lay_or_blocks``: (total blocks G, most blocks of one sequence)."""
    n_blocks, max_blocks = lay_or_blocks
    n_rows = tq * hq * n_slots
    tile = gather_tile(cu_q[-1], n_heads_kv)
    n_st = n_query_tiles(cu_q, tile) if with_segments else 0
    n_seg = torch.sym_min(n_rows, n_st * n_heads_kv * max_blocks) if with_segments else 0
    n_prog = n_st * n_heads_kv
    return [n_rows, n_blocks * n_heads_kv + 1, n_seg, n_seg, n_seg, n_prog + 1 if with_segments else 0, n_st, n_st, 1]


def unpack_selection(flat: torch.Tensor, sizes) -> Selection:
    return Selection(*flat.split(list(sizes)))


def build_selection(sorted_indices: torch.Tensor, lay: KernelLayout, n_heads_kv: int, with_segments: bool) -> torch.Tensor:
    """The flat int32 ``Selection`` of ``sorted_indices`` (Tq, Hq, n_slots): torch ops only, no
    host sync (no nonzero / unique / item; padding sorts last; counts by searchsorted; the sizes
    are static bounds from the host boundaries). ``choice`` is left 1 (gather)."""
    tq, hq, w = sorted_indices.shape
    dev = sorted_indices.device
    sizes = selection_sizes(tq, hq, n_heads_kv, w, (lay.block_start.numel(), lay.max_blocks), lay.cu_q, with_segments)
    n_pairs = sizes[1] - 1
    out = torch.empty(sum(sizes), dtype=torch.int32, device=dev)
    sel = unpack_selection(out, sizes)
    sel.choice.fill_(1)
    n = tq * hq * w
    flat = sorted_indices.reshape(-1)
    e = torch.arange(n, device=dev)
    row = e // w
    tok = row // hq
    valid = flat != BIG_INDEX
    block = lay.block_offset.long()[lay.q_seq.long()[tok]] + torch.where(valid, flat, 0).long()
    pair = torch.where(valid, block * n_heads_kv + (row % hq) // (hq // n_heads_kv), n_pairs)
    pair_sorted, order = torch.sort(pair, stable=True)  # rows ascending inside a pair
    rows = row[order]
    sel.rows.copy_(rows)
    sel.row_ptr.copy_(torch.searchsorted(pair_sorted, torch.arange(n_pairs + 1, device=dev)))
    if not with_segments:
        return out
    tile = gather_tile(lay.cu_q[-1], n_heads_kv)
    n_st = sizes[6]
    n_prog = n_st * n_heads_kv
    _, st_start, st_end, st_first = _tiles(lay.cu_q_t, tile, n_st)
    sel.st_start.copy_(st_start)
    sel.st_end.copy_(st_end)
    # super-tile of every entry (rows ascending inside a pair, so each (pair, super-tile) is a run)
    tok_s = rows // hq
    seq_s = lay.q_seq.long()[tok_s]
    st = st_first[seq_s] + (tok_s - lay.cu_q_t.long()[seq_s]) // tile
    key = pair_sorted * max(n_st, 1) + st
    n_valid = sel.row_ptr[-1:].long()  # (1,) on device
    is_start = (e < n_valid) & torch.cat([torch.ones(1, dtype=torch.bool, device=dev), key[1:] != key[:-1]])
    marker = torch.where(is_start, e, n)
    nxt = torch.cat([marker[1:], marker.new_full((1,), n)]).flip(0).cummin(0).values.flip(0)
    seg_end = torch.minimum(nxt, n_valid)  # next run's start, or the last valid entry's end
    prog = st * n_heads_kv + pair_sorted % n_heads_kv
    skey, _ = torch.sort(torch.where(is_start, prog * n + e, n_prog * n))  # program-major, ascending block
    skey = skey[: sizes[2]]
    pos = skey % max(n, 1)
    sel.seg_start.copy_(pos)
    sel.seg_end.copy_(seg_end[pos])
    sel.seg_pair.copy_(pair_sorted[pos])
    sel.prog_ptr.copy_(torch.searchsorted(skey // max(n, 1), torch.arange(n_prog + 1, device=dev)))
    return out


#: "auto" takes the union path unless it computes more than this many times the gather path's
#: MMA rows. bench/perf_model.py (modelled, not measured) puts the break-even of the two
#: paths' fwd+bwd time at 1.1-1.3x (union factor 1 / 2 / 4, 32K-512K, block 512/top-3 and
#: 128/top-8): the gather path pays a gathered q and one fp32 row state read and written per
#: (row, slot), the union path wasted MMA rows.
UNION_MARGIN = 1.25


def choose_decomposition(sorted_indices: torch.Tensor, lay: KernelLayout, sel: Selection, head_dim: int) -> torch.Tensor:
    """Union or gather for the forward and dq, from the MMA rows each would compute, decided on
    device: writes and returns ``sel.choice`` ((1,) int32, 0 = union, 1 = gather).

    union: every (query tile, head) computes BLOCK_M rows for every block of its union;
    gather: every segment (super-tile, block, KV head) computes its rows rounded up to BLOCK_M.
    Gather when union rows > ``UNION_MARGIN`` x gather rows (integer compare: margin as a ratio).
    No host sync: the launchers start both decompositions' kernels and the one not chosen
    reads the flag and exits (see ``attention_forward``).
    """
    tq, hq, w = sorted_indices.shape
    bm_union = FWD_CONFIGS[head_dim][0]
    bm_gather = FWD_GATHER_CONFIGS[head_dim][0]
    _, _, _, first = _tiles(lay.cu_q_t, bm_union, 0)
    tok = torch.arange(tq, device=sorted_indices.device)
    seq = lay.q_seq.long()
    tile = first[seq] + (tok - lay.cu_q_t.long()[seq]) // bm_union  # (Tq,)
    local = sorted_indices.long()
    key = (tile[:, None, None] * hq + torch.arange(hq, device=tok.device)[None, :, None]) * (lay.max_blocks + 1) + local
    key = torch.where(local == BIG_INDEX, -1, key).reshape(-1).sort().values
    union_blocks = ((key[1:] != key[:-1]) & (key[1:] >= 0)).sum() + (key[:1] >= 0).sum()
    seg_rows = (sel.seg_end - sel.seg_start).long()
    n_seg = sel.prog_ptr[-1:].long()
    live = torch.arange(seg_rows.numel(), device=tok.device) < n_seg
    gather_rows = torch.where(live, (seg_rows + bm_gather - 1) // bm_gather, 0).sum() * bm_gather
    num, den = fractions.Fraction(UNION_MARGIN).limit_denominator(1024).as_integer_ratio()  # int64 compare
    return sel.choice.copy_(union_blocks * (bm_union * den) > gather_rows * num)


def _resolve(decomposition: str) -> str:
    if decomposition not in ("auto", "union", "gather"):
        raise ValueError(f"decomposition must be 'auto', 'union' or 'gather', got {decomposition!r}")
    return decomposition


@on_inputs_device
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sorted_indices: torch.Tensor,
    lay: KernelLayout,
    causal: bool,
    scale: float,
    decomposition: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoBA forward. q (Tq, Hq, D), k/v (Tk, Hkv, D) with unit last stride; sorted_indices
    (Tq, Hq, n_slots) int32 from ``sort_block_indices``. ``decomposition``: "union" (per query
    tile), "gather" (per super-tile and key block) or "auto" (``choose_decomposition``).
    Returns out (Tq, Hq, D) in q.dtype, lse (Tq, Hq) float32 and the flat int32 selection
    (``build_selection``, choice filled in) that ``attention_backward`` reuses."""
    _check_inputs(q, k, v, sorted_indices.shape[-1])
    decomposition = _resolve(decomposition)
    tq, hq, d = q.shape
    hkv = k.shape[1]
    n_slots = sorted_indices.shape[-1]
    out = torch.empty_like(q)
    lse = torch.empty((tq, hq), dtype=torch.float32, device=q.device)
    flat = build_selection(sorted_indices, lay, hkv, decomposition != "union")
    sel = unpack_selection(flat, selection_sizes(tq, hq, hkv, n_slots, (lay.block_start.numel(), lay.max_blocks),
                                                 lay.cu_q, decomposition != "union"))
    if tq == 0:
        return out, lse, flat
    head_dim = padded_head_dim(d)
    # "auto" decides on device (sel.choice) and launches BOTH decompositions; every program of
    # the one not chosen reads the flag and returns at once. That costs one extra launch of
    # empty programs (a few microseconds); reading the flag on the host would drain the GPU
    # (a host sync) before either launch. Explicit decompositions compile without the flag read.
    auto = decomposition == "auto"
    if auto:
        choose_decomposition(sorted_indices, lay, sel, head_dim)
    elif decomposition == "union":
        sel.choice.fill_(0)
    if decomposition in ("union", "auto"):
        block_m, block_n, warps, stages = FWD_CONFIGS[head_dim]
        tile_seq, tile_start = query_tiles(lay.cu_q, block_m, q.device, lay.cu_q_t)
        _fwd_kernel[(tile_seq.numel() * hq,)](
            q, k, v, out, lse, sorted_indices,
            tile_seq, tile_start, lay.cu_q_t, lay.cu_k_t, sel.choice,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            scale, hq, hq // hkv, n_slots, lay.block_size, int(causal), d,
            BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=tma_loads("fwd", head_dim, k, v),
            AUTO=auto, num_warps=warps, num_stages=stages,
        )
    if decomposition in ("gather", "auto"):
        block_m, block_n, warps, stages = FWD_GATHER_CONFIGS[head_dim]
        # One float32 running state per row (not per slot): the output sum (Tq * Hq, D) and the
        # softmax sum (Tq * Hq,); the running max lives in ``lse`` until the kernel's last loop.
        # Under "auto" they are allocated whatever the flag (sizes are host-known) and only
        # written when gather was chosen.
        acc = torch.empty((tq * hq, d), dtype=torch.float32, device=q.device)
        l_sum = torch.empty((tq * hq,), dtype=torch.float32, device=q.device)
        _fwd_gather_kernel[(sel.st_start.numel() * hkv,)](
            q, k, v, out, lse, acc, l_sum,
            sel.rows, sel.seg_start, sel.seg_end, sel.seg_pair, sel.prog_ptr, sel.st_start, sel.st_end,
            lay.block_start, lay.block_len, lay.q_key_token, sel.choice,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            scale, hq, hkv, int(causal), d,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, AUTO=auto,
            USE_TMA=tma_loads("fwd_gather", head_dim, k, v), num_warps=warps, num_stages=stages,
        )
    return out, lse, flat


@on_inputs_device
def backward_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) for the backward: (Tq, Hq) float32 from dout and out (Tq, Hq, D),
    summed in float32 by ``_bwd_delta_kernel`` (one launch, no float32 copies of dO or O; the
    eager ``(dout.float() * out.float()).sum(-1)`` held three Tq x Hq x D x 4-byte temporaries,
    26 GB at 512K tokens, 32 heads, D = 128). Any token / head strides; a last dim that is not
    contiguous is copied first."""
    if dout.dim() != 3 or out.shape != dout.shape:
        raise ValueError(f"dout and out must both be (Tq, Hq, D), got dout {tuple(dout.shape)}, out {tuple(out.shape)}")
    if out.device != dout.device:
        raise ValueError(f"out is on {out.device}, dout on {dout.device}")
    dout, out = (t if t.stride(-1) == 1 else t.contiguous() for t in (dout, out))
    tq, hq, d = dout.shape
    delta = torch.empty((tq, hq), dtype=torch.float32, device=dout.device)
    n_rows = tq * hq
    if n_rows == 0 or d == 0:
        return delta.zero_()
    head_dim = padded_head_dim(d)
    block_t, warps = DELTA_CONFIGS[head_dim]
    _bwd_delta_kernel[(triton.cdiv(n_rows, block_t),)](
        dout, out, delta,
        dout.stride(0), dout.stride(1), out.stride(0), out.stride(1),
        n_rows, hq, d,
        HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=warps,
    )
    return delta


@on_inputs_device
def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sorted_indices: torch.Tensor,
    selection: torch.Tensor,
    lay: KernelLayout,
    causal: bool,
    scale: float,
    decomposition: str = "auto",
    dkdv_split_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoBA backward from the saved float32 lse and the forward's flat ``selection``. Returns
    dq, dk, dv in the dtypes of q, k, v. dq takes the forward's decomposition (for "auto" both dq
    kernels are launched and the one not chosen by ``selection``'s device flag exits at once:
    no host sync); dk/dv always gather per key tile, splitting the row
    lists longer than ``dkdv_split_rows`` (None: ``DKDV_SPLIT_ROWS`` or automatic, see
    ``dkdv_work``)."""
    _check_inputs(q, k, v, sorted_indices.shape[-1])
    decomposition = _resolve(decomposition)
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
    delta = backward_delta(dout, out)  # (Tq, Hq) float32
    lse = lse.contiguous()
    sel = unpack_selection(selection, selection_sizes(tq, hq, hkv, n_slots, (n_blocks, lay.max_blocks), lay.cu_q,
                                                      decomposition != "union"))
    block_start = lay.block_start
    block_len = lay.block_len
    q_key_token = lay.q_key_token
    # "auto": both dq kernels, each gated on the forward's device flag (see attention_forward).
    auto = decomposition == "auto"
    if decomposition in ("union", "auto"):
        block_m, block_n, warps, stages = DQ_CONFIGS[head_dim]
        use_tma = tma_loads("dq", head_dim, k, v)
        if not use_tma:
            stages = DQ_PLAIN_STAGES.get(head_dim, stages)
        tile_seq, tile_start = query_tiles(lay.cu_q, block_m, q.device, lay.cu_q_t)
        _bwd_dq_kernel[(tile_seq.numel() * hq,)](
            q, k, v, dout, lse, delta, dq, sorted_indices,
            tile_seq, tile_start, lay.cu_q_t, lay.cu_k_t, sel.choice,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            scale, hq, hq // hkv, n_slots, lay.block_size, int(causal), d,
            BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=use_tma,
            AUTO=auto, num_warps=warps, num_stages=stages,
        )
    if decomposition in ("gather", "auto"):
        block_m, block_n, warps, stages = DQ_GATHER_CONFIGS[head_dim]
        dq_acc = torch.empty((tq * hq, d), dtype=torch.float32, device=q.device)  # one fp32 dq sum per row
        _bwd_dq_gather_kernel[(sel.st_start.numel() * hkv,)](
            q, k, v, dout, lse, delta, dq, dq_acc,
            sel.rows, sel.seg_start, sel.seg_end, sel.seg_pair, sel.prog_ptr, sel.st_start, sel.st_end,
            block_start, block_len, q_key_token, sel.choice,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            scale, hq, hkv, int(causal), d,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, AUTO=auto,
            USE_TMA=tma_loads("dq_gather", head_dim, k, v), num_warps=warps, num_stages=stages,
        )

    block_m, block_n, warps, stages = DKDV_CONFIGS[head_dim]
    n_key_tiles = triton.cdiv(lay.block_size, block_n)
    work = dkdv_work(sel.row_ptr, block_m, dkdv_split_rows, max_rows=tq * hq * n_slots)
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
        red_tiles = triton.cdiv(lay.block_size, DKDV_REDUCE_BLOCK_N)
        _dkdv_reduce_kernel[(red_tiles * work.red_pair.numel(),)](
            part_dk, part_dv, dk, dv, work.red_pair, work.red_first, work.red_count, block_start, block_len,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            scale, hkv, red_tiles, lay.block_size, d,
            HEAD_DIM=head_dim, BLOCK_N=DKDV_REDUCE_BLOCK_N, num_warps=4,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile enumeration (used by tests/test_triton_compile.py)

_ATTN_SCALARS = ["fp32", "i32", "i32", "i32", "i32", "i32", "i32"]
#: Head dims whose "auto" specialisations (AUTO=True: the flag read and early exit in front of
#: the same body) are compile-tested too; the body is the explicit one, so one tuned dim suffices.
AUTO_COMPILE_HEAD_DIMS = (128,)


def kernel_configs(dtype: str):
    """Every (name, kernel, signature, constexprs, num_warps, num_stages) the launchers can
    launch for inputs of ``dtype`` ("fp16", "bf16", "fp32"), from the config tables above."""
    ptr = "*" + dtype
    for head_dim, (bm, bn, warps, stages) in FWD_CONFIGS.items():
        names = ["Q", "K", "V", "O", "LSE", "IDX", "TILE_SEQ", "TILE_START", "CU_Q", "CU_K", "CHOICE"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*i32", "*i32", "*i32", "*i32", "*i32", "*i32"] + ["i64"] * 8
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot", "stride_oh"]
        names += ["scale", "n_heads_q", "group", "n_slots", "block_size", "causal", "d_real"]
        types += _ATTN_SCALARS
        const = dict(BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=False, AUTO=False)
        yield f"fwd_d{head_dim}", _fwd_kernel, dict(zip(names, types, strict=True)), const, warps, stages
        if head_dim in TMA_HEAD_DIMS["fwd"] and dtype != "fp32":
            const = dict(const, USE_TMA=True)
            yield f"fwd_tma_d{head_dim}", _fwd_kernel, dict(zip(names, types, strict=True)), const, warps, stages
        if head_dim in AUTO_COMPILE_HEAD_DIMS:
            yield f"fwd_auto_d{head_dim}", _fwd_kernel, dict(zip(names, types, strict=True)), dict(const, AUTO=True), warps, stages
    for head_dim, (bm, bn, warps, stages) in DQ_CONFIGS.items():
        names = ["Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "IDX", "TILE_SEQ", "TILE_START", "CU_Q", "CU_K", "CHOICE"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*fp32", ptr, "*i32", "*i32", "*i32", "*i32", "*i32", "*i32"] + ["i64"] * 10
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                  "stride_dot", "stride_doh", "stride_dqt", "stride_dqh"]
        names += ["scale", "n_heads_q", "group", "n_slots", "block_size", "causal", "d_real"]
        types += _ATTN_SCALARS
        const = dict(BIG=BIG_INDEX, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=False, AUTO=False)
        yield (f"dq_d{head_dim}", _bwd_dq_kernel, dict(zip(names, types, strict=True)), const, warps,
               DQ_PLAIN_STAGES.get(head_dim, stages))
        if head_dim in TMA_HEAD_DIMS["dq"] and dtype != "fp32":
            const = dict(const, USE_TMA=True)
            yield f"dq_tma_d{head_dim}", _bwd_dq_kernel, dict(zip(names, types, strict=True)), const, warps, stages
        if head_dim in AUTO_COMPILE_HEAD_DIMS:
            yield (f"dq_auto_d{head_dim}", _bwd_dq_kernel, dict(zip(names, types, strict=True)), dict(const, AUTO=True),
                   warps, stages if const["USE_TMA"] else DQ_PLAIN_STAGES.get(head_dim, stages))
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
        const = dict(HEAD_DIM=head_dim, BLOCK_N=DKDV_REDUCE_BLOCK_N)
        yield f"dkdv_reduce_d{head_dim}", _dkdv_reduce_kernel, dict(zip(names, types, strict=True)), const, 4, 1
    for head_dim, (block_t, warps) in DELTA_CONFIGS.items():
        names = ["DO", "O", "DELTA", "stride_dot", "stride_doh", "stride_ot", "stride_oh", "n_rows", "n_heads_q", "d_real"]
        types = [ptr, ptr, "*fp32"] + ["i64"] * 4 + ["i32"] * 3
        const = dict(HEAD_DIM=head_dim, BLOCK_T=block_t)
        yield f"delta_d{head_dim}", _bwd_delta_kernel, dict(zip(names, types, strict=True)), const, warps, 1
    common = ["ROWS", "SEG_START", "SEG_END", "SEG_PAIR", "PROG_PTR", "ST_START", "ST_END", "BLOCK_START", "BLOCK_LEN",
              "Q_KEY_TOKEN", "CHOICE"]
    for head_dim, (bm, bn, warps, stages) in FWD_GATHER_CONFIGS.items():
        names = ["Q", "K", "V", "O", "LSE", "ACC", "L_SUM"] + common
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot", "stride_oh"]
        names += ["scale", "n_heads_q", "n_heads_kv", "causal", "d_real"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*fp32", "*fp32"] + ["*i32"] * 11 + ["i64"] * 8 + ["fp32"] + ["i32"] * 4
        const = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, AUTO=False, USE_TMA=False)
        sig = dict(zip(names, types, strict=True))
        yield f"fwd_gather_d{head_dim}", _fwd_gather_kernel, sig, const, warps, stages
        if head_dim in TMA_HEAD_DIMS["fwd_gather"] and dtype != "fp32":
            yield f"fwd_gather_tma_d{head_dim}", _fwd_gather_kernel, sig, dict(const, USE_TMA=True), warps, stages
        if head_dim in AUTO_COMPILE_HEAD_DIMS:
            yield f"fwd_gather_auto_d{head_dim}", _fwd_gather_kernel, sig, dict(const, AUTO=True), warps, stages
    for head_dim, (bm, bn, warps, stages) in DQ_GATHER_CONFIGS.items():
        names = ["Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "DQ_ACC"] + common
        names += ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_dot", "stride_doh",
                  "stride_dqt", "stride_dqh"]
        names += ["scale", "n_heads_q", "n_heads_kv", "causal", "d_real"]
        types = [ptr, ptr, ptr, ptr, "*fp32", "*fp32", ptr, "*fp32"] + ["*i32"] * 11 + ["i64"] * 10 + ["fp32"] + ["i32"] * 4
        const = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, AUTO=False, USE_TMA=False)
        sig = dict(zip(names, types, strict=True))
        yield f"dq_gather_d{head_dim}", _bwd_dq_gather_kernel, sig, const, warps, stages
        if head_dim in TMA_HEAD_DIMS["dq_gather"] and dtype != "fp32":
            yield f"dq_gather_tma_d{head_dim}", _bwd_dq_gather_kernel, sig, dict(const, USE_TMA=True), warps, stages
        if head_dim in AUTO_COMPILE_HEAD_DIMS:
            yield f"dq_gather_auto_d{head_dim}", _bwd_dq_gather_kernel, sig, dict(const, AUTO=True), warps, stages


__all__ = [
    "BIG_INDEX", "DELTA_CONFIGS", "DKDV_CONFIGS", "DKDV_SPLIT_ROWS", "DQ_CONFIGS", "DQ_PLAIN_STAGES", "DQ_GATHER_CONFIGS", "FWD_CONFIGS",
    "FWD_GATHER_CONFIGS", "TMA_HEAD_DIMS", "TMA_LOADS", "TRITON_CONFIG_OVERRIDES", "DkdvWork",
    "KernelLayout", "Selection", "attention_backward", "attention_forward", "backward_delta", "build_selection",
    "choose_decomposition", "dkdv_work", "gather_tile", "kernel_configs", "kernel_layout", "padded_head_dim",
    "query_tiles", "selection_sizes", "sort_block_indices", "tma_loads", "unpack_selection",
]
