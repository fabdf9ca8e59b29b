"""How much faster than dense attention is MoBA, at what memory? One run answers it.

    python -m bench.attn_speed                          # GPU: S = 8k ... 1M, every provider
    python -m bench.attn_speed --seqlens 32k,128k --modes fwd --providers moba-triton,flash-attn
    python -m bench.attn_speed --block_size 512 --top_k 3 --heads 16 --kv_heads 16 --head_dim 64
    python -m bench.attn_speed --cpu --out /tmp/bench   # small CPU smoke run (< 30 s)

Defaults follow the MoBA paper's 1M-token speed test: B=1, 32 query heads, 8 KV heads,
head_dim 128, bf16, block 4096, top-12 (95.31% sparsity at 1M), causal. Dense attention at
512k-1M tokens takes seconds per call, so the full default run is long: each measurement
stops after ``--max_seconds`` of timed calls (at least one), a provider that runs out of
memory is skipped at longer sequences, and ``--seqlens`` / ``--modes`` / ``--providers``
trim the run.

Providers (each skipped with a printed reason when it cannot run):
  moba-triton     ours, ``moba.moba_attn_func(backend="triton")`` (fused Triton kernels)
  moba-torch      ours, ``backend="torch"`` (the PyTorch path)
  moba-full       ours, ``moba.full_attn_func``: the package's dense fallback (flash-attn or SDPA)
  flash-attn      dense ``flash_attn.flash_attn_func`` (CUDA, flash-attn installed)
  sdpa-flash, sdpa-cudnn, sdpa-efficient
                  dense torch SDPA pinned to one backend with ``sdpa_kernel`` (CUDA)
  sdpa            dense torch SDPA, default backend choice (CPU)
  sdpa-math       dense torch SDPA, math backend (materialises S x S; small sizes)
  flex-moba       MoBA through torch FlexAttention, exact per-query mask from ``moba.select_blocks``
                  (compiled on CUDA; eager on CPU, forward only: a correctness path there)
  moba-paper-reimpl
                  our re-implementation, from the MoBA paper, of the official algorithm (dense
                  varlen attention over the own chunk + gathered chunks, log-sum-exp merge);
                  not the official code
  moba-official   the official MoonshotAI/MoBA code itself (CUDA + flash-attn + a checkout of
                  github.com/MoonshotAI/MoBA given by --official_moba_src or $MOBA_OFFICIAL_SRC;
                  it cannot be installed next to this package: both are the module ``moba``)
  reference       ``backend="reference"``, dense mask, CPU small sizes only

Every timed MoBA call includes its gate (what a user pays); the gate alone
(``moba.select_blocks``) is reported as ``gating_ms``.

Metrics per (provider, seqlen, mode): median and p20/p80 time; effective TFLOP/s (attended
pairs only, counted exactly from the selection); dense-equivalent TFLOP/s (dense causal FLOPs
/ time); speedup vs the dense baseline (GPU: flash attention, i.e. flash-attn, else SDPA's
flash backend; CPU: torch SDPA, labelled "SDPA", never "flash"); peak memory, reported one
way in every output: the increase over what was allocated before the call (the inputs, and
for ``bwd`` the saved forward), ``peak_mem_delta_mib`` (``torch.cuda.max_memory_allocated``
minus the allocation before, on GPU; peak RSS minus RSS before on CPU, measured in this
process after resetting the kernel's high-water mark with /proc/self/clear_refs).

Output (under ``--out``, default ``bench/results/<device>-<date>/``): a table on the terminal,
``attn_speed.json`` (metadata + rows), ``attn_speed.csv``, ``time_vs_seqlen.png`` and
``speedup_vs_seqlen.png``. Feed the JSON to ``bench/roofline.py``.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/attn_speed.py, from anywhere): import it as bench.attn_speed
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"

import argparse
import csv
import ctypes
import gc
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import moba
from moba._core import cli

from ._attn_model import (
    MODES,
    attention_flops,
    dense_pairs,
    moba_pairs,
    moba_pairs_from_indices,
)
from ._common import (
    RESULTS,
    device_name,
    git_state,
    is_oom,
    make_parser,
    package_version,
    parse_size,
    parse_sizes,
    time_call_ms,
    utc_now,
    utc_stamp,
)
from .providers import PROVIDERS, Skip, backward_skip_reason, provider_forward

ALL_PROVIDERS = tuple(PROVIDERS)
OURS = ("moba-triton", "moba-torch")
MOBA_PROVIDERS = {name for name, p in PROVIDERS.items() if p.kind == "moba"}
# moba-full duplicates flash-attn / sdpa-flash, sdpa-math is no long-context option: ask for them by name.
GPU_DEFAULT_PROVIDERS = tuple(p for p in ALL_PROVIDERS if p not in ("sdpa", "reference", "moba-full", "sdpa-math"))
CPU_DEFAULT_PROVIDERS = ("moba-torch", "reference", "sdpa", "moba-paper-reimpl")
#: How plots and tables name each dense baseline (the CPU one is SDPA, not flash attention).
BASELINE_LABELS = {name: p.label for name, p in PROVIDERS.items() if p.label}
CPU_NOTE = "CPU timings say nothing about GPU kernels: this mode checks that the benchmark runs."
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


# ----------------------------------------------------------------------------- CLI helpers
def parse_names(text: str, allowed, what: str) -> list[str]:
    """A comma list of names from ``allowed`` (argparse type); a typo names the nearest."""
    return cli.names(allowed, what)(text)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, "bench.attn_speed")
    p.add_argument("--seqlens", type=parse_sizes, default=None, help="comma list, k/m suffixes (default: 8k,32k,128k,512k,1m; --cpu: 512,1k,2k)")
    p.add_argument("--batch", type=cli.positive_int, default=1, help="sequences per call")
    p.add_argument("--heads", type=cli.positive_int, default=None, help="query heads (default: 32; --cpu: 4)")
    p.add_argument("--kv_heads", type=cli.positive_int, default=None, help="KV heads, divides --heads (default: 8; --cpu: 2)")
    p.add_argument("--head_dim", type=cli.positive_int, default=None, help="head dimension (default: 128; --cpu: 64)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="input dtype (default: bf16; --cpu: fp32)")
    p.add_argument("--block_size", type=parse_size, default=None, help="MoBA block (default: 4096; --cpu: 64)")
    p.add_argument("--top_k", type=cli.positive_int, default=None, help="blocks per query, own included (default: 12; --cpu: 3)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal attention")
    p.add_argument("--modes", type=lambda s: parse_names(s, MODES, "mode"), default=list(MODES),
                   help=f"comma list of {', '.join(MODES)} (default: all)")
    p.add_argument("--providers", type=lambda s: parse_names(s, ALL_PROVIDERS, "provider"), default=None,
                   help="comma list of " + ", ".join(ALL_PROVIDERS) + " (default: " + ",".join(GPU_DEFAULT_PROVIDERS)
                   + "; --cpu: " + ",".join(CPU_DEFAULT_PROVIDERS) + "); see bench/providers.py")
    p.add_argument("--device", type=cli.device, default=None, help="default cuda when available, else cpu (which implies --cpu)")
    p.add_argument("--out", default=None, help="output folder (default: bench/results/<device>-<date>/)")
    p.add_argument("--cpu", action="store_true", help="small CPU smoke run: S 512,1k,2k, few heads, fp32")
    p.add_argument("--repeats", type=cli.positive_int, default=None, help="timed runs per measurement (default: 10; --cpu: 3)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=None,
                   help="untimed runs before the timed ones (default: 1; --cpu: 0); the peak-memory run comes first anyway")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; --cpu: 1, stable on shared machines)")
    p.add_argument("--max_seconds", type=cli.positive_float, default=20.0,
                   help="cap on one measurement's timed runs: fewer repeats (>= 3) when a run is slow")
    p.add_argument("--reference_max", type=parse_size, default=1024,
                   help="longest sequence the dense-mask reference provider runs (it is O(S^2) and slow)")
    p.add_argument("--official_moba_src", default=None,
                   help="checkout of github.com/MoonshotAI/MoBA for the moba-official provider (default: $MOBA_OFFICIAL_SRC)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    p.add_argument("--no_plots", action="store_true", help="write no PNG plots")
    p.add_argument("--quiet", action="store_true", help="no table, only the output paths")
    return p


@dataclass
class Config:
    seqlens: list
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    top_k: int
    causal: bool
    modes: list
    providers: list
    device: str
    cpu_mode: bool
    repeats: int
    warmup: int
    max_seconds: float
    seed: int
    threads: int | None
    reference_max: int = 1024
    official_moba_src: str | None = None


def resolve_config(args) -> Config:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch build sees no CUDA device (torch {torch.__version__})")
    cpu_mode = args.cpu or torch.device(device).type == "cpu"
    if cpu_mode and not args.cpu:
        print(f"No CUDA device requested/available (device={device}): running the small CPU mode.")
    if cpu_mode:
        d = dict(seqlens=[512, 1024, 2048], heads=4, kv_heads=2, head_dim=64, dtype="fp32", block_size=64, top_k=3,
                 providers=list(CPU_DEFAULT_PROVIDERS), repeats=3, warmup=0, threads=1)
        device = device if args.device else "cpu"
    else:
        d = dict(seqlens=parse_sizes("8k,32k,128k,512k,1m"), heads=32, kv_heads=8, head_dim=128, dtype="bf16",
                 block_size=4096, top_k=12, providers=list(GPU_DEFAULT_PROVIDERS), repeats=10, warmup=1, threads=None)

    def pick(name):
        value = getattr(args, name)
        return d[name] if value is None else value

    cfg = Config(
        seqlens=pick("seqlens"), batch=args.batch, heads=pick("heads"), kv_heads=pick("kv_heads"),
        head_dim=pick("head_dim"), dtype=pick("dtype"), block_size=pick("block_size"), top_k=pick("top_k"),
        causal=args.causal, modes=args.modes, providers=pick("providers"), device=device, cpu_mode=cpu_mode,
        repeats=max(1, pick("repeats")), warmup=max(0, pick("warmup")), max_seconds=args.max_seconds, seed=args.seed,
        threads=pick("threads"), reference_max=args.reference_max, official_moba_src=args.official_moba_src,
    )
    if cfg.heads % cfg.kv_heads:
        raise SystemExit(f"--heads ({cfg.heads}) must be a multiple of --kv_heads ({cfg.kv_heads})")
    return cfg


# ----------------------------------------------------------------------------- providers
# ----------------------------------------------------------------------------- measuring
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(
    fn: Callable, dev: torch.device, warmup: int, repeats: int, max_seconds: float, first_call_s: float = 0.0
) -> list[float]:
    """Milliseconds of each timed call: CUDA events on GPU, perf_counter on CPU.

    ``first_call_s``: how long an untimed call just took (the peak-memory run). When one call
    takes more than a quarter of ``max_seconds``, the warm-up is skipped (that call was the
    warm-up) and as few as one call is timed; otherwise the loop stops early, after at least
    3 timed calls, once they add up to more than ``max_seconds``.
    """
    slow = first_call_s > max_seconds / 4
    for _ in range(0 if slow else warmup):
        fn()
    _sync(dev)
    at_least = 1 if slow else min(3, repeats)
    times: list[float] = []
    for _ in range(repeats):
        times.append(time_call_ms(fn, dev))
        if len(times) >= at_least and sum(times) > max_seconds * 1e3:
            break
    return times


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable, dev: torch.device) -> float | None:
    """Peak MiB above what was allocated before one call of ``fn`` (the inputs): the one
    memory figure every output reports.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call.
    CPU: peak RSS delta: free heap is trimmed, the kernel's high-water mark is reset by
    writing 5 to /proc/self/clear_refs, then VmHWM - VmRSS before; None when the platform
    cannot do that.
    """
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return (peak - base) / 2**20
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base) / 1024


def _step(fwd: Callable, mode: str, q, k, v):
    """The callable one measurement times, for a mode."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fwd(q, k, v)
        return step
    out = fwd(q, k, v)
    dout = torch.randn_like(out)
    if mode == "bwd":
        def step():
            q.grad = k.grad = v.grad = None
            out.backward(dout, retain_graph=True)
        return step

    def step():
        q.grad = k.grad = v.grad = None
        fwd(q, k, v).backward(dout)
    return step


