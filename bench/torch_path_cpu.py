"""CPU benchmark of the PyTorch MoBA path against dense causal SDPA (forward + backward).

    python -m bench.torch_path_cpu                       # S = 8K and 16K (the numbers in docs/benchmarks.md)
    python -m bench.torch_path_cpu --seqlens 4096 --repeats 1
    python -m bench.torch_path_cpu --short               # training throughput, cpu-tiny shape

Long mode reports the speedup over SDPA and its share of the attended-pair limit: the ratio
of the (query, key) pairs dense causal attention computes to those MoBA computes (own block
causal + top_k - 1 full past blocks, the gate's exact selection counted), i.e. the speedup a
path with the same cost per pair as SDPA would reach. Short mode trains a small GPT-like
stack (the cpu-tiny preset's largest model: 3 layers, width 96, 3 query heads, 1 KV head,
context 256, block 32, top-3, batch 16, AdamW, 1 thread) built from ``moba.nn.MoBASelfAttention``
in "moba" and "full" mode and reports tokens/s of both, measured alternately in one process.

Shape: B=1, Hq=8, Hkv=2, D=64, block 512, top-3, float32; the backward gets one
pre-allocated random output gradient (as in training). Each provider runs in a fresh
subprocess. Memory is reported two ways: peak RSS (includes the allocator's fragmentation)
and peak live heap bytes above the inputs (glibc ``mallinfo2`` sampled after every aten op,
the CPU analogue of ``torch.cuda.max_memory_allocated``). CPU timings say nothing about GPU
kernels.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/torch_path_cpu.py, from anywhere): import it as bench.torch_path_cpu
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from moba._core import cli

from ._common import ROOT, make_parser, parse_sizes


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _live_heap_bytes() -> int:
    """Bytes currently allocated through malloc (small + mmapped chunks), glibc only."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):
    _LIBC = None


def _peak_live_bytes(fn) -> int | None:
    """Peak live heap bytes above the current level while ``fn`` runs (sampled after every aten op)."""
    if _LIBC is None:
        return None
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _live_heap_bytes())
            return out

    with Peak():  # the first dispatch mode of a process allocates ~13-26 MiB once: keep it out of the peak
        torch.zeros(1).add_(1)
    base = _live_heap_bytes()
    with Peak() as mode:
        fn()
    return mode.peak - base


def _inputs(seqlen: int):
    import torch

    torch.manual_seed(0)
    q = torch.randn(1, seqlen, 8, 64, requires_grad=True)
    k = torch.randn(1, seqlen, 2, 64, requires_grad=True)
    v = torch.randn(1, seqlen, 2, 64, requires_grad=True)
    return q, k, v, torch.randn(1, seqlen, 8, 64)


def _step(provider: str, q, k, v, dout) -> None:
    import torch.nn.functional as F

    import moba

    if provider == "moba-torch":
        out = moba.moba_attn_func(q, k, v, block_size=512, top_k=3, backend="torch")
    else:  # dense causal SDPA, GQA by enable_gqa (no repeated K/V)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        ).transpose(1, 2)
    out.backward(dout)


def _timing(seqlen: int, repeats: int, threads: int) -> dict:
    """Both providers in one process, alternating, so that load from other processes hits both
    alike; the speedup is the median of the per-round ratios."""
    import torch

    import moba

    torch.set_num_threads(threads)
    q, k, v, dout = _inputs(seqlen)
    times = {"sdpa-dense": [], "moba-torch": []}
    for provider in times:
        _step(provider, q, k, v, dout)  # warm-up
    for _ in range(repeats):
        for provider in times:
            q.grad = k.grad = v.grad = None
            t0 = time.perf_counter()
            _step(provider, q, k, v, dout)
            times[provider].append(time.perf_counter() - t0)
    with torch.no_grad():
        idx = moba.select_blocks(q, k, 512, 3)
    ratios = [a / b for a, b in zip(times["sdpa-dense"], times["moba-torch"], strict=True)]
    return {
        "seqlen": seqlen,
        "sdpa_median_s": statistics.median(times["sdpa-dense"]),
        "moba_median_s": statistics.median(times["moba-torch"]),
        "speedup": statistics.median(ratios),
        "speedup_per_round": ratios,
        "dense_pairs": 8 * seqlen * (seqlen + 1) // 2,
        "moba_pairs": _moba_pairs(idx, seqlen, 512),
    }


def _one(provider: str, seqlen: int, threads: int) -> dict:
    """Memory of one provider, alone in its process (peak RSS is per process)."""
    import torch

    torch.set_num_threads(threads)
    q, k, v, dout = _inputs(seqlen)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(provider, q, k, v, dout)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.grad = k.grad = v.grad = None
    live = _peak_live_bytes(lambda: _step(provider, q, k, v, dout))
    return {
        "provider": provider,
        "seqlen": seqlen,
        "peak_rss_mib": peak / 1024,
        "rss_above_inputs_mib": (peak - base_rss) / 1024,
        "peak_live_mib": None if live is None else live / 2**20,
    }


