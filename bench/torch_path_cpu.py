"""CPU benchmark of the PyTorch MoBA path against dense causal SDPA (forward + backward).

    python bench/torch_path_cpu.py                       # S = 8K and 16K (the README numbers)
    python bench/torch_path_cpu.py --seqlens 4096 --repeats 1

Shape: B=1, Hq=8, Hkv=2, D=64, block 512, top-3, float32; the backward gets one
pre-allocated random output gradient (as in training). Each provider runs in a fresh
subprocess. Memory is reported two ways: peak RSS (includes the allocator's fragmentation)
and peak live heap bytes above the inputs (glibc ``mallinfo2`` sampled after every aten op,
the CPU analogue of ``torch.cuda.max_memory_allocated``). CPU timings say nothing about GPU
kernels.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time


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


def _one(provider: str, seqlen: int, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    import moba

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q = torch.randn(1, seqlen, 8, 64, requires_grad=True)
    k = torch.randn(1, seqlen, 2, 64, requires_grad=True)
    v = torch.randn(1, seqlen, 2, 64, requires_grad=True)
    dout = torch.randn(1, seqlen, 8, 64)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        if provider == "moba-torch":
            out = moba.moba_attn_func(q, k, v, block_size=512, top_k=3, backend="torch")
        else:  # dense causal SDPA, GQA by enable_gqa (no repeated K/V)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        out.backward(dout)

    step()  # warm-up
    times = []
    for _ in range(repeats):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.grad = k.grad = v.grad = None
    live = _peak_live_bytes(step)
    return {
        "provider": provider,
        "seqlen": seqlen,
        "median_s": statistics.median(times),
        "peak_rss_mib": peak / 1024,
        "rss_above_inputs_mib": (peak - base_rss) / 1024,
        "peak_live_mib": None if live is None else live / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="8192,16384")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(_one(args._child[0], int(args._child[1]), args.repeats, args.threads)))
        return
    print("CPU timings (forward + backward); they say nothing about GPU kernels.")
    rows = []
    for seqlen in [int(s) for s in args.seqlens.split(",")]:
        for provider in ("sdpa-dense", "moba-torch"):
            cmd = [sys.executable, __file__, "--_child", provider, str(seqlen), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
            r = rows[-1]
            print(f"S={seqlen:6d} {provider:11s} {r['median_s']:8.3f} s   peak RSS {r['peak_rss_mib']:7.0f} MiB"
                  f"   peak live above inputs {r['peak_live_mib']:7.1f} MiB")
        dense, ours = rows[-2], rows[-1]
        print(f"S={seqlen:6d} speedup x{dense['median_s'] / ours['median_s']:.2f}, "
              f"peak RSS ratio {ours['peak_rss_mib'] / dense['peak_rss_mib']:.2f}, "
              f"peak live ratio {ours['peak_live_mib'] / dense['peak_live_mib']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
