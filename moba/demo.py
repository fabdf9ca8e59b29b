"""A short demonstration of the MoBA operator (``python -m moba.demo``).

Runs the gate and the PyTorch path on a random batch (4K tokens by default), checks them against the
dense-mask reference and dense SDPA, and prints what was selected.
"""

from __future__ import annotations

import argparse
import difflib
import time

import torch
import torch.nn.functional as F

import moba


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moba.demo", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq_len", type=int, default=4096, help="tokens of the random batch")
    p.add_argument("--block_size", type=int, default=512, help="MoBA key-block size")
    p.add_argument("--top_k", type=int, default=3, help="blocks per query (its own block included)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed of the random batch")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options as every entry point takes them (scaling_runs.cli): an unknown one is a usage error
    (exit 2) naming the nearest known options."""
    p = build_parser()
    a, extra = p.parse_known_args(argv)
    if extra:
        names = [s for act in p._actions for s in act.option_strings]
        near = [n for x in extra if x.startswith("--")
                for n in difflib.get_close_matches("--" + x[2:].split("=")[0].replace("-", "_"), names, n=1,
                                                   cutoff=0.75)]
        p.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    if a.block_size <= 0 or a.seq_len % a.block_size or not 0 < a.top_k <= a.seq_len // a.block_size:
        p.error(f"--seq_len ({a.seq_len}) must be a multiple of --block_size ({a.block_size}) and --top_k "
                f"({a.top_k}) in [1, seq_len / block_size]")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    b, s, hq, hkv, d, block, top_k = 1, a.seq_len, 8, 2, 64, a.block_size, a.top_k
    q = torch.randn(b, s, hq, d, requires_grad=True)
    k = torch.randn(b, s, hkv, d, requires_grad=True)
    v = torch.randn(b, s, hkv, d, requires_grad=True)
    print(f"MoBA demo: B={b} S={s} Hq={hq} Hkv={hkv} D={d} block={block} top_k={top_k} (CPU, float32)")
    idx = moba.select_blocks(q, k, block, top_k)
    print(f"query {s - 1}, head 0 attends to blocks {idx[0, -1, 0].tolist()} of {s // block}")
    t0 = time.perf_counter()
    out = moba.moba_attn_func(q, k, v, block, top_k, backend="torch", block_indices=idx)
    out.sum().backward()
    print(f"torch path forward+backward: {time.perf_counter() - t0:.2f} s")
    ref = moba.moba_attn_func(q, k, v, block, top_k, backend="reference", block_indices=idx)
    print(f"max |torch - reference| = {(out - ref).abs().max().item():.2e}")
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    as_dense = moba.moba_attn_func(q, k, v, block, top_k=s // block, backend="torch")
    print(f"top_k = n_blocks vs dense causal SDPA: max diff {(as_dense - dense).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
