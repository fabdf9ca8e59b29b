"""Analytic time and memory model of MoBA's Triton kernels against dense flash attention. MODELLED, not measured.

    python -m bench.perf_model                         # H200, Hq=32/Hkv=8, D=128, bf16: both settings, 32K/128K/512K
    python -m bench.perf_model --gpu H100 --per-kernel --seqlens 128k
    python -m bench.perf_model --json model.json

Every number printed here comes from the formulas and assumptions below: no GPU ran them. When
a GPU measures the kernels (bench/device_check.py), calibrate the efficiencies against it.

Designs modelled
----------------
* ``today-union`` / ``today-gather`` / ``today-auto``: the kernels as they are
  (triton_kernels/*.py at the time of writing): the gate's ``top_k - 1`` fp32-FMA passes over
  every block (future ones too), host glue (sort, selection grouping, ``torch.unique``) in the
  forward and again in the backward, the union kernel's wasted MMA rows or the gather kernel's
  per-slot float32 partials and their slot-by-slot merge in PyTorch, and dk/dv with one
  program per key tile walking every row that chose its block. ``auto`` is the launcher's
  rule (union unless it computes > 1.5x the gather MMA rows).
* ``owner-gather`` / ``owner-auto``: the gather path as it is now (issue 14, item 2) with the
  selection built once on device (item 4), everything else as ``today-*``: one program per
  (super-tile of ``gather_tile`` queries, KV head) walks its segments (key block, the rows of
  the tile that chose it, all query heads of the group) ``BLOCK_M`` rows at a time and keeps
  ONE float32 running state per row (output sum, max, sum) in global memory, read and written
  back per segment: no per-slot partials, no merge pass. ``owner-auto``: union unless its MMA
  rows exceed ``UNION_MARGIN`` x the gather rows. ``--uncorrelated`` models random
  selections (every row's past picks independent: the union path's worst case).
* ``redesign``: issue 14's plan, as a target: a one-pass tensor-core gate over past blocks
  only that emits the per-block row lists (no host glue, no syncs); one program per 128-row
  query tile walking the blocks its rows chose (per-row masks, no partials in HBM); dk/dv
  with heavy ("sink") blocks split across SMs and reduced deterministically.

Per kernel: FLOPs (2 per multiply-add; the MMA work actually issued, so wasted rows count),
HBM bytes, programs vs SMs (waves and the tail of the last wave), and time =
max(MMA time / tail efficiency, HBM time) + launch; peak memory = what the launchers allocate
above the inputs (counted from the code), at its peak.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from moba._core.accounting import attention_flops, dense_pairs, moba_pairs
from moba._core.hardware import find_device

from ._common import make_parser, parse_sizes

# =============================================================================================
# ASSUMPTIONS (all of them; each is a lead until a GPU measures it)
# =============================================================================================


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak (datasheet, SXM)
    fp32_tflops: float  # fp32 FMA peak (non-tensor)
    hbm_tbps: float  # HBM bandwidth (datasheet)
    mem_gib: float


def _gpu(key: str) -> GPU:
    """A row of ``moba._core.hardware``'s table (the one peak table) in this model's units."""
    d = find_device(key)
    return GPU(d.label, d.sms, d.bf16_flops / 1e12, d.fp32_flops / 1e12, d.hbm_bytes / 1e12, d.mem_gib)


GPUS = {key: _gpu(key) for key in ("H100", "H200")}
#: Achievable fraction of the bf16 peak for a large GEMM. Measured on this workplace's H200:
#: 788 TFLOP/s on random 8192^3 bf16 (KINDS.md, 2026-10-28) = 0.80 of 989.
MMA_FRACTION = 0.80  # every efficiency below is a fraction of the datasheet peak, at most this
#: Achievable fraction of HBM bandwidth for streaming kernels. H200 here: a device copy moved
#: 4.3 TB/s (KINDS.md) = 0.90 of 4.8.
HBM_FRACTION = 0.90
#: Dense causal flash attention at long S, fraction of the bf16 peak, per head dim. FA2-class
#: (flash-attn 2 on H100: about 330-370 TFLOP/s forward, about 280 backward at D=128) and
#: FA3-class (flash-attn 3: about 650 forward, about 500 backward at D=128), read off the
#: FlashAttention-3 paper's H100 figures (approximate); D=64 runs at about 0.8 of D=128.
DENSE_EFF = {
    ("FA2", 128): {"fwd": 0.35, "bwd": 0.28},
    ("FA3", 128): {"fwd": 0.65, "bwd": 0.50},
    ("FA2", 64): {"fwd": 0.28, "bwd": 0.22},
    ("FA3", 64): {"fwd": 0.52, "bwd": 0.40},
}
#: Our Triton attention kernels today (64-row tiles, 8 warps, 255 registers, 1 block per SM,
#: no TMA; bench/kernel_report.py), fraction of the bf16 peak inside their inner loop. A guess.
TODAY_EFF = {"fwd": 0.25, "bwd": 0.18}
#: The redesigned attention (128-row tiles, TMA/block pointers, no spills): FA2-class. A target.
REDESIGN_EFF = {"fwd": 0.35, "bwd": 0.28}
#: Today's gate: fp32 FMA dot (input_precision="ieee"), 4 warps, heavy spills (kernel_report:
#: ~14 KB spill traffic, ~3,200 LDL/STL on sm_90): fraction of the fp32 peak. A guess.
GATE_FMA_FRACTION = 0.35
#: Redesigned gate: bf16 tensor-core scores, fraction of the bf16 peak (small N = D tiles). A guess.
GATE_TC_EFF = 0.30
#: Redesigned gate's running top-k: compare/select operations per score and top-k slot, on
#: the fp32 pipes at GATE_FMA_FRACTION.
TOPK_OPS_PER_SCORE_SLOT = 2
#: Tile shapes. Today: BLOCK_M = 64 for every attention kernel, BLOCK_M = 64 gate rows; redesign: 128.
TODAY_BLOCK_M = 64
REDESIGN_BLOCK_M = 128
#: Resident programs per SM (kernel_report, sm_90, D=128: attention 1 block of 8 warps;
#: the gate 3 blocks of 4 warps).
ATTN_BLOCKS_PER_SM = 1
GATE_BLOCKS_PER_SM = 3
#: Distinct past blocks a query tile's rows select together, as a multiple of one row's
#: (top_k - 1) (union path). 1 = neighbouring queries pick the same blocks; 64 = unrelated.
#: Trained models' neighbouring queries mostly agree: 2 is a guess to calibrate.
UNION_FACTOR = 2.0
#: Fraction of all query rows that pick the most popular past block (an attention "sink"; in
#: trained LLMs block 0 is chosen by nearly every query). Sets dk/dv's longest program today.
SINK_FRACTION = 1.0
#: Host glue per (token, head, slot) of the selection, HBM bytes per pass (radix sorts of
#: int64 keys with int64 values, nonzero, bincount, cumsum, gathers: about 10 passes of 16 B),
#: and the number of such passes: sort_block_indices + _selection + choose_decomposition
#: (torch.unique) in the forward, _selection again in the backward.
GLUE_BYTES_PER_SLOT = 160
GLUE_SYNCS = 4  # host syncs (nonzero, .item(), unique): each drains the GPU
#: Selection built once on device (attention.build_selection): two sorts of int64 keys over
#: every (token, head, slot) plus gathers, cummin, searchsorted: about 12 passes of 16 B.
#: No sync with an explicit decomposition; "auto" adds one sync in the forward (the
#: comparison, after a third sort for the union size) and one in the backward (read back).
OWNER_GLUE_BYTES_PER_SLOT = 192
OWNER_AUTO_SYNCS = 2
#: Gather super-tile and program target (triton_kernels/attention.py: GATHER_TILE_RANGE,
#: GATHER_PROGRAMS) and its UNION_MARGIN.
GATHER_TILE_RANGE = (64, 16384)
GATHER_PROGRAMS = 1024
UNION_MARGIN = 1.25
#: Gather kernels' programs per SM (kernel_report, sm_90, D=128: forward 4 warps at 254
#: registers = 2 blocks; dq 8 warps = 1 block).
OWNER_FWD_BLOCKS_PER_SM = 2
SYNC_US = 20.0
LAUNCH_US = 4.0  # per kernel launch (and per PyTorch op in the glue / merge)


# =============================================================================================
# Model
# =============================================================================================


@dataclass(frozen=True)
class Shape:
    seqlen: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 512
    top_k: int = 3
    batch: int = 1
    elem_bytes: int = 2  # bf16 / fp16

    @property
    def rows(self) -> int:
        """(token, query head) rows."""
        return self.batch * self.seqlen * self.heads

    @property
    def n_blocks(self) -> int:
        return -(-self.seqlen // self.block_size)

    @property
    def n_slots(self) -> int:
        return min(self.top_k, self.n_blocks)


@dataclass
class Kernel:
    """One kernel (or one group of PyTorch ops) of a design, modelled."""

    name: str
    phase: str  # fwd | bwd
    flops: float = 0.0  # MMA FLOPs issued (wasted rows included)
    useful_flops: float = 0.0  # of which attended pairs
    fma_flops: float = 0.0  # non-tensor FLOPs / ops
    hbm_bytes: float = 0.0
    programs: int = 0
    blocks_per_sm: int = ATTN_BLOCKS_PER_SM
    mma_eff: float = 1.0
    serial_flops: float = 0.0  # MMA FLOPs of the longest single program (it runs on one SM)
    launches: int = 1
    syncs: int = 0
    seconds: float = 0.0
    notes: str = ""


def tail_efficiency(programs: int, sms: int, blocks_per_sm: int = 1) -> float:
    """Fraction of the SM slots busy over all waves (1.0 when the programs fill whole waves)."""
    if programs <= 0:
        return 1.0
    slots = sms * blocks_per_sm
    waves = math.ceil(programs / slots)
    return programs / (waves * slots)


def kernel_seconds(k: Kernel, gpu: GPU) -> float:
    """max(MMA time / tail efficiency, FMA time, HBM time, longest program) + launches + syncs."""
    serial = k.serial_flops / (gpu.bf16_tflops * 1e12 / gpu.sms * k.mma_eff) if k.serial_flops else 0.0
    tail = tail_efficiency(k.programs, gpu.sms, k.blocks_per_sm) if k.programs else 1.0
    mma = k.flops / (gpu.bf16_tflops * 1e12 * k.mma_eff) / tail if k.flops else 0.0
    fma = k.fma_flops / (gpu.fp32_tflops * 1e12 * GATE_FMA_FRACTION) / tail if k.fma_flops else 0.0
    hbm = k.hbm_bytes / (gpu.hbm_tbps * 1e12 * HBM_FRACTION)
    return max(mma, fma, hbm, serial) + k.launches * LAUNCH_US * 1e-6 + k.syncs * SYNC_US * 1e-6


def attended_pairs(s: Shape) -> float:
    """Attended (query, key) pairs over batch and query heads (``_attn_model.moba_pairs``, causal)."""
    return float(moba_pairs(s.seqlen, s.block_size, s.top_k, True) * s.heads * s.batch)


def _mean_past_blocks(s: Shape) -> float:
    """Mean over queries of the complete past blocks (gate candidates): about n_blocks / 2."""
    nb, bs = s.n_blocks, s.block_size
    return sum(min(c, nb) * min(bs, s.seqlen - c * bs) for c in range(nb)) / s.seqlen


def _per_block_flops(s: Shape, rows: float, mode: str) -> float:
    """MMA FLOPs of ``rows`` query rows against one full key block."""
    return attention_flops(rows * s.block_size, s.head_dim, mode)


# ---------------------------------------------------------------------------- dense flash
def dense_flash(s: Shape, gpu: GPU, cls: str) -> dict:
    """Dense causal flash attention (FA2- or FA3-class): seconds and peak bytes above the inputs."""
    pairs = dense_pairs(s.seqlen, True) * s.heads * s.batch
    eff = DENSE_EFF[(cls, 128 if s.head_dim >= 128 else 64)]
    peak = gpu.bf16_tflops * 1e12
    fwd = attention_flops(pairs, s.head_dim, "fwd") / (peak * eff["fwd"])
    bwd = attention_flops(pairs, s.head_dim, "bwd") / (peak * eff["bwd"])
    r, d, e = s.rows, s.head_dim, s.elem_bytes
    kv = s.batch * s.seqlen * s.kv_heads * d * e
    mem_fwd = r * d * e + r * 4  # out + lse
    # backward: out, lse kept; dq, dk, dv; delta; float32 dq accumulator (flash-attn 2 and 3)
    mem_bwd = mem_fwd + r * d * e + 2 * kv + r * 4 + r * d * 4
    return dict(fwd_s=fwd, bwd_s=bwd, fwd_bwd_s=fwd + bwd, mem_fwd=mem_fwd, mem_fwd_bwd=max(mem_fwd, mem_bwd),
                flops_fwd=attention_flops(pairs, s.head_dim, "fwd"))


# ---------------------------------------------------------------------------- today's kernels
def _glue(s: Shape, phase: str, passes: int) -> Kernel:
    slots = s.rows * s.n_slots
    return Kernel(f"host glue ({phase})", phase, hbm_bytes=passes * GLUE_BYTES_PER_SLOT * slots,
                  launches=25 * passes, syncs=GLUE_SYNCS if phase == "fwd" else GLUE_SYNCS - 1,
                  notes="sort / selection grouping / unique in PyTorch")


def today_gate(s: Shape) -> list[Kernel]:
    """Block means + the fp32 top-k kernel: n_pick passes over every block (BLOCK_B = 32)."""
    d, e = s.head_dim, s.elem_bytes
    means = Kernel("_block_mean_kernel", "fwd", hbm_bytes=s.batch * s.seqlen * s.kv_heads * d * e
                   + s.batch * s.n_blocks * s.kv_heads * d * 4, programs=s.batch * s.n_blocks * s.kv_heads)
    n_pick = min(s.top_k - 1, s.n_blocks)
    tiles = s.batch * -(-s.seqlen // TODAY_BLOCK_M) * s.heads
    padded_blocks = -(-s.n_blocks // 32) * 32
    fma = 2.0 * tiles * TODAY_BLOCK_M * padded_blocks * d * n_pick
    gate = Kernel("_gate_topk_kernel", "fwd", fma_flops=fma, programs=tiles, blocks_per_sm=GATE_BLOCKS_PER_SM,
                  hbm_bytes=s.rows * d * e + s.rows * s.n_slots * 4,
                  notes=f"{n_pick} fp32 passes over all {s.n_blocks} blocks")
    return [means, gate]


def _union_products(s: Shape, factor: float | None = None) -> float:
    """(64-row query tile, key block) products of the union path, per batch x query head, in
    units of full blocks: the union of past picks (``UNION_FACTOR``) plus the own block up to
    the tile's last row."""
    total = 0.0
    bm, bs = TODAY_BLOCK_M, s.block_size
    factor = UNION_FACTOR if factor is None else factor
    for i in range(-(-s.seqlen // bm)):
        c = (i * bm) // bs
        total += min(c, (s.top_k - 1) * factor) + min(bs, (i * bm) % bs + bm) / bs
    return total


def _gather_rows(s: Shape) -> float:
    """MMA rows of the gather path: the rows selecting each (block, KV head) pair, rounded up
    to BLOCK_M (selections spread evenly over the blocks)."""
    group = s.heads // s.kv_heads
    rows_per_pair = s.seqlen * group * s.n_slots / s.n_blocks
    return math.ceil(rows_per_pair / TODAY_BLOCK_M) * TODAY_BLOCK_M * s.n_blocks * s.kv_heads * s.batch


def today_decomposition(s: Shape, uncorrelated: bool = False) -> str:
    """The launcher's "auto" rule: union unless its MMA rows exceed 1.5x the gather rows."""
    union_rows = _union_products(s, TODAY_BLOCK_M if uncorrelated else None) * s.heads * s.batch * TODAY_BLOCK_M
    return "union" if union_rows <= 1.5 * _gather_rows(s) else "gather"


def today_attention(s: Shape, decomposition: str, uncorrelated: bool = False) -> list[Kernel]:
    """Forward and backward attention kernels of today's code, plus the gather merges.

    Matmuls per kernel: forward 2 (QK^T, PV); dq 3 (QK^T, dO V^T, dS K); dk/dv 4 (QK^T,
    P^T dO, dO V^T, dS^T Q), each 2 * rows * keys * D FLOPs."""
    d, e, r = s.head_dim, s.elem_bytes, s.rows
    useful = attended_pairs(s)
    useful_fwd = attention_flops(useful, d, "fwd")
    group = s.heads // s.kv_heads
    if decomposition == "auto":
        decomposition = today_decomposition(s, uncorrelated)
    out: list[Kernel] = []
    if decomposition == "union":
        tiles = s.batch * -(-s.seqlen // TODAY_BLOCK_M) * s.heads
        products = _union_products(s, TODAY_BLOCK_M if uncorrelated else None) * s.heads * s.batch
        fl = products * attention_flops(TODAY_BLOCK_M * s.block_size, d, "fwd")
        kv_reads = products * s.block_size * d * e * 2 / group  # the heads of a GQA group share K/V via L2
        out.append(Kernel("_fwd_kernel (union)", "fwd", flops=fl, useful_flops=useful_fwd,
                          hbm_bytes=2 * r * d * e + r * 4 + kv_reads, programs=tiles, mma_eff=TODAY_EFF["fwd"]))
        out.append(Kernel("_bwd_dq_kernel (union)", "bwd", flops=1.5 * fl, useful_flops=1.5 * useful_fwd,
                          hbm_bytes=3 * r * d * e + 8 * r + kv_reads, programs=tiles, mma_eff=TODAY_EFF["bwd"]))
    else:
        nnz = r * s.n_slots
        rows = _gather_rows(s)
        chunks = int(rows // TODAY_BLOCK_M)
        fl = attention_flops(rows * s.block_size, d, "fwd")  # every chunk row against the whole block
        kv_reads = chunks * s.block_size * d * e * 2
        out.append(Kernel("_fwd_gather_kernel", "fwd", flops=fl, useful_flops=useful_fwd,
                          hbm_bytes=nnz * d * e + kv_reads + nnz * (4 * d + 4), programs=chunks, mma_eff=TODAY_EFF["fwd"],
                          notes="one float32 (out, lse) partial per (row, slot) to HBM"))
        # merge: slot-lse gather, logsumexp, weights; then per slot: gather a partial (read 4D,
        # write 4D), scale it (read 4D, write 4D), add to the running sum (read 8D, write 4D).
        out.append(Kernel("gather merge (PyTorch)", "fwd", hbm_bytes=nnz * (24 * d + 40) + r * (4 * d + d * e),
                          launches=10 + 4 * s.n_slots))
        out.append(Kernel("_bwd_dq_gather_kernel", "bwd", flops=1.5 * fl, useful_flops=1.5 * useful_fwd,
                          hbm_bytes=2 * nnz * d * e + nnz * 8 + kv_reads + nnz * 4 * d, programs=chunks,
                          mma_eff=TODAY_EFF["bwd"], notes="one float32 dq partial per (row, slot) to HBM"))
        out.append(Kernel("gather dq sum (PyTorch)", "bwd", hbm_bytes=nnz * 24 * d + r * (4 * d + d * e),
                          launches=3 * s.n_slots + 2))
    # dk/dv: one program per (64-key tile, block, KV head) walks every row that chose the block,
    # over whole key tiles (the own block's causal half is masked, not skipped).
    key_tiles = -(-s.block_size // 64) * s.n_blocks * s.kv_heads * s.batch
    rows_per_block = s.seqlen * group * s.n_slots / s.n_blocks
    sink_rows = max(SINK_FRACTION * s.seqlen * group, rows_per_block)
    waste = s.n_slots / max(0.5, s.n_slots - 0.5)
    out.append(Kernel("_bwd_dkdv_kernel", "bwd", flops=2 * useful_fwd * waste, useful_flops=2 * useful_fwd,
                      hbm_bytes=4 * s.batch * s.seqlen * s.kv_heads * d * e + key_tiles * rows_per_block * (2 * d * e + 12),
                      programs=key_tiles, mma_eff=TODAY_EFF["bwd"],
                      serial_flops=math.ceil(sink_rows / 64) * attention_flops(64 * 64, d, "fwd") * 2,
                      notes=f"longest program: {sink_rows:.0f} rows (sink fraction {SINK_FRACTION})"))
    return out


# ---------------------------------------------------------------------------- owner-computes gather
def gather_tile(s: Shape) -> int:
    """Queries per super-tile (attention.gather_tile): the smallest power of two in
    GATHER_TILE_RANGE that leaves at most GATHER_PROGRAMS (super-tile, KV head) programs."""
    tile, largest = GATHER_TILE_RANGE
    while tile < largest and -(-s.batch * s.seqlen // tile) * s.kv_heads > GATHER_PROGRAMS:
        tile *= 2
    return tile


def expected_distinct(candidates: float, picks: float) -> float:
    """Expected distinct values among ``picks`` uniform draws from ``candidates`` (balls in bins)."""
    if candidates <= 0 or picks <= 0:
        return 0.0
    return candidates * (1.0 - (1.0 - 1.0 / candidates) ** picks)


def _owner_segments(s: Shape, uncorrelated: bool = False) -> tuple[float, float, int]:
    """(MMA rows, chunks, programs) of the owner-computes gather path: per program (super-tile of
    ``tile`` tokens x ``group`` heads = R rows), the past picks R x n_pick land on u distinct
    blocks (uncorrelated: balls in bins over the c complete past blocks; correlated: the
    union rule, n_pick x UNION_FACTOR), each a segment of R x n_pick / u rows rounded up to
    BLOCK_M; plus the own-block segments (R rows, rounded up per block the tile touches)."""
    tile, bm = gather_tile(s), TODAY_BLOCK_M
    group = s.heads // s.kv_heads
    n_pick = max(0, s.n_slots - 1)
    n_tiles = -(-s.seqlen // tile)
    chunks = 0.0
    for i in range(n_tiles):
        t0, t1 = i * tile, min(s.seqlen, (i + 1) * tile)
        r = (t1 - t0) * group
        c = t0 // s.block_size  # complete past blocks at the tile's first token (the fewest)
        own_blocks = (t1 - 1) // s.block_size - t0 // s.block_size + 1
        chunks += own_blocks * math.ceil(r / own_blocks / bm)
        if n_pick and c:
            picks = r * n_pick
            u = expected_distinct(c, picks) if uncorrelated else min(c, n_pick * UNION_FACTOR * max(1.0, r / bm))
            u = max(1.0, min(u, picks))
            chunks += u * math.ceil(picks / u / bm)
    chunks *= s.kv_heads * s.batch
    return chunks * bm, chunks, n_tiles * s.kv_heads * s.batch


def owner_attention(s: Shape, uncorrelated: bool = False) -> list[Kernel]:
    """Forward and dq kernels of the owner-computes gather path (MMA on whole key blocks per
    chunk; the own block's causal half counted whole, as the union path's)."""
    d, e, r = s.head_dim, s.elem_bytes, s.rows
    useful_fwd = attention_flops(attended_pairs(s), d, "fwd")
    nnz = r * s.n_slots
    mma_rows, chunks, programs = _owner_segments(s, uncorrelated)
    fl = attention_flops(mma_rows * s.block_size, d, "fwd")
    kv_reads = chunks * s.block_size * d * e * 2  # the heads of a group share a chunk: K/V once per chunk
    # per (row, slot): gathered q, and the row state read + written (acc 4D, max 4, sum 4);
    # per row: state initialised (written), read at the end, out + lse written.
    state = nnz * (d * e + 2 * (4 * d + 8)) + r * (4 * d + 8) * 2 + r * (d * e + 4)
    fwd = Kernel("_fwd_gather_kernel (owner)", "fwd", flops=fl, useful_flops=useful_fwd,
                 hbm_bytes=state + kv_reads, programs=programs, blocks_per_sm=OWNER_FWD_BLOCKS_PER_SM,
                 mma_eff=TODAY_EFF["fwd"],
                 notes=f"one fp32 state per row, {nnz * (8 * d + 16) / 2**30:.1f} GiB read+written per pass")
    dq_state = nnz * (2 * d * e + 8 + 8 * d) + r * 4 * d * 2 + r * d * e
    dq = Kernel("_bwd_dq_gather_kernel (owner)", "bwd", flops=1.5 * fl, useful_flops=1.5 * useful_fwd,
                hbm_bytes=dq_state + kv_reads, programs=programs, mma_eff=TODAY_EFF["bwd"],
                notes="one fp32 dq sum per row")
    return [fwd, dq]


def owner_decomposition(s: Shape, uncorrelated: bool = False) -> str:
    """``owner-auto``'s rule: union unless its MMA rows exceed UNION_MARGIN x the gather rows."""
    factor = TODAY_BLOCK_M if uncorrelated else UNION_FACTOR
    union_rows = _union_products(s, factor) * s.heads * s.batch * TODAY_BLOCK_M
    return "union" if union_rows <= UNION_MARGIN * _owner_segments(s, uncorrelated)[0] else "gather"


def _owner_glue(s: Shape, phase: str, syncs: int) -> Kernel:
    return Kernel(f"selection build ({phase})", phase, hbm_bytes=OWNER_GLUE_BYTES_PER_SLOT * s.rows * s.n_slots,
                  launches=30, syncs=syncs, notes="once, on device; saved for the backward")


def memory_owner(s: Shape, decomposition: str) -> dict:
    """Peak bytes above the inputs of the owner-computes path (fwd alone; fwd+bwd)."""
    d, e, r, w = s.head_dim, s.elem_bytes, s.rows, s.n_slots
    nnz = r * w
    kv = s.batch * s.seqlen * s.kv_heads * d * e
    out_lse = r * d * e + r * 4
    idx = r * w * 4 * 2  # gate output + sorted copy (kept for the backward)
    _, _, progs = _owner_segments(s)
    n_seg = min(nnz, progs * s.n_blocks)
    sel = nnz * 4 + 3 * n_seg * 4  # rows + segments, int32, kept for the backward
    build_tmp = nnz * 8 * 5  # pair, sorted pair, order, row, segment keys (int64) at the peak
    state = r * (4 * d + 4) if decomposition == "gather" else 0  # fp32 output sum + softmax sum
    fwd = out_lse + idx + sel + max(build_tmp, state)
    dq_acc = r * d * 4 if decomposition == "gather" else 0
    bwd = out_lse + idx + sel + r * d * e + 2 * kv + r * 4 + dq_acc
    return dict(mem_fwd=fwd, mem_fwd_bwd=max(fwd, bwd))


# ---------------------------------------------------------------------------- redesign
def redesign_kernels(s: Shape) -> list[Kernel]:
    d, e, r = s.head_dim, s.elem_bytes, s.rows
    useful = attended_pairs(s)
    past = _mean_past_blocks(s)
    n_pick = max(0, min(s.top_k - 1, s.n_blocks))
    tiles = s.batch * -(-s.seqlen // REDESIGN_BLOCK_M) * s.heads
    gate = Kernel("gate (one pass, tensor cores)", "fwd", flops=2.0 * r * past * d,
                  fma_flops=r * past * n_pick * TOPK_OPS_PER_SCORE_SLOT,
                  hbm_bytes=s.batch * s.seqlen * s.kv_heads * d * e + r * d * e + r * s.n_slots * 4 * 2,
                  programs=tiles, mma_eff=GATE_TC_EFF, launches=2, notes="past blocks only, running top-k")
    # per query tile: own block (half, causal) + the union of its rows' picks, 128-row tiles
    union = min(past, (s.top_k - 1) * UNION_FACTOR) + 0.5
    fl = tiles * union * _per_block_flops(s, REDESIGN_BLOCK_M, "fwd")
    kv = tiles * union * s.block_size * d * e * 2 / max(1, s.heads // s.kv_heads)
    fwd = Kernel("attention fwd (tile walk)", "fwd", flops=fl, useful_flops=attention_flops(useful, d, "fwd"),
                 hbm_bytes=2 * r * d * e + r * 4 + kv, programs=tiles, mma_eff=REDESIGN_EFF["fwd"])
    dq = Kernel("attention dq (tile walk)", "bwd", flops=fl * 1.5, useful_flops=attention_flops(useful, d, "bwd") * 0.6,
                hbm_bytes=3 * r * d * e + 8 * r + kv, programs=tiles, mma_eff=REDESIGN_EFF["bwd"])
    dkdv = Kernel("attention dk/dv (split heavy blocks)", "bwd", flops=attention_flops(useful, d, "bwd") * 0.8 * 1.15,
                  useful_flops=attention_flops(useful, d, "bwd") * 0.8,
                  hbm_bytes=4 * s.batch * s.seqlen * s.kv_heads * d * e + r * s.n_slots * (2 * d * e + 12),
                  programs=max(1, int(useful / (REDESIGN_BLOCK_M * s.block_size))), mma_eff=REDESIGN_EFF["bwd"])
    return [gate, fwd, dq, dkdv]


# ---------------------------------------------------------------------------- memory
def memory_today(s: Shape, decomposition: str) -> dict:
    """Peak bytes above the inputs (fwd alone; fwd+bwd, the forward's saved tensors included)."""
    d, e, r, w = s.head_dim, s.elem_bytes, s.rows, s.n_slots
    nnz = r * w
    kv = s.batch * s.seqlen * s.kv_heads * d * e
    out_lse = r * d * e + r * 4
    idx = r * w * 4 * 2  # gate output + sorted copy (kept for the backward)
    sort_tmp = r * w * (4 + 8)  # torch.sort values + int64 indices
    selection_tmp = nnz * 8 * 7 + r * w * 8  # nonzero, row/token/head/block/pair, order (int64) + slot_pos
    if decomposition == "gather":
        merge = nnz * (4 * d + 4) + r * w * 8 + r * d * 4 * 3  # partials, weights, merged + 2 temporaries
        fwd = out_lse + idx + max(sort_tmp, selection_tmp, merge + r * w * 8)
        bwd_extra = nnz * 4 * d + r * d * 4 * 3  # dq partials, sum + 2 temporaries
    else:
        fwd = out_lse + idx + sort_tmp + r * w * 8 * 2  # choose_decomposition's unique keys
        bwd_extra = 0
    bwd = out_lse + idx + r * d * e + 2 * kv + r * 4 + max(selection_tmp, bwd_extra)
    return dict(mem_fwd=fwd, mem_fwd_bwd=max(fwd, bwd))


def memory_redesign(s: Shape) -> dict:
    d, e, r, w = s.head_dim, s.elem_bytes, s.rows, s.n_slots
    kv = s.batch * s.seqlen * s.kv_heads * d * e
    sel = r * w * 4 * 2  # selection + per-block row lists, int32, kept for the backward
    fwd = r * d * e + r * 4 + sel
    bwd = fwd + r * d * e + 2 * kv + r * 4 + 2 * kv * 2 * 0.05  # split heavy blocks: fp32 partial dk/dv, ~5% of blocks
    return dict(mem_fwd=fwd, mem_fwd_bwd=max(fwd, bwd))


# ---------------------------------------------------------------------------- designs
DESIGNS = ("today-union", "today-gather", "today-auto", "owner-gather", "owner-auto", "redesign")


def owner_design(s: Shape, dec: str, uncorrelated: bool = False) -> tuple[list[Kernel], dict]:
    """Kernels and memory of ``owner-gather`` / ``owner-auto`` (today's gate and dk/dv)."""
    syncs = OWNER_AUTO_SYNCS // 2 if dec == "auto" else 0  # per direction
    if dec == "auto":
        dec = owner_decomposition(s, uncorrelated)
    rest = today_attention(s, "union", uncorrelated)
    dkdv = [k for k in rest if "dkdv" in k.name]
    attn = [k for k in rest if "dkdv" not in k.name] if dec == "union" else owner_attention(s, uncorrelated)
    kernels = today_gate(s) + [_owner_glue(s, "fwd", syncs)] + attn + dkdv
    if syncs:
        kernels.append(Kernel("decomposition read-back (bwd)", "bwd", launches=0, syncs=syncs))
    return kernels, memory_owner(s, dec)


def design(s: Shape, gpu: GPU, name: str, uncorrelated: bool = False) -> dict:
    """Per-kernel seconds, totals (fwd, fwd+bwd), gate share, effective TFLOP/s and memory of one design."""
    if name == "redesign":
        kernels = redesign_kernels(s)
        mem = memory_redesign(s)
    elif name.startswith("owner-"):
        kernels, mem = owner_design(s, name.split("-", 1)[1], uncorrelated)
    else:
        dec = name.split("-", 1)[1]
        kernels = today_gate(s) + [_glue(s, "fwd", 3)] + today_attention(s, dec, uncorrelated) + [_glue(s, "bwd", 1)]
        dec_used = "gather" if any("gather" in k.name for k in kernels) else "union"
        mem = memory_today(s, dec_used)
    for k in kernels:
        k.seconds = kernel_seconds(k, gpu)
    fwd = sum(k.seconds for k in kernels if k.phase == "fwd")
    bwd = sum(k.seconds for k in kernels if k.phase == "bwd")
    gate = sum(k.seconds for k in kernels if "gate" in k.name or "mean" in k.name)
    useful = attended_pairs(s)
    return dict(
        design=name, kernels=[asdict(k) for k in kernels], fwd_s=fwd, fwd_bwd_s=fwd + bwd, gate_s=gate,
        gate_share_fwd=gate / fwd if fwd else 0.0,
        tflops_eff_fwd=attention_flops(useful, s.head_dim, "fwd") / fwd / 1e12,
        tflops_eff_fwd_bwd=attention_flops(useful, s.head_dim, "fwd+bwd") / (fwd + bwd) / 1e12,
        wasted_mma_fraction=1 - sum(k.useful_flops for k in kernels) / max(1.0, sum(k.flops for k in kernels)),
        **mem,
    )


def compare(s: Shape, gpu: GPU, designs=DESIGNS, uncorrelated: bool = False) -> list[dict]:
    """Every design against FA2- and FA3-class dense flash attention at one shape."""
    dense = {cls: dense_flash(s, gpu, cls) for cls in ("FA2", "FA3")}
    rows = []
    for name in designs:
        m = design(s, gpu, name, uncorrelated)
        m.update(shape=asdict(s), gpu=gpu.name, modelled=True, uncorrelated=uncorrelated)
        for cls, dn in dense.items():
            m[f"speedup_fwd_vs_{cls}"] = dn["fwd_s"] / m["fwd_s"]
            m[f"speedup_fwd_bwd_vs_{cls}"] = dn["fwd_bwd_s"] / m["fwd_bwd_s"]
        m["dense_fwd_bwd_s"] = {cls: dn["fwd_bwd_s"] for cls, dn in dense.items()}
        m["mem_vs_dense_fwd"] = m["mem_fwd"] / dense["FA2"]["mem_fwd"]
        m["mem_vs_dense_fwd_bwd"] = m["mem_fwd_bwd"] / dense["FA2"]["mem_fwd_bwd"]
        rows.append(m)
    return rows


def assumptions() -> dict:
    """Every assumption, for the JSON record."""
    return dict(
        gpus={k: asdict(v) for k, v in GPUS.items()}, mma_fraction=MMA_FRACTION, hbm_fraction=HBM_FRACTION,
        dense_eff={f"{k[0]}-d{k[1]}": v for k, v in DENSE_EFF.items()}, today_eff=TODAY_EFF, redesign_eff=REDESIGN_EFF,
        gate_fma_fraction=GATE_FMA_FRACTION, gate_tc_eff=GATE_TC_EFF, topk_ops_per_score_slot=TOPK_OPS_PER_SCORE_SLOT,
        today_block_m=TODAY_BLOCK_M, redesign_block_m=REDESIGN_BLOCK_M, attn_blocks_per_sm=ATTN_BLOCKS_PER_SM,
        gate_blocks_per_sm=GATE_BLOCKS_PER_SM, union_factor=UNION_FACTOR, sink_fraction=SINK_FRACTION,
        owner_glue_bytes_per_slot=OWNER_GLUE_BYTES_PER_SLOT, owner_auto_syncs=OWNER_AUTO_SYNCS,
        gather_tile_range=GATHER_TILE_RANGE, gather_programs=GATHER_PROGRAMS, union_margin=UNION_MARGIN,
        owner_fwd_blocks_per_sm=OWNER_FWD_BLOCKS_PER_SM,
        glue_bytes_per_slot=GLUE_BYTES_PER_SLOT, glue_syncs=GLUE_SYNCS, sync_us=SYNC_US, launch_us=LAUNCH_US,
    )


# =============================================================================================
# CLI
# =============================================================================================
def _gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--gpu", choices=sorted(GPUS), default="H200", help="the GPU whose peaks the model uses")
    p.add_argument("--seqlens", default="32k,128k,512k", help="comma list, k suffix = 1024")
    p.add_argument("--settings", default="512/3,128/8", help="block/top-k pairs")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dim")
    p.add_argument("--designs", default=",".join(DESIGNS), help="comma list of kernel designs to model")
    p.add_argument("--per-kernel", action="store_true", help="print every kernel's modelled time")
    p.add_argument("--uncorrelated", action="store_true",
                   help="random selections (every row's past picks independent) instead of UNION_FACTOR")
    p.add_argument("--json", dest="json_path", default=None, help="also write the model's numbers to this JSON file")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    gpu = GPUS[args.gpu]
    designs = [d for d in args.designs.split(",") if d]
    bad = [d for d in designs if d not in DESIGNS]
    if bad:
        raise SystemExit(f"--designs: unknown {bad}; expected some of {DESIGNS}")
    rows = []
    print(f"MODELLED (no GPU ran this): {gpu.name}, Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} bf16, causal, "
          f"fwd+bwd unless noted; {'uncorrelated (random) selections' if args.uncorrelated else 'correlated selections'}; "
          f"assumptions at the top of bench/perf_model.py")
    header = (f"{'setting':>9} {'S':>5} {'design':>13} | {'fwd+bwd ms':>10} {'x FA2':>7} {'x FA3':>7} | {'fwd x FA2':>9} "
              f"{'gate/fwd':>8} | {'TFLOP/s eff':>11} {'wasted MMA':>10} | {'peak GiB':>8} {'x dense':>7} {'fwd-only x dense':>16}")
    print(header)
    print("-" * len(header))
    for setting in args.settings.split(","):
        bs, k = (int(x) for x in setting.split("/"))
        for seqlen in parse_sizes(args.seqlens):
            s = Shape(seqlen, args.heads, args.kv_heads, args.head_dim, bs, k)
            for m in compare(s, gpu, designs, args.uncorrelated):
                rows.append(m)
                print(f"{bs:>5}/k{k:<2} {seqlen // 1024:>4}K {m['design']:>13} | {m['fwd_bwd_s'] * 1e3:>10.2f} "
                      f"{m['speedup_fwd_bwd_vs_FA2']:>6.1f}x {m['speedup_fwd_bwd_vs_FA3']:>6.1f}x | "
                      f"{m['speedup_fwd_vs_FA2']:>8.1f}x {m['gate_share_fwd']:>8.0%} | {m['tflops_eff_fwd_bwd']:>11.0f} "
                      f"{m['wasted_mma_fraction']:>10.0%} | {_gib(m['mem_fwd_bwd']):>8} {m['mem_vs_dense_fwd_bwd']:>6.2f}x {m['mem_vs_dense_fwd']:>15.2f}x")
                if args.per_kernel:
                    for kk in m["kernels"]:
                        grid = ""
                        if kk["programs"]:
                            tail = tail_efficiency(kk["programs"], gpu.sms, kk["blocks_per_sm"])
                            grid = f"{kk['programs']:>10} programs ({tail:.0%} of the last wave's SM slots busy)"
                        print(f"{'':>30} {kk['phase']:>3} {kk['name']:<36} {kk['seconds'] * 1e3:9.3f} ms {grid} {kk['notes']}")
            dn = dense_flash(s, gpu, "FA2")
            print(f"{'':>17} dense flash fwd+bwd: FA2-class {dn['fwd_bwd_s'] * 1e3:.1f} ms, FA3-class "
                  f"{dense_flash(s, gpu, 'FA3')['fwd_bwd_s'] * 1e3:.1f} ms, peak {_gib(dn['mem_fwd_bwd'])} GiB (modelled)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(dict(modelled=True, assumptions=assumptions(), rows=rows), indent=1))
        print(f"wrote {args.json_path}")
    return rows


if __name__ == "__main__":
    main()
