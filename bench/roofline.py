"""Place MoBA and dense attention kernels on a GPU's roofline.

    python -m bench.roofline bench/results/<run>/attn_speed.json --out roofline.png
    python -m bench.roofline --out roofline.png                      # model only: H100 SXM ceilings
    python -m bench.roofline RUN.json decode.json --device_name "NVIDIA H200" --out r.png
    python -m bench.roofline RUN.json --measure --out r.png          # measure the ceilings here

For every kernel and mode - MoBA forward / backward, dense (flash) attention forward /
backward, the MoBA gate, and decoding with 1 query token and with several (4, 8: the
verification step of speculative decoding) - the arithmetic intensity (FLOPs / HBM bytes)
comes from the documented traffic model in ``_attn_model.py`` (``attention_bytes``,
``dense_bytes``, ``moba_bytes``, ``gate_bytes``, ``decode_flops_bytes``). Measured points
(filled markers) use the achieved FLOP/s = model FLOPs / measured time; model-only points
(hollow markers) sit on the roof (the best the kernel could do at its intensity).

Inputs (any number of JSON files):

* the ``attn_speed.json`` written by ``bench/attn_speed.py``: every ``ok`` row becomes a
  point (attention FLOPs counted from the exact selection, bytes from the model; the gate
  time becomes a "gate" point). Rows of kernels the tiled model does not describe
  (``reference``, ``sdpa-math``) are left out.
* a *points* file, for other tools (e.g. a generation benchmark)::

      {"device_name": "NVIDIA H100 80GB HBM3",          # optional
       "points": [{"name": "decode MoBA n_q=4",         # legend label (points with the same
                                                        #  name are joined by a line)
                   "flops": 1.2e9,                      # FLOPs of one call
                   "bytes": 3.4e8,                      # HBM bytes of one call
                   "seconds": 1.1e-4}]}                 # measured time of one call; null or
                                                        #  absent = model only (on the roof)

Ceilings (peak dense bf16 tensor FLOP/s, HBM bytes/s): ``--peak_tflops`` / ``--peak_bw_tbs``,
else ``--measure`` (a large matmul and a large copy on this machine's device), else the table
``moba._core.hardware.DEVICES`` by device name (``--device_name``, else the JSON's metadata). Results
from a CPU use the table's fixed CPU row (this project's 2-core Xeon, measured once): CPU
ceilings measured on each run vary several-fold with the machine's load, so a plot would move
from one run to the next; pass ``--measure`` to measure this CPU instead.

The plot: the roof, then one colour per kernel (provider) and one marker per mode, filled
for measured points and hollow for model-only ones, explained by two legends (kernels;
modes and fill) beside the axes; log axes read 0.1, 1, 10 FLOP/B and 1G, 1T, 1P FLOP/s.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/roofline.py, from anywhere): import it as bench.roofline
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"

import argparse
import json
import math
import time
from pathlib import Path

from moba._core import cli
from moba._core.hardware import caveat, find_device

from ._attn_model import (
    DTYPE_BYTES,
    attention_flops,
    decode_flops_bytes,
    dense_bytes,
    dense_pairs,
    gate_bytes,
    gate_flops,
    intensity,
    moba_bytes,
    moba_pairs,
)
from ._common import make_parser

#: Model configuration used when no attn_speed JSON gives one (the MoBA paper's 1M test).
DEFAULT_MODEL = dict(batch=1, heads=32, kv_heads=8, head_dim=128, dtype="bf16", block_size=4096, top_k=12,
                     causal=True, seqlen=131072)
EXCLUDED_PROVIDERS = {"reference", "sdpa-math"}
DECODE_QUERIES = (1, 4, 8)


# ----------------------------------------------------------------------------- ceilings
def peaks_for(name: str | None):
    """(label, FLOP/s, bytes/s, warning or None) for a device name (``moba._core.hardware``'s
    table), or None when unknown."""
    device = find_device(name)
    if device is None:
        return None
    return device.label, device.bf16_flops, device.hbm_bytes, caveat(name)


def measure_peaks(device: str | None = None) -> tuple[str, float, float]:
    """Measure (label, FLOP/s, bytes/s) here: a large matmul (bf16 on CUDA, fp32 on CPU) and a
    large copy (read + write counted)."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    x = torch.empty(2**28 if cuda else 2**25, device=dev, dtype=torch.float32)

    def best(fn, reps):
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
        out = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(dev)
            out = min(out, time.perf_counter() - t)
        return out

    t_mm = best(lambda: a @ b, 10 if cuda else 3)
    t_cp = best(lambda: x.clone(), 10 if cuda else 3)
    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    return f"{name} (measured)", 2 * n**3 / t_mm, 2 * x.numel() * 4 / t_cp