@dataclass
class Row:
    provider: str
    seqlen: int
    mode: str
    status: str  # ok | oom | skipped | error
    reason: str = ""
    kind: str = ""  # moba | dense
    batch: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    dtype: str = ""
    block_size: int = 0
    top_k: int = 0
    causal: bool = True
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    n_timed: int = 0
    pairs: int | None = None
    sparsity: float | None = None
    flops_effective: float | None = None
    flops_dense: float | None = None
    tflops_effective: float | None = None
    tflops_dense_equiv: float | None = None
    speedup: float | None = None
    speedup_vs: str | None = None
    peak_mem_delta_mib: float | None = None  # MiB above the inputs (see peak_memory)
    gating_ms: float | None = None


def _free(dev, collect: bool = False):
    """Release memory between measurements; ``collect`` also runs the cycle collector (slow
    with torch loaded, so only after failures and between sequence lengths)."""
    if collect:
        gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def measure_gate(q, k, cfg: Config, dev) -> tuple[float | None, torch.Tensor | None, str]:
    """Median ms of ``moba.select_blocks`` and its indices (None + reason on failure)."""
    try:
        with torch.no_grad():
            holder = {}

            def gate():
                holder["idx"] = moba.select_blocks(q, k, cfg.block_size, cfg.top_k, cfg.causal)

            times = time_fn(gate, dev, cfg.warmup, cfg.repeats, cfg.max_seconds)
        return statistics.median(times), holder["idx"], ""
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        _free(dev, collect=True)
        return None, None, ("OOM" if is_oom(e) else f"{type(e).__name__}: {e}")


