"""Analytic time and memory model of MoBA's Triton kernels against dense flash attention. MODELLED, not measured.

    python -m bench.perf_model                         # H200, Hq=32/Hkv=8, D=128, bf16: both settings, 32K/128K/512K
    python -m bench.perf_model --gpu H100 --per_kernel --seqlens 128k
    python -m bench.perf_model --json model.json

Every number printed here comes from the formulas and assumptions below: no GPU ran them. When
a GPU measures the kernels (bench/device_check.py), calibrate the efficiencies against it.

Designs modelled
----------------
* ``main-union`` / ``main-gather`` / ``main-auto``: the kernels on main (triton_kernels/*.py,
  issue 14's kernel work merged; tile shapes and occupancy from the static report
  bench/results/kernel-report-final2-2026-12-03.json, which every kernel on main is in):
  - gate: block means, then ONE pass per (64-row query tile, query head) over the tile's past
    blocks only (``BLOCK_B`` at a time, padded), running top-k in registers. For bf16/fp16
    inputs the first pass is ONE tensor-core product in the input dtype (centred means) at the
    bf16 peak, then an exact float32 re-check of the ``SORT_WIDTH - 1`` kept pairs per row on
    the FMA units; a tile whose cut is a near tie (a fraction ``GATE_FALLBACK_TILES`` of the
    programs, a guess) runs the pass again as TWO TF32 products (q . m_hi + q . m_lo) at the
    TF32 tensor-core peak, half the bf16 peak (H100/H200 datasheets: 495 vs 989 TFLOP/s dense,
    ``TF32_PEAK_RATIO``).
  - the selection: ``sort_block_indices`` + ``build_selection`` on device, once (saved for
    the backward); no host sync, "auto" included: ``choose_decomposition`` writes its choice to a
    device flag, and "auto" launches BOTH decompositions' forward and dq grids; every program
    of the grid not chosen reads the flag and exits (modelled: one more launch per direction
    plus ``EMPTY_WAVE_US`` per wave of empty programs), and the gather side's float32 row
    state / dq sum are allocated whichever side runs (sizes must be host-known).
  - union: one program per (``UNION_BLOCK_M``-row tile, query head) walking the union of its
    rows' blocks (128 rows / 8 warps at D=128, 64 rows / 4 warps at D=64); gather: the
    owner-computes path (one program per (super-tile, KV head), 64-row chunks per segment,
    one float32 row state per row in HBM, no per-slot partials); "auto" = the launcher's rule
    (union unless its MMA rows exceed ``UNION_MARGIN`` x the gather rows).
  - backward: delta = rowsum(dO * O) in one kernel (``_bwd_delta_kernel``: dO and O read once
    in their dtype, delta written in float32, no float32 temporaries), dq (union or gather),
    dk/dv per 128-key tile with heavy row lists split (``dkdv_work``: static bounds, float32
    partials allocated at their bound, summed in order by ``_dkdv_reduce_kernel``).
* ``target``: what remains of issue 14's plan, in this stated way only (everything else as
  ``main-auto``): attention tiles at FA2-class efficiency (``TARGET_EFF``: pipelined K/V, wider
  key steps), which the spill-free tiles on main do not yet support. (The fused delta, once a
  target item, is on main; ``Variant.fused_delta = False`` still models the eager delta it
  replaced, for comparisons.)

``--uncorrelated`` models random selections (every row's past picks independent: the union
path's worst case).

Per kernel: FLOPs (2 per multiply-add; the MMA work actually issued, so wasted rows count),
HBM bytes, programs vs SMs (waves and the tail of the last wave), and time =
max(MMA time / tail efficiency, FMA time, HBM time, longest program) + launches + syncs
+ waves of empty programs;
peak memory = what the launchers allocate above the inputs (counted from the code), at its peak.
Not modelled: L2 bandwidth (the gate's block means, 4 MiB at 512K, are re-read from L2 by
every tile), clock throttling, overlap between kernels.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/perf_model.py, from anywhere): import it as bench.perf_model
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from moba._core import cli
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
#: Our attention kernels on main at D=128, fraction of the bf16 peak inside their inner loop. A GUESS.
#: The previous tiles (64 rows / 8 warps, 255 registers, spills in dq and dk/dv, both
#: warpgroups computing one score tile) were guessed at 0.25 fwd / 0.18 bwd. The static report
#: supports raising them, but not to FA2-class (0.35 / 0.28): every tile is now spill-free
#: with a 64-row wgmma M side per warpgroup and the D=128 forward loads K/V by TMA (the gain,
#: fwd to 0.30, dq to 0.22); but the D=128 forward and dq step 32 keys at a time with
#: num_stages = 1 (no software pipelining; wider or deeper spills) at 1 CTA per SM, dk/dv steps
#: only 16 query rows (its wgmma N side), the gather forward has no TMA and gathers q rows
#: (0.25), and the gather dq runs 8 warps on 64 rows (0.18, the old duplicated-tile case).
MAIN_EFF = {"fwd": 0.30, "dq": 0.22, "dkdv": 0.18, "fwd_gather": 0.25, "dq_gather": 0.18}
#: The remaining target: FA2-class tiles (pipelined K/V, 64-key steps). A target, not a guess of main.
TARGET_EFF = {"fwd": 0.35, "dq": 0.28, "dkdv": 0.28, "fwd_gather": 0.35, "dq_gather": 0.28}
#: Our kernels at D=64 relative to D=128 (the dense ratio above). A guess.
D64_FACTOR = 0.8
#: TF32 tensor-core peak / bf16 peak (H100/H200 SXM datasheets: 494.7 / 989.4 dense).
TF32_PEAK_RATIO = 0.5
#: The gate's tensor-core scores, fraction of the (TF32 or bf16) peak: small tiles (64 query
#: rows x BLOCK_B = 16 blocks at D=128, so wgmma N = 16), 3 CTAs per SM. A guess.
GATE_TC_EFF = 0.30
#: Near-tie fallback: the fraction of gate programs (query tile x head) whose cut is a near tie
#: and that re-score every candidate in float32 (two TF32 products). A guess: on random data
#: the interpreter tests see none at 64-row tiles; trained models' near ties are unmeasured
#: until a GPU runs ``bench/device_check.py`` (it reports the count).
GATE_FALLBACK_TILES = 0.05
#: Score work per chunk in bf16-peak-equivalent products: one half-precision product, plus the
#: fallback's two TF32 products (each at half the bf16 peak) in that fraction of the tiles.
GATE_PRODUCTS = 1 + GATE_FALLBACK_TILES * 2 / TF32_PEAK_RATIO
#: Kept pairs re-checked in float32 per row (gate.py ``gate_sort_width``: next_power_of_2(
#: top_k + 4) - 1), plus q . m0 (the centre), FMA dot products of length D.
GATE_MIN_EXTRA_KEPT = 4
#: Running top-k: ALU operations per score (chunk max with the (score, block) tie-break, the
#: candidate mask, the compare with the worst kept pair; one round per chunk once the
#: selection is good, more while the wider kept set fills), at fp32-pipe rate x
#: GATE_FMA_FRACTION (one op per lane = 2 FLOPs). A guess.
TOPK_OPS_PER_SCORE = 10
GATE_FMA_FRACTION = 0.35
#: Gate tiles (triton_kernels/gate.py GATE_CONFIGS): padded head dim -> (BLOCK_M, BLOCK_B).
GATE_TILES = {16: (64, 32), 32: (64, 32), 64: (64, 32), 128: (64, 16), 256: (32, 16)}
#: Union tile rows (FWD_CONFIGS / DQ_CONFIGS BLOCK_M) and gather chunk rows (FWD_GATHER_CONFIGS).
UNION_BLOCK_M = {64: 64, 128: 128}
GATHER_BLOCK_M = 64
#: Resident programs per SM, sm_90, from the static reports (theoretical occupancy: registers
#: limit every one but the delta, 32 registers at D=128 and D=64: the 16-block limit): D=128 / D=64.
BLOCKS_PER_SM = {
    128: {"gate": 3, "mean": 6, "fwd": 1, "dq": 1, "dkdv": 1, "fwd_gather": 2, "dq_gather": 1, "reduce": 4,
          "delta": 16},
    64: {"gate": 3, "mean": 9, "fwd": 3, "dq": 3, "dkdv": 1, "fwd_gather": 2, "dq_gather": 2, "reduce": 7,
         "delta": 16},
}
#: dk/dv (DKDV_CONFIGS): keys per program, query rows per step (D=128: 16, D=64: 32), and
#: dkdv_work's smallest split of a heavy row list.
DKDV_KEY_TILE = 128
DKDV_ROWS_PER_STEP = {64: 32, 128: 16}
DKDV_MIN_SPLIT_ROWS = 4096
#: dkdv_work's automatic split: this many times the mean rows per pair (``DKDV_SPLIT_FACTOR``).
DKDV_SPLIT_FACTOR = 4
#: The eager delta that ``_bwd_delta_kernel`` replaced (``fused_delta=False`` only) cast this
#: many elements of dO and O to float32 at once (its ``DELTA_CHUNK_ELEMENTS``).
DELTA_CHUNK_ELEMENTS = 1 << 24
#: ``_bwd_delta_kernel`` rows per program (DELTA_CONFIGS: 2048 elements of dO / O per program).
DELTA_ROWS = {64: 32, 128: 16}
#: Distinct past blocks a query tile's rows select together, as a multiple of one row's
#: (top_k - 1) (union path), for 64- and 128-row tiles alike. 1 = neighbouring queries pick
#: the same blocks. Trained models' neighbouring queries mostly agree: 2 is a guess to calibrate.
UNION_FACTOR = 2.0
#: Fraction of all query rows that pick the most popular past block (an attention "sink"; in
#: trained LLMs block 0 is chosen by nearly every query). Sets dk/dv's longest program.
SINK_FRACTION = 1.0
#: Selection glue on device, HBM bytes per (token, head, slot), guesses from the torch ops:
#: sort_block_indices (where + sort of int32 with int64 indices: ~32 B); build_selection
#: without segments (union: one stable sort of int64 pair keys with int64 order, gathers,
#: searchsorted: ~96 B) or with them (gather / auto: a second sort over (program, entry) keys,
#: cummin, more gathers: ~192 B); choose_decomposition (auto: int64 keys built and sorted: ~48 B).
SORT_BYTES_PER_SLOT = 32
SELECTION_BYTES_PER_SLOT = {"union": 96, "gather": 192}
CHOOSE_BYTES_PER_SLOT = 48
#: Host syncs of "auto" on main: none since the choice stays on device (it was 2: choose_decomposition's
#: comparison and the backward's read-back); the cost moved to the unchosen grid's empty programs.
AUTO_SYNCS = 0
#: Gather super-tile and program target (triton_kernels/attention.py: GATHER_TILE_RANGE,
#: GATHER_PROGRAMS) and its UNION_MARGIN.
GATHER_TILE_RANGE = (64, 16384)
GATHER_PROGRAMS = 1024
UNION_MARGIN = 1.25
SYNC_US = 20.0  # each host sync drains the GPU
LAUNCH_US = 4.0  # per kernel launch (and per PyTorch op in the glue)
#: A wave of programs that read one flag and exit (the unchosen side of "auto"): a guess, one
#: dependent global load plus the block launch; not measured.
EMPTY_WAVE_US = 1.0


@dataclass(frozen=True)
class Variant:
    """What differs between main and the remaining target (see the module docstring): today the
    tiles' efficiency only; ``fused_delta=False`` models the eager delta main had before."""

    name: str
    eff: dict
    auto_syncs: int
    fused_delta: bool