def roof(ai: float, peak_flops: float, peak_bw: float) -> float:
    """Attainable FLOP/s at arithmetic intensity ``ai``: min(peak, ai * bandwidth)."""
    return min(peak_flops, ai * peak_bw)


# ----------------------------------------------------------------------------- points
def _elem(dtype: str) -> int:
    return DTYPE_BYTES.get(dtype, 2)


def points_from_attn_speed(data: dict, tile_m: int = 128, tile_n: int = 128) -> list[dict]:
    """Measured points (name, flops, bytes, seconds, ...) from an attn_speed.json."""
    pts = []
    gates = {}
    for r in data.get("rows", []):
        if r.get("status") != "ok" or r.get("median_ms") is None or r["provider"] in EXCLUDED_PROVIDERS:
            continue
        e = _elem(r["dtype"])
        common = (r["batch"], r["seqlen"], r["heads"], r["head_dim"], e)
        if r["kind"] == "moba":
            nbytes = moba_bytes(*common, r["block_size"], r["top_k"], r["causal"], r["mode"], tile_m, tile_n)
        else:
            nbytes = dense_bytes(*common, r["causal"], r["mode"], tile_m, tile_n)
        pts.append(dict(name=f"{r['provider']} {r['mode']}", flops=r["flops_effective"], bytes=nbytes,
                        seconds=r["median_ms"] * 1e-3, seqlen=r["seqlen"], kind=r["kind"], mode=r["mode"],
                        family=r["provider"], variant=r["mode"]))
        if r.get("gating_ms") is not None:
            gates[r["seqlen"]] = (r, r["gating_ms"])
    for s, (r, ms) in sorted(gates.items()):
        e = _elem(r["dtype"])
        pts.append(dict(
            name="gate (moba.select_blocks)",
            flops=gate_flops(r["batch"], s, r["heads"], r["kv_heads"], r["head_dim"], r["block_size"]),
            bytes=gate_bytes(r["batch"], s, r["heads"], r["kv_heads"], r["head_dim"], r["block_size"], r["top_k"], e),
            seconds=ms * 1e-3, seqlen=s, kind="gate", mode="fwd", family="gate (moba.select_blocks)",
            variant="fwd"))
    return pts