def run_benchmark(cfg: Config, log=print) -> list[Row]:
    dev = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    rows: list[Row] = []
    oom_at: dict[tuple[str, str], int] = {}  # (provider, mode) -> seqlen that ran out of memory
    forwards: dict[str, Callable | str] = {}
    for name in cfg.providers:
        try:
            forwards[name] = provider_forward(name, cfg)
        except Skip as s:
            forwards[name] = str(s)
            log(f"skip {name}: {s}")
    base = dict(batch=cfg.batch, heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype=cfg.dtype,
                block_size=cfg.block_size, top_k=cfg.top_k, causal=cfg.causal)
    for s in sorted(cfg.seqlens):
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

        def rand(h, s=s, gen=gen):
            return torch.randn(cfg.batch, s, h, cfg.head_dim, generator=gen, dtype=torch.float32).to(dev, dtype)

        try:
            q, k, v = rand(cfg.heads), rand(cfg.kv_heads), rand(cfg.kv_heads)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            _free(dev, collect=True)
            for name in cfg.providers:
                for mode in cfg.modes:
                    rows.append(Row(name, s, mode, "oom", "inputs do not fit", **base))
            continue
        need_moba = any(n in MOBA_PROVIDERS and callable(forwards[n]) for n in cfg.providers)
        gating_ms, idx, gate_err = measure_gate(q, k, cfg, dev) if need_moba else (None, None, "")
        if gate_err:
            log(f"S={s}: gate failed ({gate_err}); MoBA pairs from the analytic count")
        d_pairs = dense_pairs(s, cfg.causal) * cfg.batch * cfg.heads
        if idx is not None:
            m_pairs = sum(moba_pairs_from_indices(idx[:, a : a + 65536], cfg.block_size, cfg.causal, offset=a,
                                                  seqlen=s)
                          for a in range(0, s, 65536))
            del idx
        else:
            m_pairs = moba_pairs(s, cfg.block_size, cfg.top_k, cfg.causal) * cfg.batch * cfg.heads
        for name in cfg.providers:
            fwd = forwards[name]
            kind = "moba" if name in MOBA_PROVIDERS else "dense"
            for mode in cfg.modes:
                row = Row(name, s, mode, "ok", kind=kind, **base)
                rows.append(row)
                if not callable(fwd):
                    row.status, row.reason = "skipped", fwd
                    continue
                if name == "reference" and s > cfg.reference_max:
                    row.status, row.reason = "skipped", f"reference runs only for S <= {cfg.reference_max} (--reference_max)"
                    continue
                if (name, mode) in oom_at:
                    row.status, row.reason = "skipped", f"out of memory at S={oom_at[(name, mode)]}"
                    continue
                if mode != "fwd" and backward_skip_reason(name, cfg):
                    row.status, row.reason = "skipped", backward_skip_reason(name, cfg)
                    continue
                row.pairs = m_pairs if kind == "moba" else d_pairs
                row.sparsity = 1.0 - row.pairs / d_pairs
                row.flops_effective = attention_flops(row.pairs, cfg.head_dim, mode)
                row.flops_dense = attention_flops(d_pairs, cfg.head_dim, mode)
                if kind == "moba":
                    row.gating_ms = gating_ms
                try:
                    grad = mode != "fwd"
                    qq, kk, vv = (x.detach().requires_grad_(grad) for x in (q, k, v))
                    step = _step(fwd, mode, qq, kk, vv)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t_first = time.perf_counter()
                        row.peak_mem_delta_mib = peak_memory(step, dev)
                        t_first = time.perf_counter() - t_first
                        times = time_fn(step, dev, cfg.warmup, cfg.repeats, cfg.max_seconds, t_first)
                    row.median_ms = statistics.median(times)
                    row.p20_ms, row.p80_ms = quantile(times, 0.2), quantile(times, 0.8)
                    row.n_timed = len(times)
                    row.tflops_effective = row.flops_effective / (row.median_ms * 1e-3) / 1e12
                    row.tflops_dense_equiv = row.flops_dense / (row.median_ms * 1e-3) / 1e12
                except Exception as e:  # noqa: BLE001 - one provider never stops the run
                    row.status = "oom" if is_oom(e) else "error"
                    row.reason = "out of memory" if row.status == "oom" else f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"{name} S={s} {mode}: {row.status.upper()} {row.reason}")
                    if row.status == "oom":
                        oom_at[(name, mode)] = s
                    step = None
                    _free(dev, collect=True)
                finally:
                    step = qq = kk = vv = None
                    _free(dev)
                if row.status == "ok":
                    log(f"{name:15s} S={s:8d} {mode:8s} {row.median_ms:10.3f} ms")
        del q, k, v
        _free(dev, collect=True)
    add_speedups(rows, dev)
    return rows