MAIN = Variant("main", MAIN_EFF, AUTO_SYNCS, True)
TARGET = Variant("target", TARGET_EFF, 0, True)


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

    @property
    def dim_key(self) -> int:
        """128 or 64: which row of the per-head-dim tables applies."""
        return 128 if self.head_dim > 64 else 64


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
    blocks_per_sm: int = 1
    mma_eff: float = 1.0  # fraction of the bf16 peak
    serial_flops: float = 0.0  # MMA FLOPs of the longest single program (it runs on one SM)
    launches: int = 1
    syncs: int = 0
    empty_programs: int = 0  # programs that only read the "auto" flag and exit (waves x EMPTY_WAVE_US)
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
    """max(MMA time / tail efficiency, FMA time, HBM time, longest program) + launches + syncs
    + waves of empty programs."""
    serial = k.serial_flops / (gpu.bf16_tflops * 1e12 / gpu.sms * k.mma_eff) if k.serial_flops else 0.0
    tail = tail_efficiency(k.programs, gpu.sms, k.blocks_per_sm) if k.programs else 1.0
    mma = k.flops / (gpu.bf16_tflops * 1e12 * k.mma_eff) / tail if k.flops else 0.0
    fma = k.fma_flops / (gpu.fp32_tflops * 1e12 * GATE_FMA_FRACTION) / tail if k.fma_flops else 0.0
    hbm = k.hbm_bytes / (gpu.hbm_tbps * 1e12 * HBM_FRACTION)
    empty = math.ceil(k.empty_programs / (gpu.sms * k.blocks_per_sm)) * EMPTY_WAVE_US * 1e-6
    return max(mma, fma, hbm, serial) + k.launches * LAUNCH_US * 1e-6 + k.syncs * SYNC_US * 1e-6 + empty


