"""Context-parallel MoBA: bytes and time per rank, measured on CPU (gloo) and modelled at scale.

Three parts, written to ``--out`` as ``context_parallel.json`` and ``context_parallel.md``:

1. **Measured** (CPU, gloo, 2-4 local processes): forward + backward of
   ``moba.distributed.moba_attn_func_cp`` for each method; wall time per call on this machine
   (median of ``--reps``) and the bytes each rank sent / received (``CommStats``). CPU gloo
   timings say nothing about NVLink or InfiniBand; they show the methods run and what they move.
2. **Selection statistics** (measured, single process): the gate's selection on the whole
   sequence (``moba.select_blocks``), and the remote key rows each rank's sparse method would
   fetch for it (``cost.remote_rows_from_selection``), as a fraction of all remote rows.
   Keys: ``random`` (Gaussian q/k) and ``heavy`` (synthetic: a few blocks whose keys share a
   direction the queries prefer, so the gate concentrates on them, standing in for trained
   gates; NOT keys of a trained checkpoint).
3. **Modelled** (labelled so): per-rank bytes (forward + backward) of ring attention, Ulysses
   and the sparse method at 128K-4M tokens on 8-64 GPUs (``moba.distributed.cost``), and the
   time those bytes take at the given bandwidths (NVLink within ``--gpus-per-node``, InfiniBand
   beyond): no latency, no overlap with compute. The sparse method uses the fetched fraction
   measured in part 2 (the measured fraction at smaller S; at larger S each chunk has more
   queries per block, so the fraction can only grow for random keys).

    python -m bench.context_parallel --out bench/results/cpu-context-parallel-2026-12-07
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/context_parallel.py, from anywhere): import it as bench.context_parallel
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"

import json
import statistics
import time
from pathlib import Path

from moba._core import cli

from ._common import device_name, git_state, make_parser, parse_size, parse_sizes, utc_now


def _measure_worker(rank: int, world: int, cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    from moba.distributed import CommStats, moba_attn_func_cp, shard_sequence

    g = torch.Generator().manual_seed(0)
    shape_q = (1, cfg["seqlen"], cfg["hq"], cfg["head_dim"])
    shape_k = (1, cfg["seqlen"], cfg["hkv"], cfg["head_dim"])
    q, k, v = (torch.randn(s, generator=g) for s in (shape_q, shape_k, shape_k))
    ql, kl, vl = (shard_sequence(t) for t in (q, k, v))
    out = {}
    for method in cfg["methods"]:
        if method == "ulysses" and cfg["hq"] % world:
            continue
        times, stats = [], None
        for rep in range(cfg["reps"] + 1):
            a, b, c = (t.clone().requires_grad_() for t in (ql, kl, vl))
            s = CommStats()
            dist.barrier()
            t0 = time.perf_counter()
            o = moba_attn_func_cp(a, b, c, cfg["block_size"], cfg["top_k"], method=method, stats=s)
            o.sum().backward()
            dist.barrier()
            if rep:  # the first call warms up
                times.append((time.perf_counter() - t0) * 1e3)
            stats = s
        out[method] = {"ms": statistics.median(times), "chosen": stats.method, "sent_bytes": stats.sent_bytes,
                       "recv_bytes": stats.recv_bytes, "by_phase": stats.as_dict()["by_phase"]}
    return out


def measure(worlds: list[int], cfg: dict) -> list[dict]:
    import torch

    from moba import moba_attn_func
    from moba.distributed import run_local

    rows = []
    torch.set_num_threads(1)  # as each rank process (run_local): one thread per process
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, cfg["seqlen"], cfg["hq"], cfg["head_dim"], generator=g)
    k = torch.randn(1, cfg["seqlen"], cfg["hkv"], cfg["head_dim"], generator=g)
    times = []
    for rep in range(cfg["reps"] + 1):
        a, b, c = (t.clone().requires_grad_() for t in (q, k, k))
        t0 = time.perf_counter()
        moba_attn_func(a, b, c, cfg["block_size"], cfg["top_k"]).sum().backward()
        if rep:
            times.append((time.perf_counter() - t0) * 1e3)
    rows.append({"world": 1, "method": "single process", "ms": statistics.median(times), "sent_bytes": 0})
    for world in worlds:
        per_rank = run_local(_measure_worker, world, cfg)
        for method in per_rank[0]:
            rows.append({"world": world, "method": method, "chosen": per_rank[0][method]["chosen"],
                         "ms": max(r[method]["ms"] for r in per_rank),
                         "sent_bytes_per_rank": [r[method]["sent_bytes"] for r in per_rank],
                         "recv_bytes_per_rank": [r[method]["recv_bytes"] for r in per_rank],
                         "by_phase_rank0": per_rank[0][method]["by_phase"]})
    return rows


def _keys(kind: str, seqlen: int, hq: int, hkv: int, d: int, block_size: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seqlen, hq, d, generator=g)
    k = torch.randn(1, seqlen, hkv, d, generator=g)
    if kind == "heavy":
        # Blocks 0 and every 16th block hold keys along a shared direction the queries lean to.
        u = torch.randn(d, generator=g)
        u = u / u.norm()
        heavy = torch.zeros(seqlen, dtype=torch.bool)
        pos = torch.arange(seqlen)
        heavy[(pos // block_size) % 16 == 0] = True
        k[0, heavy] += 4.0 * u
        q += 8.0 * u  # strong enough that (almost) no query-head's pick leaves the heavy blocks
    elif kind != "random":
        raise ValueError(f"unknown key kind {kind!r}")
    return q, k


def selection_stats(seqlen: int, worlds: list[int], cfg: dict, kinds=("random", "heavy")) -> list[dict]:
    from moba import select_blocks
    from moba.distributed import cost

    rows = []
    for kind in kinds:
        q, k = _keys(kind, seqlen, cfg["model_hq"], cfg["model_hkv"], cfg["model_head_dim"], cfg["model_block_size"])
        idx = select_blocks(q, k, cfg["model_block_size"], cfg["model_top_k"])
        for world in worlds:
            if seqlen % (2 * world):
                continue
            remote = cost.remote_rows_from_selection(idx, world, cfg["model_block_size"])
            all_remote = seqlen - seqlen // world
            rows.append({"keys": kind, "seqlen": seqlen, "world": world, "remote_rows_max": max(remote),
                         "fetched_fraction_max": max(remote) / all_remote,
                         "fetched_fraction_mean": sum(remote) / len(remote) / all_remote})
    return rows


def model(seqlens: list[int], worlds: list[int], fractions: dict, cfg: dict) -> list[dict]:
    from moba.distributed import cost

    hq, hkv, d, bs, e = cfg["model_hq"], cfg["model_hkv"], cfg["model_head_dim"], cfg["model_block_size"], 2
    rows = []
    for s in seqlens:
        for p in worlds:
            bw = cfg["nvlink_gbps"] if p <= cfg["gpus_per_node"] else cfg["ib_gbps"]
            row = {"seqlen": s, "world": p, "bandwidth_GBps": bw,
                   "ring": cost.ring_bytes(s, p, 1, hkv, d, e),
                   "ulysses": cost.ulysses_bytes(s, p, 1, hq, hkv, d, e),
                   "sparse_query_send": cost.sparse_query_bytes(s, p, 1, hq, d, cfg["model_top_k"], (p - 1) / p, e)}
            for kind, by_world in fractions.items():
                f = by_world.get(p, max(by_world.values()))
                row[f"sparse_{kind}"] = cost.sparse_bytes(s, p, 1, hkv, d, bs, f * (s - s // p), e)
            methods = [m for m in row if m in ("ring", "ulysses") or m.startswith("sparse_")]  # incl. query-send
            row["winner"] = min((row[m], m) for m in methods)[1]
            row["auto_vs_ring"] = {kind: min(row["ulysses"], row[f"sparse_{kind}"]) / row["ring"] for kind in fractions}
            row["time_ms"] = {m: row[m] / (bw * 1e9) * 1e3 for m in methods}
            rows.append(row)
    return rows


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def markdown(meta: dict, measured: list[dict], selection: list[dict], modelled: list[dict]) -> str:
    c = meta["config"]
    lines = ["# Context-parallel MoBA: communication", "",
             f"Generated by `python -m bench.context_parallel` on {meta['device']} ({meta['date']}).", "",
             f"## Measured on CPU (gloo, local processes): S={c['seqlen']}, Hq {c['hq']} / Hkv {c['hkv']}, "
             f"D {c['head_dim']}, block {c['block_size']}, top-{c['top_k']}, float32, forward + backward", "",
             "| ranks | method | ran | ms per call (median, slowest rank) | bytes sent per rank (max) |",
             "|---|---|---|---|---|"]
    for r in measured:
        sent = max(r.get("sent_bytes_per_rank", [0]))
        lines.append(f"| {r['world']} | {r['method']} | {r.get('chosen', '-')} | {r['ms']:.1f} | {sent:,} |")
    lines += ["", "CPU gloo times measure this shared 2-core machine, not a GPU interconnect.", "",
              f"## Selection statistics (measured): fraction of remote key rows the sparse method fetches "
              f"(Hq {c['model_hq']} / Hkv {c['model_hkv']}, D {c['model_head_dim']}, block "
              f"{c['model_block_size']}, top-{c['model_top_k']}, causal)", "",
              "| keys | S | ranks | fetched fraction (max rank) | (mean rank) |", "|---|---|---|---|---|"]
    for r in selection:
        lines.append(f"| {r['keys']} | {r['seqlen']} | {r['world']} | {r['fetched_fraction_max']:.3f} | "
                     f"{r['fetched_fraction_mean']:.3f} |")
    kinds = [k[len("sparse_"):] for k in modelled[0] if k.startswith("sparse_") and k != "sparse_query_send"]
    lines += ["", "`heavy` keys are synthetic (a few blocks the queries prefer), not a trained checkpoint.", "",
              "## MODELLED per-rank traffic, forward + backward, bf16 (GiB) and time at the link bandwidth", "",
              f"Hq {c['model_hq']} / Hkv {c['model_hkv']}, D {c['model_head_dim']}, block {c['model_block_size']}, "
              f"top-{c['model_top_k']}, batch 1; NVLink {c['nvlink_gbps']} GB/s within {c['gpus_per_node']} GPUs, "
              f"InfiniBand {c['ib_gbps']} GB/s beyond. Modelled, not measured: bytes / bandwidth, no latency, no overlap.", "",
              "| S | GPUs | ring | Ulysses | " + " | ".join(f"sparse ({k})" for k in kinds)
              + " | sparse, query-send (not implemented) | fewest bytes (modelled) | auto / ring (" + ", ".join(kinds) + ") | modelled ms: ring / Ulysses |",
              "|---|---|---|---|" + "---|" * len(kinds) + "---|---|---|---|"]
    for r in modelled:
        lines.append(f"| {r['seqlen'] // 1024}K | {r['world']} | {_gib(r['ring'])} | {_gib(r['ulysses'])} | "
                     + " | ".join(_gib(r[f"sparse_{k}"]) for k in kinds)
                     + f" | {_gib(r['sparse_query_send'])} | {r['winner']} | " + ", ".join(f"{r['auto_vs_ring'][k]:.3f}" for k in kinds)
                     + f" | {r['time_ms']['ring']:.1f} / {r['time_ms']['ulysses']:.1f} |")
    return "\n".join(lines) + "\n"


def build_parser():
    p = make_parser(__doc__, "bench.context_parallel")
    p.add_argument("--out", type=Path, default=None, help="folder for context_parallel.json / .md (default: print only)")
    p.add_argument("--worlds", type=parse_sizes, default=[2, 4], help="process counts to measure on CPU")
    p.add_argument("--seqlen", type=parse_size, default=4096, help="measured sequence length")
    p.add_argument("--hq", type=cli.positive_int, default=8, help="measured query heads")
    p.add_argument("--hkv", type=cli.positive_int, default=2, help="measured KV heads")
    p.add_argument("--head_dim", type=cli.positive_int, default=64, help="measured head dim")
    p.add_argument("--block_size", type=cli.positive_int, default=256, help="measured block size")
    p.add_argument("--top_k", type=cli.positive_int, default=3, help="measured top_k")
    p.add_argument("--reps", type=cli.positive_int, default=3, help="timed calls per method (after one warm-up)")
    p.add_argument("--methods", type=cli.names(("ulysses", "sparse", "auto"), "method"), default="ulysses,sparse,auto",
                   help="methods to measure")
    p.add_argument("--selection_seqlen", type=parse_size, default=32768, help="sequence length of the gate statistics")
    p.add_argument("--selection_worlds", type=parse_sizes, default=[8, 16, 32, 64], help="ranks for the gate statistics")
    p.add_argument("--model_seqlens", type=parse_sizes, default=[131072, 524288, 1048576, 4194304], help="modelled lengths")
    p.add_argument("--model_worlds", type=parse_sizes, default=[8, 16, 32, 64], help="modelled GPU counts")
    p.add_argument("--model_hq", type=cli.positive_int, default=32, help="modelled query heads")
    p.add_argument("--model_hkv", type=cli.positive_int, default=8, help="modelled KV heads")
    p.add_argument("--model_head_dim", type=cli.positive_int, default=128, help="modelled head dim")
    p.add_argument("--model_block_size", type=cli.positive_int, default=512, help="modelled block size")
    p.add_argument("--model_top_k", type=cli.positive_int, default=3, help="modelled top_k")
    p.add_argument("--nvlink_gbps", type=cli.positive_float, default=450.0, help="per-GPU NVLink bandwidth, GB/s one way (H100 NVLink 4)")
    p.add_argument("--ib_gbps", type=cli.positive_float, default=50.0, help="per-GPU InfiniBand bandwidth, GB/s (400 Gb/s NDR)")
    p.add_argument("--gpus_per_node", type=cli.positive_int, default=8, help="GPUs behind one NVLink domain")
    p.add_argument("--skip_measure", action="store_true", help="only the selection statistics and the model")
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    lists = ("out", "worlds", "skip_measure", "model_seqlens", "model_worlds", "selection_worlds")
    cfg = {k: v for k, v in vars(a).items() if k not in lists}
    measured = [] if a.skip_measure else measure(a.worlds, cfg)
    selection = selection_stats(a.selection_seqlen, a.selection_worlds, cfg)
    fractions: dict = {}
    for r in selection:
        fractions.setdefault(r["keys"], {})[r["world"]] = r["fetched_fraction_max"]
    modelled = model(a.model_seqlens, a.model_worlds, fractions, cfg)
    meta = {"tool": "bench.context_parallel", "date": utc_now(), "device": device_name("cpu"), "git": git_state(),
            "config": cfg, "note": "part 'modelled' is MODELLED (moba.distributed.cost), not measured"}
    result = {"meta": meta, "measured": measured, "selection": selection, "modelled": modelled}
    text = markdown(meta, measured, selection, modelled)
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "context_parallel.json").write_text(json.dumps(result, indent=1) + "\n")
        (a.out / "context_parallel.md").write_text(text)
    return result


if __name__ == "__main__":
    raise SystemExit(cli.run(main, "bench.context_parallel"))
