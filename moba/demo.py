"""A short demonstration of the MoBA operator (``python -m moba.demo``).

Runs the gate and the PyTorch path on a random 4K-token batch, checks them against the
dense-mask reference and dense SDPA, and prints what was selected.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import moba


def main() -> None:
    torch.manual_seed(0)
    b, s, hq, hkv, d, block, top_k = 1, 4096, 8, 2, 64, 512, 3
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