def attended_pairs(s: Shape) -> float:
    """Attended (query, key) pairs over batch and query heads (``_attn_model.moba_pairs``, causal)."""
    return float(moba_pairs(s.seqlen, s.block_size, s.top_k, True) * s.heads * s.batch)


def _eff(v: Variant, s: Shape, kernel: str) -> float:
    return v.eff[kernel] * (1.0 if s.dim_key == 128 else D64_FACTOR)


def _bps(s: Shape, kernel: str) -> int:
    return BLOCKS_PER_SM[s.dim_key][kernel]


# ---------------------------------------------------------------------------- dense flash
def dense_flash(s: Shape, gpu: GPU, cls: str) -> dict:
    """Dense causal flash attention (FA2- or FA3-class): seconds and peak bytes above the inputs."""
    pairs = dense_pairs(s.seqlen, True) * s.heads * s.batch
    eff = DENSE_EFF[(cls, s.dim_key)]
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


# ---------------------------------------------------------------------------- gate
def gate_chunks(s: Shape) -> tuple[int, int]:
    """(gate programs, padded candidate blocks summed over them): one program per (BLOCK_M-row
    query tile, query head); a tile's candidates are the blocks before the own block of its
    last row (causal), walked BLOCK_B at a time (the last chunk padded)."""
    bm, bb = GATE_TILES[max(16, 1 << (s.head_dim - 1).bit_length())]
    n_tiles = -(-s.seqlen // bm)
    padded = 0
    for i in range(n_tiles):
        c = (min(s.seqlen, (i + 1) * bm) - 1) // s.block_size
        padded += -(-c // bb) * bb
    return n_tiles * s.heads * s.batch, padded * s.heads * s.batch


def gate_kept(top_k: int) -> int:
    """Pairs the first pass keeps per row and re-checks in float32 (gate.py ``gate_sort_width``)."""
    n_pick = top_k - 1
    return min(32, 1 << (n_pick + GATE_MIN_EXTRA_KEPT).bit_length()) - 1


def gate_kernels(s: Shape, v: Variant = MAIN) -> list[Kernel]:
    """Block means + the top-k kernel (the same on main and the target). MMA: 2 x BLOCK_M x
    BLOCK_B x D per product and chunk, ``GATE_PRODUCTS`` bf16-equivalent products (the flops
    below are bf16-peak-equivalent). FMA: the running top-k per score, and per program the
    float32 re-check, 2 x BLOCK_M x (kept + 1) x D."""
    d, e = s.head_dim, s.elem_bytes
    bm = GATE_TILES[max(16, 1 << (d - 1).bit_length())][0]
    means = Kernel("_block_mean_kernel", "fwd", hbm_bytes=s.batch * s.seqlen * s.kv_heads * d * e
                   + s.batch * s.n_blocks * s.kv_heads * d * 4, programs=s.batch * s.n_blocks * s.kv_heads,
                   blocks_per_sm=_bps(s, "mean"))
    programs, padded = gate_chunks(s)
    scores = 2.0 * bm * padded * d  # one product
    n_pick = min(s.top_k - 1, s.n_blocks)
    recheck = 2.0 * bm * (gate_kept(s.top_k) + 1) * d * programs
    gate = Kernel("_gate_topk_kernel", "fwd", flops=scores * GATE_PRODUCTS,
                  fma_flops=(2.0 * bm * padded * TOPK_OPS_PER_SCORE + recheck) if n_pick else 0.0,
                  hbm_bytes=s.rows * d * e + s.rows * s.n_slots * 4, programs=programs,
                  blocks_per_sm=_gate_bps(s), mma_eff=GATE_TC_EFF,
                  notes=f"one half product + float32 re-check of {gate_kept(s.top_k)} kept pairs; "
                        f"{GATE_FALLBACK_TILES:.0%} of tiles re-scored in float32")
    return [means, gate]


def _gate_bps(s: Shape) -> int:
    """Resident gate programs per SM: the static report's for an 8-wide selection (top_k 2-4),
    2 with a 16-wide one (top_k 5-12: 171-227 registers on sm_90 at D=64 and 128)."""
    bps = _bps(s, "gate")
    return min(bps, 2) if gate_kept(s.top_k) + 1 >= 16 else bps


# ---------------------------------------------------------------------------- selection glue
def selection_glue(s: Shape, dec: str, v: Variant = MAIN) -> list[Kernel]:
    """sort_block_indices + build_selection (+ choose_decomposition for "auto"), once, in the
    forward; ``v.auto_syncs`` host syncs for "auto" (0 on main and in the target: the choice
    stays on device), split between the forward's compare and the backward's read-back."""
    nnz = s.rows * s.n_slots
    per_slot = SORT_BYTES_PER_SLOT + SELECTION_BYTES_PER_SLOT["union" if dec == "union" else "gather"]
    syncs = 0
    if dec == "auto":
        per_slot += CHOOSE_BYTES_PER_SLOT
        syncs = v.auto_syncs
    out = [Kernel(f"selection build ({dec})", "fwd", hbm_bytes=per_slot * nnz, launches=30,
                  syncs=math.ceil(syncs / 2), notes="once, on device; saved for the backward")]
    if syncs > 1:
        out.append(Kernel("decomposition read-back", "bwd", launches=0, syncs=syncs - math.ceil(syncs / 2)))
    return out


# ---------------------------------------------------------------------------- attention
def _union_products(s: Shape, factor: float | None = None, block_m: int | None = None) -> float:
    """(query tile, key block) products of the union path, per batch x query head, in units of
    full blocks: the union of past picks (``UNION_FACTOR`` x (top_k - 1), at most the past
    blocks) plus the own block up to the tile's last row."""
    total = 0.0
    bm = UNION_BLOCK_M[s.dim_key] if block_m is None else block_m
    bs = s.block_size
    factor = UNION_FACTOR if factor is None else factor
    for i in range(-(-s.seqlen // bm)):
        c = (i * bm) // bs
        total += min(c, (s.top_k - 1) * factor) + min(bs, (i * bm) % bs + bm) / bs
    return total


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


def gather_segments(s: Shape, uncorrelated: bool = False) -> tuple[float, float, int]:
    """(MMA rows, chunks, programs) of the gather path: per program (super-tile of ``tile``
    tokens x ``group`` heads = R rows), the past picks R x n_pick land on u distinct blocks
    (uncorrelated: balls in bins over the c complete past blocks; correlated: the union rule,
    n_pick x UNION_FACTOR per 64 rows), each a segment of R x n_pick / u rows rounded up to
    GATHER_BLOCK_M; plus the own-block segments (R rows, rounded up per block the tile touches)."""
    tile, bm = gather_tile(s), GATHER_BLOCK_M
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


def decomposition(s: Shape, uncorrelated: bool = False) -> str:
    """"auto"'s rule (attention.choose_decomposition): union unless its MMA rows (union blocks x
    the union BLOCK_M) exceed UNION_MARGIN x the gather segments' rows."""
    factor = GATHER_BLOCK_M if uncorrelated else UNION_FACTOR
    union_rows = _union_products(s, factor) * s.heads * s.batch * UNION_BLOCK_M[s.dim_key]
    return "union" if union_rows <= UNION_MARGIN * gather_segments(s, uncorrelated)[0] else "gather"


def union_attention(s: Shape, v: Variant = MAIN, uncorrelated: bool = False) -> list[Kernel]:
    """Union forward and dq. Matmuls: forward 2 (QK^T, PV), dq 3 (QK^T, dO V^T, dS K), each
    2 * rows * keys * D FLOPs; the whole tile computes every block of its union."""
    d, e, r = s.head_dim, s.elem_bytes, s.rows
    bm = UNION_BLOCK_M[s.dim_key]
    useful_fwd = attention_flops(attended_pairs(s), d, "fwd")
    group = s.heads // s.kv_heads
    tiles = s.batch * -(-s.seqlen // bm) * s.heads
    # uncorrelated: a tile's rows x 2 random picks cover about every past block (factor = rows)
    products = _union_products(s, bm if uncorrelated else None) * s.heads * s.batch
    fl = products * attention_flops(bm * s.block_size, d, "fwd")
    kv_reads = products * s.block_size * d * e * 2 / group  # the heads of a GQA group share K/V via L2
    return [
        Kernel("_fwd_kernel (union)", "fwd", flops=fl, useful_flops=useful_fwd, hbm_bytes=2 * r * d * e + r * 4 + kv_reads,
               programs=tiles, blocks_per_sm=_bps(s, "fwd"), mma_eff=_eff(v, s, "fwd")),
        Kernel("_bwd_dq_kernel (union)", "bwd", flops=1.5 * fl, useful_flops=1.5 * useful_fwd,
               hbm_bytes=3 * r * d * e + 8 * r + kv_reads, programs=tiles, blocks_per_sm=_bps(s, "dq"),
               mma_eff=_eff(v, s, "dq")),
    ]


def gather_attention(s: Shape, v: Variant = MAIN, uncorrelated: bool = False) -> list[Kernel]:
    """Gather forward and dq (MMA on whole key blocks per 64-row chunk; the own block's causal
    half counted whole, as the union path's)."""
    d, e, r = s.head_dim, s.elem_bytes, s.rows
    useful_fwd = attention_flops(attended_pairs(s), d, "fwd")
    nnz = r * s.n_slots
    mma_rows, chunks, programs = gather_segments(s, uncorrelated)
    fl = attention_flops(mma_rows * s.block_size, d, "fwd")
    kv_reads = chunks * s.block_size * d * e * 2  # the heads of a group share a chunk: K/V once per chunk
    # per (row, slot): gathered q, and the row state read + written (acc 4D, max 4, sum 4);
    # per row: state initialised (written), read at the end, out + lse written.
    state = nnz * (d * e + 2 * (4 * d + 8)) + r * (4 * d + 8) * 2 + r * (d * e + 4)
    fwd = Kernel("_fwd_gather_kernel", "fwd", flops=fl, useful_flops=useful_fwd, hbm_bytes=state + kv_reads,
                 programs=programs, blocks_per_sm=_bps(s, "fwd_gather"), mma_eff=_eff(v, s, "fwd_gather"),
                 notes="one fp32 state per row")
    dq_state = nnz * (2 * d * e + 8 + 8 * d) + r * 4 * d * 2 + r * d * e
    dq = Kernel("_bwd_dq_gather_kernel", "bwd", flops=1.5 * fl, useful_flops=1.5 * useful_fwd,
                hbm_bytes=dq_state + kv_reads, programs=programs, blocks_per_sm=_bps(s, "dq_gather"),
                mma_eff=_eff(v, s, "dq_gather"), notes="one fp32 dq sum per row")
    return [fwd, dq]


def unchosen_attention(s: Shape, dec: str) -> list[Kernel]:
    """"auto"'s other side (``dec`` is the side that runs): its forward and dq grids launched
    with the device flag; every program reads it and exits (no FLOPs, 4 bytes each)."""
    if dec == "union":  # the gather grids: one program per (super-tile, KV head)
        programs = gather_segments(s)[2]
        kinds, names = ("fwd_gather", "dq_gather"), ("_fwd_gather_kernel", "_bwd_dq_gather_kernel")
    else:  # the union grids: one program per (query tile, query head)
        programs = s.batch * -(-s.seqlen // UNION_BLOCK_M[s.dim_key]) * s.heads
        kinds, names = ("fwd", "dq"), ("_fwd_kernel", "_bwd_dq_kernel")
    return [Kernel(f"{name} (not chosen: flag read, exit)", phase, hbm_bytes=4 * programs, programs=programs,
                   blocks_per_sm=_bps(s, kind), empty_programs=programs, notes="\"auto\": no host sync")
            for name, kind, phase in zip(names, kinds, ("fwd", "bwd"), strict=True)]


def delta_kernel(s: Shape, v: Variant = MAIN) -> Kernel:
    """delta = rowsum(dO * O). Main and target: ``_bwd_delta_kernel`` (dO and O read once,
    2 x D x e bytes, 4 bytes of delta written per row, ``DELTA_ROWS`` rows per program).
    ``fused_delta=False``: the eager PyTorch it replaced (dO.float(), O.float(), their product,
    its sum: 2 x D x e read, 3 x 4D written, 4 x 4D read per row; 4 ops per chunk)."""
    r, d, e = s.rows, s.head_dim, s.elem_bytes
    if v.fused_delta:
        return Kernel("_bwd_delta_kernel", "bwd", hbm_bytes=r * (2 * d * e + 4),
                      programs=-(-r // DELTA_ROWS[s.dim_key]), blocks_per_sm=_bps(s, "delta"))
    chunks = max(1, -(-r * d // DELTA_CHUNK_ELEMENTS))
    return Kernel("delta (PyTorch, fp32 temporaries)", "bwd", hbm_bytes=r * (2 * d * e + 28 * d + 4), launches=4 * chunks)


def dkdv_split(s: Shape) -> tuple[int, float, int]:
    """(split rows, sink rows, sink chunks) as ``dkdv_work`` chooses them: a (block, KV head)
    pair's list is split when longer than max(DKDV_MIN_SPLIT_ROWS, DKDV_SPLIT_FACTOR x the mean rows per pair
    rounded up to the rows per step); heavy pairs modelled: the sink only (SINK_FRACTION of the
    rows of every KV head pick one block); sink chunks 0 = not split."""
    group = s.heads // s.kv_heads
    step = DKDV_ROWS_PER_STEP[s.dim_key]
    mean = -(-s.seqlen * s.batch * s.heads * s.n_slots // (s.n_blocks * s.kv_heads * s.batch))
    split = max(DKDV_MIN_SPLIT_ROWS, -(-DKDV_SPLIT_FACTOR * mean // step) * step)
    rows_per_pair = s.seqlen * group * s.n_slots / s.n_blocks
    sink_rows = max(SINK_FRACTION * s.seqlen * group, rows_per_pair)
    return split, sink_rows, (math.ceil(sink_rows / split) if sink_rows > split else 0)


def dkdv_parts_bound(s: Shape) -> int:
    """Float32 partial buffers ``dkdv_work`` allocates (its static bound, used or not)."""
    split = dkdv_split(s)[0]
    max_rows = s.rows * s.n_slots
    n_pairs = s.batch * s.n_blocks * s.kv_heads
    return min(n_pairs + max_rows // split, 2 * (max_rows // split))


def dkdv_kernels(s: Shape, v: Variant = MAIN) -> list[Kernel]:
    """dk/dv: one program per (DKDV_KEY_TILE-key tile, work item); the longest program walks
    min(sink rows, split) rows; heavy chunks write float32 partial dk/dv read once by
    ``_dkdv_reduce_kernel``. The own block's causal half is masked, not skipped (``waste``)."""
    d, e = s.head_dim, s.elem_bytes
    useful_fwd = attention_flops(attended_pairs(s), d, "fwd")
    tiles_per_block = -(-s.block_size // DKDV_KEY_TILE)
    split, sink_rows, sink_chunks = dkdv_split(s)
    n_parts = sink_chunks * s.kv_heads * s.batch
    items = s.n_blocks * s.kv_heads * s.batch + max(0, n_parts - s.kv_heads * s.batch)
    longest = min(sink_rows, split)
    waste = s.n_slots / max(0.5, s.n_slots - 0.5)
    row_reads = s.rows * s.n_slots * tiles_per_block * (2 * d * e + 12)  # q, dO, lse, delta, row id per key tile
    part_bytes = n_parts * s.block_size * d * 4 * 2  # float32 dk and dv partials
    out = [Kernel("_bwd_dkdv_kernel", "bwd", flops=2 * useful_fwd * waste, useful_flops=2 * useful_fwd,
                  hbm_bytes=4 * s.batch * s.seqlen * s.kv_heads * d * e + row_reads + part_bytes,
                  programs=items * tiles_per_block, blocks_per_sm=_bps(s, "dkdv"), mma_eff=_eff(v, s, "dkdv"),
                  serial_flops=attention_flops(longest * DKDV_KEY_TILE, d, "fwd") * 2,
                  notes=f"longest program: {longest:.0f} rows (sink {sink_rows:.0f} rows in {max(1, sink_chunks)} "
                        f"chunk(s) of <= {split} rows)")]
    if n_parts:
        out.append(Kernel("_dkdv_reduce_kernel", "bwd",
                          hbm_bytes=part_bytes + 2 * s.kv_heads * s.batch * s.block_size * d * e,
                          programs=s.kv_heads * s.batch * tiles_per_block, blocks_per_sm=_bps(s, "reduce"),
                          notes=f"{n_parts} float32 partials summed in chunk order"))
    return out


# ---------------------------------------------------------------------------- memory
def memory(s: Shape, dec: str, v: Variant = MAIN, auto: bool = False) -> dict:
    """Peak bytes above the inputs (fwd alone; fwd+bwd, the forward's saved tensors included).
    ``dec``: the decomposition that runs; ``auto``: the selection has segments either way."""
    d, e, r, w = s.head_dim, s.elem_bytes, s.rows, s.n_slots
    nnz = r * w
    kv = s.batch * s.seqlen * s.kv_heads * d * e
    out_lse = r * d * e + r * 4
    idx = r * w * 4 * 2  # gate output + sorted copy (kept for the backward)
    segs = dec == "gather" or auto
    n_seg = min(nnz, gather_segments(s)[2] * s.n_blocks) if segs else 0
    sel = nnz * 4 + (s.batch * s.n_blocks * s.kv_heads + 1) * 4 + 3 * n_seg * 4  # int32, kept for the backward
    build_tmp = nnz * 8 * (5 if segs else 3)  # int64 pair / sorted pair / order / row (/ segment keys) at the peak
    choose_tmp = nnz * 8 * 2 if auto else 0  # choose_decomposition's int64 keys and their sorted copy
    # fp32 output sum + softmax sum; "auto" allocates them whichever side runs (host-known sizes)
    state = r * (4 * d + 4) if dec == "gather" or auto else 0
    fwd = out_lse + idx + sel + max(build_tmp, choose_tmp, state)
    base = out_lse + idx + sel + r * d * e + 2 * kv + r * 4  # + dq, dk, dv, delta
    # fused: none; eager (fused_delta=False): dO.float(), O.float() and their product, DELTA_CHUNK_ELEMENTS at a time
    delta_tmp = 0 if v.fused_delta else 3 * min(r * d, DELTA_CHUNK_ELEMENTS) * 4
    dq_acc = r * d * 4 if dec == "gather" or auto else 0  # alive until the backward returns (auto: always)
    parts = dkdv_parts_bound(s) * s.block_size * d * 4 * 2  # allocated at the bound, used or not
    bwd = base + max(delta_tmp, dq_acc + parts)
    return dict(mem_fwd=fwd, mem_fwd_bwd=max(fwd, bwd))


# ---------------------------------------------------------------------------- designs
DESIGNS = ("main-union", "main-gather", "main-auto", "target")


def design_kernels(s: Shape, name: str, uncorrelated: bool = False) -> tuple[list[Kernel], dict, str]:
    """Kernels, memory and the decomposition that runs, of one design."""
    if name not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {name!r}")
    v = TARGET if name == "target" else MAIN
    requested = "auto" if name == "target" else name.split("-", 1)[1]
    dec = decomposition(s, uncorrelated) if requested == "auto" else requested
    attn = union_attention(s, v, uncorrelated) if dec == "union" else gather_attention(s, v, uncorrelated)
    if requested == "auto":  # both sides launched, the other one exits at once
        attn = attn + unchosen_attention(s, dec)
    kernels = gate_kernels(s, v) + selection_glue(s, requested, v) + attn + [delta_kernel(s, v)] + dkdv_kernels(s, v)
    return kernels, memory(s, dec, v, auto=requested == "auto"), dec


def design(s: Shape, gpu: GPU, name: str, uncorrelated: bool = False) -> dict:
    """Per-kernel seconds, totals (fwd, fwd+bwd), gate share, effective TFLOP/s and memory of one design."""
    kernels, mem, dec = design_kernels(s, name, uncorrelated)
    for k in kernels:
        k.seconds = kernel_seconds(k, gpu)
    fwd = sum(k.seconds for k in kernels if k.phase == "fwd")
    bwd = sum(k.seconds for k in kernels if k.phase == "bwd")
    gate = sum(k.seconds for k in kernels if "gate" in k.name or "mean" in k.name)
    useful = attended_pairs(s)
    return dict(
        design=name, decomposition=dec, kernels=[asdict(k) for k in kernels], fwd_s=fwd, fwd_bwd_s=fwd + bwd,
        gate_s=gate, gate_share_fwd=gate / fwd if fwd else 0.0,
        tflops_eff_fwd=attention_flops(useful, s.head_dim, "fwd") / fwd / 1e12,
        tflops_eff_fwd_bwd=attention_flops(useful, s.head_dim, "fwd+bwd") / (fwd + bwd) / 1e12,
        # attention kernels only (the gate's scores are not attention pairs)
        wasted_mma_fraction=1 - sum(k.useful_flops for k in kernels) / max(1.0, sum(k.flops for k in kernels if k.useful_flops)),
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
        dense_eff={f"{k[0]}-d{k[1]}": v for k, v in DENSE_EFF.items()}, main_eff=MAIN_EFF, target_eff=TARGET_EFF,
        d64_factor=D64_FACTOR, tf32_peak_ratio=TF32_PEAK_RATIO, gate_tc_eff=GATE_TC_EFF,
        gate_products=GATE_PRODUCTS, gate_fallback_tiles=GATE_FALLBACK_TILES, gate_min_extra_kept=GATE_MIN_EXTRA_KEPT,
        topk_ops_per_score=TOPK_OPS_PER_SCORE, gate_fma_fraction=GATE_FMA_FRACTION,
        gate_tiles={str(k): v for k, v in GATE_TILES.items()}, union_block_m={str(k): v for k, v in UNION_BLOCK_M.items()},
        gather_block_m=GATHER_BLOCK_M, blocks_per_sm={str(k): v for k, v in BLOCKS_PER_SM.items()},
        dkdv_key_tile=DKDV_KEY_TILE, dkdv_rows_per_step={str(k): v for k, v in DKDV_ROWS_PER_STEP.items()},
        dkdv_min_split_rows=DKDV_MIN_SPLIT_ROWS, union_factor=UNION_FACTOR, sink_fraction=SINK_FRACTION,
        sort_bytes_per_slot=SORT_BYTES_PER_SLOT, selection_bytes_per_slot=SELECTION_BYTES_PER_SLOT,
        choose_bytes_per_slot=CHOOSE_BYTES_PER_SLOT, auto_syncs=AUTO_SYNCS, gather_tile_range=GATHER_TILE_RANGE,
        gather_programs=GATHER_PROGRAMS, union_margin=UNION_MARGIN, sync_us=SYNC_US, launch_us=LAUNCH_US,
        empty_wave_us=EMPTY_WAVE_US,
    )


# =============================================================================================
# CLI
# =============================================================================================
def _gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def build_parser():
    p = make_parser(__doc__, "bench.perf_model")
    p.add_argument("--gpu", choices=sorted(GPUS), default="H200", help="the GPU whose peaks the model uses")
    p.add_argument("--seqlens", type=parse_sizes, default=[32768, 131072, 524288],
                   help="comma list, k suffix = 1024 (default: 32k,128k,512k)")
    p.add_argument("--settings", type=cli.block_topk_list, default=[(512, 3), (128, 8)],
                   help="comma list of BLOCK/TOP_K settings (default: 512/3,128/8)")
    p.add_argument("--heads", type=cli.positive_int, default=32, help="query heads")
    p.add_argument("--kv_heads", type=cli.positive_int, default=8, help="KV heads")
    p.add_argument("--head_dim", type=cli.positive_int, default=128, help="head dim")
    p.add_argument("--designs", type=cli.names(DESIGNS, "design"), default=list(DESIGNS), help="comma list of kernel designs to model")
    p.add_argument("--per_kernel", action="store_true", help="print every kernel's modelled time")
    p.add_argument("--uncorrelated", action="store_true",
                   help="random selections (every row's past picks independent) instead of UNION_FACTOR")
    p.add_argument("--json", dest="json_path", default=None, help="also write the model's numbers to this JSON file")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    gpu = GPUS[args.gpu]
    designs = args.designs
    if args.heads % args.kv_heads:
        raise cli.fail(f"--heads ({args.heads}) must be a multiple of --kv_heads ({args.kv_heads})")
    rows = []
    print(f"MODELLED (no GPU ran this): {gpu.name}, Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} bf16, causal, "
          f"fwd+bwd unless noted; {'uncorrelated (random) selections' if args.uncorrelated else 'correlated selections'}; "
          f"assumptions at the top of bench/perf_model.py")
    header = (f"{'setting':>9} {'S':>5} {'design':>11} {'runs':>6} | {'fwd+bwd ms':>10} {'x FA2':>7} {'x FA3':>7} | {'fwd x FA2':>9} "
              f"{'gate/fwd':>8} | {'TFLOP/s eff':>11} {'wasted MMA':>10} | {'peak GiB':>8} {'x dense':>7} {'fwd-only x dense':>16}")
    print(header)
    print("-" * len(header))
    for bs, k in args.settings:
        for seqlen in args.seqlens:
            s = Shape(seqlen, args.heads, args.kv_heads, args.head_dim, bs, k)
            for m in compare(s, gpu, designs, args.uncorrelated):
                rows.append(m)
                print(f"{bs:>5}/k{k:<2} {seqlen // 1024:>4}K {m['design']:>11} {m['decomposition']:>6} | {m['fwd_bwd_s'] * 1e3:>10.2f} "
                      f"{m['speedup_fwd_bwd_vs_FA2']:>6.1f}x {m['speedup_fwd_bwd_vs_FA3']:>6.1f}x | "
                      f"{m['speedup_fwd_vs_FA2']:>8.1f}x {m['gate_share_fwd']:>8.0%} | {m['tflops_eff_fwd_bwd']:>11.0f} "
                      f"{m['wasted_mma_fraction']:>10.0%} | {_gib(m['mem_fwd_bwd']):>8} {m['mem_vs_dense_fwd_bwd']:>6.2f}x {m['mem_vs_dense_fwd']:>15.2f}x")
                if args.per_kernel:
                    for kk in m["kernels"]:
                        grid = ""
                        if kk["programs"]:
                            tail = tail_efficiency(kk["programs"], gpu.sms, kk["blocks_per_sm"])
                            grid = f"{kk['programs']:>10} programs ({tail:.0%} of the last wave's SM slots busy)"
                        print(f"{'':>35} {kk['phase']:>3} {kk['name']:<36} {kk['seconds'] * 1e3:9.3f} ms {grid} {kk['notes']}")
            dn = dense_flash(s, gpu, "FA2")
            print(f"{'':>17} dense flash fwd+bwd: FA2-class {dn['fwd_bwd_s'] * 1e3:.1f} ms, FA3-class "
                  f"{dense_flash(s, gpu, 'FA3')['fwd_bwd_s'] * 1e3:.1f} ms, peak {_gib(dn['mem_fwd_bwd'])} GiB (modelled)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(dict(modelled=True, assumptions=assumptions(), rows=rows), indent=1))
        print(f"wrote {args.json_path}")
    return rows


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "bench.perf_model"))
