"""How often the Triton gate's half-precision first pass falls back to float32 scores, and
whether its selection equals the torch gate's.

    python -m bench.gate_fallback                      # GPU: S=32K, Hq=32/Hkv=8, D=128
    TRITON_INTERPRET=1 python -m bench.gate_fallback --seqlen 2048 --heads 4 --kv_heads 2 --head_dim 64
    python -m bench.gate_fallback --json gate_fallback.json

The gate (``triton_kernels/gate.py``) scores blocks with one product in q's dtype, re-checks the
kept pairs in float32 and re-scores a whole (query tile, head) program in float32 when a row's
cut is a near tie. This tool counts those programs (the kernel's own counter) on synthetic keys:

* ``iid``: keys N(0, 1);
* ``offset``: keys N(0, 1) + 5 (a common component, which the block means keep);
* ``common``: keys 3 c + 0.1 N(0, 1) with one c per KV head (means close together, scores with
  heavy cancellation: the hard case for any float32 gate).

Rows whose selection differs from the torch gate's are checked in float64: ``max_tie_gap`` is
the largest |score(ours) - score(torch's)| over the differing picks divided by sum_i |q_i m_i|
(the scale of a float32 dot product's rounding); below ``D x 2**-24`` the two picks tie to
float32 rounding, where no float32 gate is canonical (docs/design.md, step 3). Trained models'
keys are the real test: the model's 5% fallback share (``bench/perf_model.py``) is a guess
until this runs on them or ``bench/device_check.py`` runs on a GPU.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/gate_fallback.py, from anywhere): import it as bench.gate_fallback
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"

import argparse
import json
import os
import sys
from pathlib import Path

from moba._core import cli

from ._common import make_parser, parse_size

KEY_KINDS = ("iid", "offset", "common")


def make_keys(kind: str, seqlen: int, kv_heads: int, head_dim: int, gen):
    import torch

    if kind == "iid":
        return torch.randn(seqlen, kv_heads, head_dim, generator=gen)
    if kind == "offset":
        return torch.randn(seqlen, kv_heads, head_dim, generator=gen) + 5.0
    if kind == "common":
        common = torch.randn(1, kv_heads, head_dim, generator=gen) * 3.0
        return common + 0.1 * torch.randn(seqlen, kv_heads, head_dim, generator=gen)
    raise ValueError(f"keys must be one of {KEY_KINDS}, got {kind!r}")


def gate_with_fallbacks(q, k, block_size: int, top_k: int):
    """The Triton gate on one causal sequence q (S, Hq, D), k (S, Hkv, D): (indices, the
    programs that re-scored in float32 (the kernel's counter), all (query tile, head) programs)."""
    import torch
    from moba.triton_kernels.attention import n_query_tiles
    from moba.triton_kernels.gate import GATE_CONFIGS, gate_select, padded_head_dim

    from moba._core.layout import build_layout

    s, hq, d = q.shape
    cu = [0, s]
    layout = build_layout(cu, cu, block_size, q.device)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
    fallbacks = torch.zeros(1, dtype=torch.int32, device=q.device)
    indices = gate_select(q, k, cu, cu_t, cu_t, layout.q_pos, layout.q_seq, layout.seq_n_blocks, layout.block_offset,
                          layout.block_start, layout.block_len, layout.block_size, top_k, True,
                          nb_max=layout.max_blocks_per_seq, fallbacks=fallbacks)
    return indices, int(fallbacks), n_query_tiles(cu, GATE_CONFIGS[padded_head_dim(d)][0]) * hq


def measure(q, k, block_size: int, top_k: int) -> dict:
    """Fallback share and agreement with the torch gate for one packed sequence q (S, Hq, D), k (S, Hkv, D)."""
    import torch

    from moba._core.layout import build_layout
    from moba.ops.gate import select_packed

    s, hq, d = q.shape
    ours, n_fallbacks, programs = gate_with_fallbacks(q, k, block_size, top_k)
    ref = select_packed(q, k, build_layout([0, s], [0, s], block_size, q.device), top_k, True)
    differ = (ours != ref).any(-1).nonzero().tolist()  # [(token, head)]
    n_blocks = -(-s // block_size)
    means = torch.zeros(n_blocks * block_size, k.shape[1], d, dtype=torch.float64, device=k.device)
    means[:s] = k.double()
    counts = torch.full((n_blocks,), float(block_size), dtype=torch.float64, device=k.device)
    counts[-1] = s - (n_blocks - 1) * block_size
    means = means.reshape(n_blocks, block_size, k.shape[1], d).sum(1) / counts[:, None, None]  # (nb, Hkv, D)
    gap = 0.0
    for t, h in differ:
        kv = h // (hq // k.shape[1])
        qd = q[t, h].double()
        picks = set(ours[t, h].tolist()) ^ set(ref[t, h].tolist())
        scores = {b: float(qd @ means[b, kv]) for b in picks}
        scale = max(float(qd.abs() @ means[b, kv].abs()) for b in picks)
        gap = max(gap, (max(scores.values()) - min(scores.values())) / max(scale, 1e-30))
    return dict(fallback_programs=n_fallbacks, programs=programs, fallback_share=n_fallbacks / max(1, programs),
                rows=s * hq, rows_differing=len(differ), max_tie_gap=gap, float32_tie_bound=d * 2.0**-24,
                differ_only_at_float32_ties=gap <= d * 2.0**-24)


def build_parser():
    p = make_parser(__doc__, "bench.gate_fallback")
    p.add_argument("--seqlen", type=parse_size, default=32768, help="tokens of the one sequence (8k, 32k, ...)")
    p.add_argument("--heads", type=cli.positive_int, default=32, help="query heads")
    p.add_argument("--kv_heads", type=cli.positive_int, default=8, help="key/value heads (GQA)")
    p.add_argument("--head_dim", type=cli.positive_int, default=128, help="head dimension")
    p.add_argument("--settings", type=_settings, default=[(512, 3), (128, 8)],
                   help="comma-separated BLOCK/TOP_K gate settings, top-k >= 2 (default: 512/3,128/8)")
    p.add_argument("--dtypes", type=cli.names(("bf16", "fp16"), "dtype"), default=["bf16", "fp16"],
                   help="comma-separated input dtypes (bf16, fp16)")
    p.add_argument("--keys", type=cli.names(KEY_KINDS, "key distribution"), default=list(KEY_KINDS),
                   help=f"comma-separated key distributions ({', '.join(KEY_KINDS)})")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the rows as JSON here")
    return p


def _settings(text: str) -> list[tuple[int, int]]:
    """``--settings``: BLOCK/TOP_K settings (``moba._core.sizes``), top-k >= 2 (the gate picks)."""
    out = cli.block_topk_list(text)
    for bs, k in out:
        if k < 2:
            raise argparse.ArgumentTypeError(f"{bs}/{k}: top-k must be >= 2 here (top-k 1 runs no gate)")
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    names, kinds, settings = a.dtypes, a.keys, a.settings
    if a.heads % a.kv_heads:
        raise SystemExit(f"--heads ({a.heads}) must be a multiple of --kv_heads ({a.kv_heads})")
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        device = torch.device("cpu")
    else:
        raise SystemExit("needs a CUDA device, or TRITON_INTERPRET=1 to run the kernel on CPU "
                         "(small shapes: --seqlen 2048 --heads 4 --kv_heads 2 --head_dim 64)")
    rows = []
    print(f"{'keys':>7} {'dtype':>5} {'setting':>8} | {'fallback':>8} {'programs':>8} | {'rows differing':>14} {'max gap':>9} ties only")
    for kind in kinds:
        for name in names:
            gen = torch.Generator().manual_seed(a.seed)
            q = torch.randn(a.seqlen, a.heads, a.head_dim, generator=gen).to(dtypes[name]).to(device)
            k = make_keys(kind, a.seqlen, a.kv_heads, a.head_dim, gen).to(dtypes[name]).to(device)
            for bs, top_k in settings:
                r = dict(keys=kind, dtype=name, block_size=bs, top_k=top_k, seqlen=a.seqlen, heads=a.heads,
                         kv_heads=a.kv_heads, head_dim=a.head_dim, **measure(q, k, bs, top_k))
                rows.append(r)
                print(f"{kind:>7} {name:>5} {f'{bs}/k{top_k}':>8} | {r['fallback_share']:>8.1%} {r['programs']:>8} | "
                      f"{r['rows_differing']:>14} {r['max_tie_gap']:>9.2e} {r['differ_only_at_float32_ties']}")
    if a.json_path:
        a.json_path.write_text(json.dumps({"device": str(torch.cuda.get_device_name() if device.type == "cuda"
                                                          else "CPU (Triton interpreter)"),
                                           "command": " ".join(["python -m bench.gate_fallback", *(argv or sys.argv[1:])]),
                                           "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "bench.gate_fallback"))