def model_points(cfg: dict, decode_queries=DECODE_QUERIES, tile_m: int = 128, tile_n: int = 128) -> list[dict]:
    """Model-only points (no time) for one configuration: MoBA / dense fwd and bwd, the gate,
    and decoding with each number of query tokens, dense and MoBA."""
    b, s, h, hkv, d = cfg["batch"], cfg["seqlen"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    bs, tk, causal, e = cfg["block_size"], cfg["top_k"], cfg["causal"], _elem(cfg["dtype"])
    pts = []
    for mode in ("fwd", "bwd"):
        pts.append(dict(name=f"MoBA {mode} (model)", kind="moba", mode=mode, seqlen=s, seconds=None,
                        family="MoBA (model)", variant=mode,
                        flops=attention_flops(moba_pairs(s, bs, tk, causal) * b * h, d, mode),
                        bytes=moba_bytes(b, s, h, d, e, bs, tk, causal, mode, tile_m, tile_n)))
        pts.append(dict(name=f"dense {mode} (model)", kind="dense", mode=mode, seqlen=s, seconds=None,
                        family="dense (model)", variant=mode,
                        flops=attention_flops(dense_pairs(s, causal) * b * h, d, mode),
                        bytes=dense_bytes(b, s, h, d, e, causal, mode, tile_m, tile_n)))
    pts.append(dict(name="gate (model)", kind="gate", mode="fwd", seqlen=s, seconds=None,
                    family="gate (model)", variant="fwd",
                    flops=gate_flops(b, s, h, hkv, d, bs), bytes=gate_bytes(b, s, h, hkv, d, bs, tk, e)))
    for nq in decode_queries:
        for label, kw in (("dense", {}), ("MoBA", {"block_size": bs, "top_k": tk})):
            f, by = decode_flops_bytes(s, nq, h, hkv, d, e, batch=b, **kw)
            pts.append(dict(name=f"decode {label} n_q={nq} (model)", kind=f"decode-{label.lower()}",
                            mode=f"n_q={nq}", seqlen=s, seconds=None, flops=f, bytes=by,
                            family=f"decode {label} (model)", variant=f"n_q={nq}"))
    return pts


def load_inputs(paths: list[str]) -> tuple[list[dict], dict | None, str | None]:
    """Points from every input file, the first attn_speed config found, and a device name."""
    points, cfg, device = [], None, None
    for p in paths:
        try:
            with open(p) as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise cli.fail(f"input {p}: not a JSON file ({e}); expected an attn_speed.json or a points file") from None
        if not isinstance(data, dict):
            raise cli.fail(f"input {p}: expected a JSON object with 'rows' (attn_speed.json) or 'points'")
        if "rows" in data:
            points += points_from_attn_speed(data)
            meta = data.get("metadata", {})
            device = device or meta.get("device_name")
            if cfg is None and meta.get("config"):
                c = meta["config"]
                cfg = {k: c[k] for k in ("batch", "heads", "kv_heads", "head_dim", "dtype", "block_size", "top_k", "causal")}
                cfg["seqlen"] = max(c["seqlens"])
        elif "points" in data:
            for q in data["points"]:
                missing = [k for k in ("name", "flops", "bytes") if k not in q]
                if missing:
                    raise cli.fail(f"input {p}: a point lacks {', '.join(missing)} (schema: name, flops, bytes, seconds)")
                points.append(dict(kind="external", mode="", seqlen=None, seconds=q.get("seconds"),
                                   family=q["name"], variant="point", **{k: q[k] for k in ("name", "flops", "bytes")}))
            device = device or data.get("device_name")
        else:
            raise cli.fail(f"input {p}: neither an attn_speed.json (rows) nor a points file (points)")
    return points, cfg, device


# ----------------------------------------------------------------------------- plot
def annotate(points: list[dict], peak_flops: float, peak_bw: float) -> list[dict]:
    """Add intensity, achieved FLOP/s, attainable FLOP/s and fraction of the roof to each point."""
    for p in points:
        p["intensity"] = intensity(p["flops"], p["bytes"])
        p["attainable_flops_per_s"] = roof(p["intensity"], peak_flops, peak_bw)
        sec = p.get("seconds")
        p["achieved_flops_per_s"] = p["flops"] / sec if sec else None
        p["fraction_of_roof"] = p["achieved_flops_per_s"] / p["attainable_flops_per_s"] if sec else None
    return points


#: Marker per mode (variant); other variants take the spare markers in turn.
MARKERS = {"fwd": "o", "bwd": "s", "fwd+bwd": "D", "n_q=1": "^", "n_q=4": "v", "n_q=8": "<", "point": "P"}
SPARE_MARKERS = ("p", "h", "*", "X", ">", "d")


def plot(points: list[dict], label: str, peak_flops: float, peak_bw: float, out: Path, note: str = "") -> Path:
    """The roofline PNG: one colour per kernel (``family``), one marker per mode (``variant``),
    filled = measured, hollow = model only (on the roof); two legends beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from scaling_runs.plotting import format_tick, readable_log_axis

    fig, ax = plt.subplots(figsize=(10, 6))
    ais = [p["intensity"] for p in points if math.isfinite(p["intensity"])]
    lo = min([0.1, *ais]) / 2
    hi = max([1e3, *ais]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [roof(x, peak_flops, peak_bw) for x in xs], color="black", linewidth=2)
    ridge = peak_flops / peak_bw
    ax.axvline(ridge, color="grey", linestyle=":", linewidth=0.8)
    ax.annotate(f"ridge {ridge:.0f} FLOP/B", (ridge, peak_flops), textcoords="offset points", xytext=(4, -12),
                fontsize=7)

    families = list(dict.fromkeys(p.get("family", p["name"]) for p in points))
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    colors = {f: cmap(i % cmap.N) for i, f in enumerate(families)}
    variants = list(dict.fromkeys(p.get("variant", p.get("mode", "")) for p in points))
    spare = iter(SPARE_MARKERS * (1 + len(variants) // len(SPARE_MARKERS)))
    markers = {v: MARKERS.get(v) or next(spare) for v in variants}
    labelled: set[str] = set()
    for name in dict.fromkeys(p["name"] for p in points):
        group = sorted((p for p in points if p["name"] == name), key=lambda p: (p.get("seqlen") or 0))
        color = colors[group[0].get("family", name)]
        marker = markers[group[0].get("variant", group[0].get("mode", ""))]
        measured = [p for p in group if p["achieved_flops_per_s"]]
        model = [p for p in group if not p["achieved_flops_per_s"]]
        if measured:
            ax.plot([p["intensity"] for p in measured], [p["achieved_flops_per_s"] for p in measured],
                    marker=marker, color=color, linestyle="-", linewidth=0.8)
            last = measured[-1]
            if last.get("seqlen") and group[0].get("family", name) not in labelled:  # once per kernel
                labelled.add(group[0].get("family", name))
                ax.annotate(f"S={format_tick(last['seqlen'])}", (last["intensity"], last["achieved_flops_per_s"]),
                            textcoords="offset points", xytext=(3, 3), fontsize=6, color=color)
        if model:
            ax.scatter([p["intensity"] for p in model], [p["attainable_flops_per_s"] for p in model],
                       marker=marker, facecolors="none", edgecolors=[color], s=60)
    ax.set_xlim(lo, hi)
    readable_log_axis(ax, "x")  # FLOP/B: 0.1, 1, 10, ...
    readable_log_axis(ax, "y", units=1000)  # FLOP/s: 1G, 1T, 1P
    ax.set_xlabel("Arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("Performance (FLOP/s; G = 1e9, T = 1e12, P = 1e15)")
    ax.set_title(f"{label} roofline" + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.25)

    kernels = [Line2D([], [], color="black", linewidth=2, label=f"roof: {format_tick(peak_flops, 1000)} FLOP/s, "
                      f"{format_tick(peak_bw, 1000)} B/s")]
    kernels += [Line2D([], [], color=colors[f], marker="o", linestyle="-", linewidth=0.8, label=f) for f in families]
    first = ax.legend(handles=kernels, title="kernel", fontsize=7, title_fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    shapes = [Line2D([], [], color="dimgrey", marker=markers[v], linestyle="none", label=v or "-") for v in variants]
    shapes += [Line2D([], [], color="dimgrey", marker="o", linestyle="none", label="filled: measured"),
               Line2D([], [], color="dimgrey", marker="o", markerfacecolor="none", linestyle="none",
                      label="hollow: model, on the roof")]
    second = ax.legend(handles=shapes, title="mode", fontsize=7, title_fontsize=8, loc="lower left",
                       bbox_to_anchor=(1.01, 0.0))
    out.parent.mkdir(parents=True, exist_ok=True)
    # "tight" counts only the axes' current legend; naming both keeps the first one whole too
    fig.savefig(out, dpi=130, bbox_inches="tight", bbox_extra_artists=[first, second])
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, "bench.roofline")
    p.add_argument("inputs", nargs="*", type=cli.existing_file, help="attn_speed.json and/or points JSON files (none: model only)")
    p.add_argument("--out", default="roofline.png", help="PNG path; a .json with the points is written beside it")
    p.add_argument("--device_name", default=None, help="pick the ceilings from the table by this name")
    p.add_argument("--peak_tflops", type=cli.positive_float, default=None, help="peak dense tensor TFLOP/s")
    p.add_argument("--peak_bw_tbs", type=cli.positive_float, default=None, help="peak HBM bandwidth, TB/s")
    p.add_argument("--measure", action="store_true", help="measure the ceilings on this machine")
    p.add_argument("--no_model", action="store_true", help="leave out the model-only points")
    p.add_argument("--decode_queries", default=[1, 4, 8], type=cli.list_of(cli.positive_int, "query counts"), help="query tokens per decode step for the model points")
    p.add_argument("--tile", type=cli.positive_int, default=128, help="query / key tile of the traffic model")
    return p


def resolve_peaks(args, device: str | None) -> tuple[str, float, float, str]:
    if (args.peak_tflops is None) != (args.peak_bw_tbs is None):
        raise cli.fail("--peak_tflops and --peak_bw_tbs go together: give both (or neither)")
    if args.peak_tflops and args.peak_bw_tbs:
        return args.device_name or device or "custom", args.peak_tflops * 1e12, args.peak_bw_tbs * 1e12, ""
    if args.measure:
        label, f, b = measure_peaks()
        return label, f, b, "ceilings measured here"
    name = args.device_name or device
    found = peaks_for(name)
    if found:
        label, f, b, warn = found
        if label.startswith("CPU"):
            return label, f, b, "fixed CPU ceilings from the table, not this machine's (--measure measures them)"
        return label, f, b, (f"warning: {warn}" if warn else "")
    if name is None:
        label, f, b, _ = peaks_for("H100")
        return label, f, b, "no device given: H100 SXM ceilings"
    where = "--device_name" if args.device_name else "the inputs' device_name"
    raise cli.fail(f"{where}: no ceilings for the device {name!r} in moba._core.hardware.DEVICES: pass --peak_tflops and --peak_bw_tbs, or --measure")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    points, cfg, device = load_inputs(args.inputs)
    label, peak_f, peak_b, note = resolve_peaks(args, device)
    if not args.no_model:
        points += model_points(cfg or DEFAULT_MODEL, args.decode_queries, args.tile, args.tile)
    if not points:
        raise cli.fail("nothing to plot: the inputs have no measured points and --no_model leaves out the model")
    annotate(points, peak_f, peak_b)
    out = Path(args.out)
    plot(points, label, peak_f, peak_b, out, note)
    side = out.with_suffix(".json")
    with open(side, "w") as f:
        json.dump({"device": label, "peak_flops_per_s": peak_f, "peak_bytes_per_s": peak_b, "note": note,
                   "model_config": cfg or DEFAULT_MODEL, "points": points}, f, indent=1)
    print(f"{label}: peak {peak_f:.4g} FLOP/s, {peak_b:.4g} B/s {('(' + note + ')') if note else ''}")
    for p in points:
        ach = p["achieved_flops_per_s"]
        print(f"  {p['name']:40s} S={p.get('seqlen') or '-'!s:>8} AI={p['intensity']:9.2f} FLOP/B  "
              + (f"{ach:10.4g} FLOP/s ({100 * p['fraction_of_roof']:.1f}% of roof)" if ach else "model only"))
    print(f"wrote {out} and {side}")
    return {"points": points, "png": out, "json": side, "peaks": (label, peak_f, peak_b)}


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "bench.roofline"))