def baseline_candidates(device_type: str) -> tuple[str, ...]:
    """The dense baseline to compare with, in order of preference: flash attention on GPU, SDPA on CPU."""
    return ("flash-attn", "sdpa-flash", "sdpa-cudnn", "moba-full") if device_type == "cuda" else ("sdpa", "moba-full", "sdpa-math")


def add_speedups(rows: list[Row], dev) -> None:
    ok = {(r.provider, r.seqlen, r.mode): r for r in rows if r.status == "ok"}
    for r in rows:
        if r.status != "ok":
            continue
        for b in baseline_candidates(dev.type):
            ref = ok.get((b, r.seqlen, r.mode))
            if ref is not None:
                r.speedup = ref.median_ms / r.median_ms
                r.speedup_vs = b
                break


def summarize(rows: list[Row]) -> list[dict]:
    """Per (seqlen, mode): our fastest MoBA path (moba-triton / moba-torch) against the dense
    baseline, with peak memory above the inputs."""
    ok = [r for r in rows if r.status == "ok"]
    out = []
    for s in sorted({r.seqlen for r in rows}):
        for mode in MODES:
            moba_rows = [r for r in ok if r.seqlen == s and r.mode == mode and r.provider in OURS]
            if not moba_rows:
                continue
            best = min(moba_rows, key=lambda r: r.median_ms)
            base = next((r for r in ok if r.seqlen == s and r.mode == mode and r.provider == best.speedup_vs), None)
            mem_ratio = (best.peak_mem_delta_mib / base.peak_mem_delta_mib
                         if base and best.peak_mem_delta_mib and base.peak_mem_delta_mib else None)
            out.append(dict(seqlen=s, mode=mode, moba=best.provider, moba_ms=best.median_ms,
                            baseline=best.speedup_vs, baseline_ms=base.median_ms if base else None,
                            speedup=best.speedup, moba_peak_mem_delta_mib=best.peak_mem_delta_mib,
                            baseline_peak_mem_delta_mib=base.peak_mem_delta_mib if base else None,
                            mem_ratio=mem_ratio, sparsity=best.sparsity))
    return out


