"""CPU benchmark of the PyTorch MoBA path against dense causal SDPA (forward + backward).

    python bench/torch_path_cpu.py                       # S = 8K and 16K (the README numbers)
    python bench/torch_path_cpu.py --seqlens 4096 --repeats 1

Shape: B=1, Hq=8, Hkv=2, D=64, block 512, top-3, float32. Each measurement runs in a fresh
subprocess so that peak RSS (the memory high-water mark) belongs to one provider only.
CPU timings say nothing about GPU kernels.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _one(provider: str, seqlen: int, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    import moba

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q = torch.randn(1, seqlen, 8, 64, requires_grad=True)
    k = torch.randn(1, seqlen, 2, 64, requires_grad=True)
    v = torch.randn(1, seqlen, 2, 64, requires_grad=True)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        if provider == "moba-torch":
            out = moba.moba_attn_func(q, k, v, block_size=512, top_k=3, backend="torch")
        else:  # dense causal SDPA, GQA by enable_gqa (no repeated K/V)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        out.sum().backward()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "provider": provider,
        "seqlen": seqlen,
        "median_s": statistics.median(times),
        "peak_rss_mib": peak / 1024,
        "rss_above_inputs_mib": (peak - base_rss) / 1024,
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
            print(f"S={seqlen:6d} {provider:11s} {r['median_s']:8.3f} s   peak RSS {r['peak_rss_mib']:8.0f} MiB")
        dense, ours = rows[-2], rows[-1]
        print(f"S={seqlen:6d} speedup x{dense['median_s'] / ours['median_s']:.2f}, "
              f"peak RSS ratio {ours['peak_rss_mib'] / dense['peak_rss_mib']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