def _moba_pairs(idx, seqlen: int, block_size: int) -> int:
    """(query, key) pairs MoBA attends for block indices idx (1, S, Hq, slots), causal."""
    import torch

    t = torch.arange(seqlen)[None, :, None, None]
    start = idx.long() * block_size
    own = start + block_size > t
    n = torch.where(own, t - start + 1, torch.clamp(seqlen - start, max=block_size))
    return int(torch.where(idx >= 0, n, 0).sum())


def _short(steps: int, rounds: int) -> dict:
    """Training tokens/s of MoBA and full attention in the cpu-tiny preset's largest shape."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from moba.nn import MoBASelfAttention

    torch.set_num_threads(1)
    width, layers, heads, kv_heads, context, block, top_k, batch = 96, 3, 3, 1, 256, 32, 3, 16

    class Block(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
            self.attn = MoBASelfAttention(width, heads, kv_heads, block_size=block, top_k=top_k, mode=mode,
                                          backend="torch")
            self.fc, self.proj = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

        def forward(self, x):
            x = x + self.attn(self.n1(x))
            return x + self.proj(F.gelu(self.fc(self.n2(x))))

    def model(mode):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Embedding(256, width), *[Block(mode) for _ in range(layers)],
                            nn.LayerNorm(width, bias=False), nn.Linear(width, 256, bias=False))
        return net, torch.optim.AdamW(net.parameters(), lr=1e-3)

    data = torch.randint(0, 256, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    nets = {mode: model(mode) for mode in ("moba", "full")}

    def run(mode, n):
        net, opt = nets[mode]
        t0 = time.perf_counter()
        for _ in range(n):
            loss = F.cross_entropy(net(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    for mode in nets:
        run(mode, 2)  # warm-up
    elapsed = {mode: [] for mode in nets}
    for _ in range(rounds):  # alternate, so that load from other processes hits both alike
        for mode in nets:
            elapsed[mode].append(run(mode, steps))
    tok = {mode: batch * context * steps / statistics.median(t) for mode, t in elapsed.items()}
    return {"shape": dict(width=width, layers=layers, heads=heads, kv_heads=kv_heads, context=context,
                          block_size=block, top_k=top_k, batch=batch, threads=1),
            "moba_tok_s": tok["moba"], "full_tok_s": tok["full"], "ratio": tok["moba"] / tok["full"]}


def build_parser():
    p = make_parser(__doc__, "bench.torch_path_cpu")
    p.add_argument("--seqlens", type=parse_sizes, default=[8192, 16384], help="comma list of sequence lengths (k suffix = 1024)")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--short", action="store_true", help="training throughput at context 256 (cpu-tiny) instead")
    p.add_argument("--steps", type=cli.positive_int, default=5, help="--short: optimizer steps per timed round")
    p.add_argument("--rounds", type=cli.positive_int, default=5, help="--short: alternating rounds (median reported)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.child:
        what, seqlen = args.child[0], int(args.child[1])
        row = _timing(seqlen, args.repeats, args.threads) if what == "timing" else _one(what, seqlen, args.threads)
        print(json.dumps(row))
        return
    print("CPU timings (forward + backward); they say nothing about GPU kernels.")
    if args.short:
        r = _short(args.steps, args.rounds)
        print(f"short context training (cpu-tiny shape {r['shape']}): MoBA {r['moba_tok_s']:.0f} tok/s, "
              f"full {r['full_tok_s']:.0f} tok/s, ratio {r['ratio']:.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=1)
        return
    rows = []
    for seqlen in args.seqlens:
        def child(*what):
            cmd = [sys.executable, "-m", "bench.torch_path_cpu", "--child", *what, "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
            return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)

        load_before = os.getloadavg()
        t = child("timing", str(seqlen))
        t["load_average_1_5_15min"] = {"before": load_before, "after_timing": os.getloadavg()}
        mem = {provider: child(provider, str(seqlen)) for provider in ("sdpa-dense", "moba-torch")}
        limit = t["dense_pairs"] / t["moba_pairs"]
        t.update(pair_limit=limit, share_of_limit=t["speedup"] / limit, memory=mem,
                 peak_live_ratio=mem["moba-torch"]["peak_live_mib"] / mem["sdpa-dense"]["peak_live_mib"],
                 peak_rss_ratio=mem["moba-torch"]["peak_rss_mib"] / mem["sdpa-dense"]["peak_rss_mib"])
        rows.append(t)
        print(f"S={seqlen:6d} SDPA {t['sdpa_median_s']:.3f} s, MoBA {t['moba_median_s']:.3f} s (medians, alternating); "
              f"speedup x{t['speedup']:.2f} (median of per-round ratios {[round(r, 2) for r in t['speedup_per_round']]}), "
              f"pair limit x{limit:.2f}, share of the limit {t['share_of_limit']:.0%}")
        for provider, m in mem.items():
            print(f"S={seqlen:6d} {provider:11s} peak RSS {m['peak_rss_mib']:7.0f} MiB, "
                  f"peak live above inputs {m['peak_live_mib']:7.1f} MiB")
        print(f"S={seqlen:6d} peak live ratio {t['peak_live_ratio']:.2f}, peak RSS ratio {t['peak_rss_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "bench.torch_path_cpu"))