def baseline_label(names) -> str:
    """How outputs name the dense baseline(s) the speedups are against: "SDPA" on CPU,
    "flash-attn" / "SDPA flash backend" on GPU (several joined with " / ")."""
    labels = list(dict.fromkeys(BASELINE_LABELS.get(n, n) for n in names if n))
    return " / ".join(labels) if labels else "the dense baseline"


def print_summary(summary: list[dict]) -> None:
    if not summary:
        return
    label = baseline_label(x["baseline"] for x in summary)
    print(f"Summary: our fastest MoBA path vs dense {label} (memory = peak MiB above the inputs)")
    for x in summary:
        sp = "-" if x["speedup"] is None else f"{x['speedup']:.2f}x"
        mem = "-" if x["mem_ratio"] is None else f"{x['mem_ratio']:.2f}x the memory"
        base = BASELINE_LABELS.get(x["baseline"], x["baseline"]) if x["baseline"] else "no baseline"
        print(f"  S={x['seqlen']:>8} {x['mode']:8s} {x['moba']:14s} {x['moba_ms']:10.3f} ms  "
              f"{sp:>8} vs {base} ({'-' if x['baseline_ms'] is None else format(x['baseline_ms'], '.3f')} ms), "
              f"{mem}, sparsity {x['sparsity']:.1%}")


# ----------------------------------------------------------------------------- metadata + output
def metadata(cfg: Config, argv: list[str]) -> dict:
    dev = torch.device(cfg.device)
    meta = {
        "benchmark": "attn_speed",
        "schema_version": 2,  # 2: one memory column (peak_mem_delta_mib), the absolute peak_mem_mib is gone
        "date": utc_now(),
        "argv": list(argv),
        "device": str(dev),
        "device_name": device_name(dev),
        "driver_version": None,
        "cuda_version": torch.version.cuda,
        "torch_version": torch.__version__,
        "triton_version": package_version("triton"),
        "flash_attn_version": package_version("flash_attn"),
        "moba_version": getattr(moba, "__version__", None),
        **git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "timing": "CUDA events per call" if dev.type == "cuda" else "time.perf_counter per call",
        "peak_mem": "peak_mem_delta_mib = peak above the inputs: torch.cuda.max_memory_allocated minus memory "
        "allocated before the call" if dev.type == "cuda" else
        "peak_mem_delta_mib = peak above the inputs: peak RSS (VmHWM after /proc/self/clear_refs reset) minus RSS "
        "before the call",
        "flops": "attended pairs x 4 x head_dim (fwd); bwd 2.5x, fwd+bwd 3.5x; dense = S(S+1)/2 pairs per head (S^2 non-causal)",
        "baseline_preference": list(baseline_candidates(dev.type)),
        "moba_times_include_gate": True,
        "note": CPU_NOTE if cfg.cpu_mode else "",
        "config": asdict(cfg),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta["gpu_memory_gib"] = props.total_memory / 2**30
        meta["sm_count"] = props.multi_processor_count
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            meta["driver_version"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return meta


def default_out_dir(dev: torch.device) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(dev)).strip("-").lower()[:40]
    return RESULTS / f"{slug}-{utc_stamp()}"


def write_outputs(rows: list[Row], meta: dict, out: Path, plots: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "attn_speed.json", "csv": out / "attn_speed.csv"}
    records = [asdict(r) for r in rows]
    with open(paths["json"], "w") as f:
        json.dump({"metadata": meta, "summary": summarize(rows), "rows": records}, f, indent=1)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]) if records else list(Row.__dataclass_fields__))
        w.writeheader()
        w.writerows(records)
    if plots:
        paths.update(write_plots(rows, meta, out))
    return paths


def write_plots(rows: list[Row], meta: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scaling_runs.plotting import readable_log_axis

    ok = [r for r in rows if r.status == "ok"]
    modes = [m for m in MODES if any(r.mode == m for r in rows)] or ["fwd"]
    base = baseline_label(r.speedup_vs for r in ok)
    providers = list(dict.fromkeys(r.provider for r in rows))
    cfg = meta["config"]
    title = (f"{meta['device_name']}: B={cfg['batch']} Hq={cfg['heads']} Hkv={cfg['kv_heads']} D={cfg['head_dim']} "
             f"{cfg['dtype']}, block {cfg['block_size']} top-{cfg['top_k']}{'' if cfg['causal'] else ', non-causal'}")
    paths = {}
    for key, fname, ylabel in (("median_ms", "time_vs_seqlen.png", "median time (ms)"),
                               ("speedup", "speedup_vs_seqlen.png", f"speedup vs dense {base} (x)")):
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            for p in providers:
                pts = sorted((r.seqlen, getattr(r, key)) for r in ok if r.provider == p and r.mode == mode
                             and getattr(r, key) is not None)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                            linestyle="--" if p not in MOBA_PROVIDERS else "-", label=p)
            readable_log_axis(ax, "x", base=2, units=1024)  # 512, 1K, 2K, ...
            readable_log_axis(ax, "y")
            if key == "speedup":
                ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(mode)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(title + ("\n" + CPU_NOTE if meta.get("note") else ""), fontsize=9)
        fig.tight_layout()
        paths[key] = out / fname
        fig.savefig(paths[key], dpi=120)
        plt.close(fig)
    return {"time_png": paths["median_ms"], "speedup_png": paths["speedup"]}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows: list[Row], meta: dict) -> None:
    base = baseline_label(r.speedup_vs for r in rows if r.status == "ok")
    headers = ["provider", "S", "mode", "median ms", "p20-p80 ms", "TFLOP/s eff", "TFLOP/s dense-eq",
               f"speedup vs {base}", "peak MiB above inputs", "gate ms", "status"]
    body = []
    for r in rows:
        if r.status == "skipped":
            continue
        body.append([
            r.provider, str(r.seqlen), r.mode, _fmt(r.median_ms, ".3f"),
            "-" if r.p20_ms is None else f"{r.p20_ms:.3f}-{r.p80_ms:.3f}",
            _fmt(r.tflops_effective, ".3f"), _fmt(r.tflops_dense_equiv, ".3f"),
            "-" if r.speedup is None else f"{r.speedup:.2f}x", _fmt(r.peak_mem_delta_mib, ".1f"),
            _fmt(r.gating_ms, ".3f"), r.status if r.status == "ok" else f"{r.status.upper()} {r.reason[:40]}",
        ])
    skipped = sorted({(r.provider, r.mode if r.mode != "fwd" else "", r.reason) for r in rows if r.status == "skipped"})
    title = f"MoBA attention speed on {meta['device_name']} (torch {meta['torch_version']})"
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="left" if h in ("provider", "mode", "status") else "right")
        for b in body:
            table.add_row(*b)
        console = Console(width=max(160, Console().width))
        console.print(table)
    except ImportError:
        print(title)
        print(" | ".join(headers))
        for b in body:
            print(" | ".join(b))
    for p, mode, reason in skipped:
        print(f"skipped {p}{' ' + mode if mode else ''}: {reason}")
    if meta.get("note"):
        print(meta["note"])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.cpu_mode:
        print(CPU_NOTE)
    meta = metadata(cfg, [sys.argv[0] if sys.argv else "attn_speed.py", *argv])
    log = (lambda *a, **kw: None) if args.quiet else print
    t0 = time.perf_counter()
    rows = run_benchmark(cfg, log=log)
    meta["wall_seconds"] = round(time.perf_counter() - t0, 3)
    out = Path(args.out) if args.out else default_out_dir(torch.device(cfg.device))
    # nothing measured (every provider skipped or failed): the JSON/CSV record why, no empty plots
    nothing_ran = not any(r.status == "ok" for r in rows)
    paths = write_outputs(rows, meta, out, plots=not args.no_plots and not nothing_ran)
    if not args.quiet:
        print_table(rows, meta)
        print_summary(summarize(rows))
    for name, path in paths.items():
        print(f"wrote {name}: {path}")
    if nothing_ran:
        why = sorted({f"{r.provider}: {r.status} ({r.reason})" for r in rows})
        raise SystemExit("error: nothing was measured: every provider was skipped or failed:\n  "
                         + "\n  ".join(why or ["no (provider, seqlen, mode) to run"]))
    return {"rows": rows, "metadata": meta, "paths": paths}


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "bench.attn_speed"))
