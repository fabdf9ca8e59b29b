"""Tests of the benchmark tools in bench/ (they never time anything themselves).

* ``bench/attn_speed.py`` end to end in its CPU mode (subprocess, into tmp_path);
* the FLOP, pair and HBM-traffic counting of ``bench/_attn_model.py`` on hand-computed cases;
* the paper re-implementation of MoBA (not the official code) and the FlexAttention MoBA against the
  reference; the official-package provider skips with a reason without CUDA / flash-attn / a checkout;
* ``bench/roofline.py``: ceilings table, model points, plots with and without timing data.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import moba
from bench import _attn_model as am
from bench import roofline
from bench._common import is_oom
from bench._moba_impls import load_official_moba, paper_reimpl_gate, paper_reimpl_moba
from scaling_runs.plotting import format_tick, readable_log_axis
from tests._helpers import ROOT, capture_figures
from tests._subprocess import run_child

ROW_KEYS = {
    "provider", "seqlen", "mode", "status", "reason", "kind", "median_ms", "p20_ms", "p80_ms",
    "tflops_effective", "tflops_dense_equiv", "speedup", "speedup_vs", "peak_mem_delta_mib",
    "gating_ms", "pairs", "sparsity", "flops_effective", "flops_dense", "batch", "heads", "kv_heads",
    "head_dim", "dtype", "block_size", "top_k", "causal",
}
META_KEYS = {
    "device", "device_name", "driver_version", "cuda_version", "torch_version", "triton_version", "git_commit",
    "date", "argv", "config", "note", "timing", "peak_mem",
}


# ----------------------------------------------------------------------------- attn_speed end to end
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attn_speed")
    providers = "moba-torch,reference,sdpa,moba-paper-reimpl,flex-moba,moba-triton,sdpa-flash,flash-attn,moba-official"
    cmd = [sys.executable, "-m", "bench.attn_speed", "--cpu", "--seqlens", "128,256", "--block-size", "4",
           "--top-k", "3", "--repeats", "2", "--providers", providers, "--out", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = run_child(cmd, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_attn_speed_cpu_writes_json_csv_pngs(cpu_run):
    out, stdout = cpu_run
    assert "CPU timings say nothing about GPU kernels" in stdout
    data = json.loads((out / "attn_speed.json").read_text())
    assert META_KEYS <= set(data["metadata"])
    assert data["metadata"]["config"]["cpu_mode"] is True
    rows = data["rows"]
    assert rows and all(ROW_KEYS <= set(r) for r in rows)
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["seqlen"] for r in rows} == {128, 256}
    with open(out / "attn_speed.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for png in ("time_vs_seqlen.png", "speedup_vs_seqlen.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attn_speed_cpu_rows_are_consistent(cpu_run):
    out, _ = cpu_run
    rows = json.loads((out / "attn_speed.json").read_text())["rows"]
    by = {(r["provider"], r["seqlen"], r["mode"]): r for r in rows}
    for p in ("moba-torch", "reference", "sdpa", "moba-paper-reimpl"):
        for s in (128, 256):
            for m in ("fwd", "bwd", "fwd+bwd"):
                r = by[(p, s, m)]
                assert r["status"] == "ok", r
                assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
                assert r["tflops_effective"] > 0 and r["tflops_dense_equiv"] >= r["tflops_effective"]
                assert r["speedup_vs"] == "sdpa" and r["speedup"] > 0
    # unavailable providers are rows with a reason, never a crash
    for p in ("sdpa-flash", "flash-attn", "moba-official"):
        assert by[(p, 128, "fwd")]["status"] == "skipped" and by[(p, 128, "fwd")]["reason"]
    assert "CUDA" in by[("moba-official", 128, "fwd")]["reason"]
    assert by[("moba-triton", 128, "fwd")]["status"] in ("skipped", "ok", "error")
    # exact pair counts: dense causal and MoBA (causal: analytic count == count from the selection)
    r = by[("sdpa", 256, "fwd")]
    assert r["pairs"] == am.dense_pairs(256) * 1 * 4
    assert r["flops_effective"] == am.attention_flops(r["pairs"], 64, "fwd")
    m = by[("moba-torch", 256, "fwd+bwd")]
    assert m["pairs"] == am.moba_pairs(256, 4, 3) * 4
    assert m["gating_ms"] > 0 and by[("sdpa", 256, "fwd")]["gating_ms"] is None
    assert m["flops_dense"] == am.attention_flops(am.dense_pairs(256) * 4, 64, "fwd+bwd")
    assert by[("sdpa", 256, "fwd")]["speedup"] == pytest.approx(1.0)
    # FlexAttention has no CPU backward: forward ok, backward rows skipped with the reason
    assert by[("flex-moba", 128, "fwd")]["status"] == "ok"
    assert by[("flex-moba", 128, "bwd")]["status"] == "skipped"


def test_attn_speed_arguments(monkeypatch):
    from bench import attn_speed

    assert attn_speed.parse_sizes("8k,32k,1m,512") == [8192, 32768, 1 << 20, 512]
    with pytest.raises(argparse.ArgumentTypeError):
        attn_speed.parse_size("12q")
    cfg = attn_speed.resolve_config(attn_speed.build_parser().parse_args(["--cpu"]))
    assert cfg.seqlens == [512, 1024, 2048] and cfg.device == "cpu" and "moba-torch" in cfg.providers
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            attn_speed.resolve_config(attn_speed.build_parser().parse_args(["--device", "cuda"]))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only to read the GPU defaults
    cfg = attn_speed.resolve_config(attn_speed.build_parser().parse_args(
        ["--device", "cuda", "--seqlens", "8k", "--no-causal", "--modes", "fwd", "--heads", "16", "--kv-heads", "4"]))
    assert cfg.seqlens == [8192] and cfg.causal is False and cfg.modes == ["fwd"] and cfg.block_size == 4096
    assert attn_speed.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_providers_registry():
    """Every provider is one registry entry: what it needs, and a skip reason instead of a crash."""
    from bench import attn_speed
    from bench.providers import PROVIDERS, Skip, provider_forward

    assert attn_speed.ALL_PROVIDERS == tuple(PROVIDERS) and set(attn_speed.OURS) <= set(PROVIDERS)
    assert all(p.kind in ("moba", "dense") and p.requires for p in PROVIDERS.values())
    cfg = attn_speed.resolve_config(attn_speed.build_parser().parse_args(["--cpu"]))
    with pytest.raises(Skip, match="CUDA"):
        provider_forward("flash-attn", cfg)
    with pytest.raises(Skip, match="unknown provider"):
        provider_forward("no-such-provider", cfg)
    q = torch.randn(1, 16, 2, 8)
    torch.testing.assert_close(provider_forward("moba-torch", cfg)(q, q, q),
                               moba.moba_attn_func(q, q, q, cfg.block_size, cfg.top_k, backend="torch"))


# (the one CLI convention of every tool, underscored options included: tests/test_cli_errors.py)


# ----------------------------------------------------------------------------- counting
def test_pair_counts_hand_computed():
    assert am.dense_pairs(8) == 36 and am.dense_pairs(8, causal=False) == 64
    assert am.moba_pairs(8, 4, 1) == 1 + 2 + 3 + 4 + 1 + 2 + 3 + 4  # block-diagonal causal: 20
    assert am.moba_pairs(8, 4, 2) == 36  # top_k >= n_blocks: dense
    # tail block: S=10, block 4, top-2: block 0: 10; block 1: 10 + 4*4; block 2 (2 queries): 1+2 + 2*4
    assert am.moba_pairs(10, 4, 2) == 10 + 26 + 11
    assert am.moba_pairs(8, 4, 1, causal=False) == 32


def test_pairs_from_indices_hand_computed():
    pad = moba.PAD_INDEX
    # S=10, block 4, one head, non-causal: query 0 picks blocks {0, 2} (2-token tail), others {own}.
    idx = torch.full((1, 10, 1, 2), pad, dtype=torch.int32)
    idx[0, :, 0, 0] = torch.arange(10) // 4
    idx[0, 0, 0, 1] = 2
    own_lengths = [4] * 4 + [4] * 4 + [2] * 2
    assert am.moba_pairs_from_indices(idx, 4, causal=False) == sum(own_lengths) + 2
    # causal, own block only: 1+2+3+4 + 1+2+3+4 + 1+2
    idx_c = idx.clone()
    idx_c[0, 0, 0, 1] = pad
    assert am.moba_pairs_from_indices(idx_c, 4, causal=True) == 20 + 3


def test_pairs_from_selection_gqa_matches_analytic():
    q = torch.randn(2, 37, 4, 8)
    k = torch.randn(2, 37, 2, 8)
    idx = moba.select_blocks(q, k, block_size=8, top_k=3)
    assert am.moba_pairs_from_indices(idx, 8) == am.moba_pairs(37, 8, 3) * 2 * 4
    dense = moba.select_blocks(q, k, block_size=8, top_k=100)
    assert am.moba_pairs_from_indices(dense, 8) == am.dense_pairs(37) * 2 * 4


def test_flops_and_bytes_hand_computed():
    assert am.attention_flops(20, 4, "fwd") == 320
    assert am.attention_flops(20, 4, "bwd") == 800
    assert am.attention_flops(20, 4, "fwd+bwd") == 1120
    # gate: S=8, Hq=2, Hkv=1, D=4, block 4 -> means 8*1*4 adds + 2*4 FLOPs x 8 queries x 2 heads x 2 blocks
    assert am.gate_flops(1, 8, 2, 1, 4, 4) == 32 + 256
    # gate bytes, bf16: K 8*1*4*2 + means 2*2*1*4*4 + Q 8*2*4*2 + indices 8*2*min(3,2)*4
    assert am.gate_bytes(1, 8, 2, 1, 4, 4, 3, 2) == 64 + 64 + 128 + 128
    # tiles of 4 on S=8: dense causal visits (0,0), (1,0), (1,1); MoBA top-1 only the diagonal
    assert am.dense_tile_pairs(8, True, 4, 4) == 3
    assert am.dense_tile_pairs(8, False, 4, 4) == 4
    assert am.moba_tile_pairs(8, 4, 1, True, 4, 4) == 2
    assert am.moba_tile_pairs(16, 4, 2, True, 4, 4) == 1 + 2 + 2 + 2
    # forward, S=8, D=4, bf16, 3 tile pairs of 4: Q+O 2*8*4*2 + LSE 4*8 + K/V tiles 3*2*4*4*2
    assert am.attention_bytes(1, 8, 1, 4, 2, 3, "fwd", 4, 4) == 128 + 32 + 192
    # backward: O,dO 128 + delta 32 + K,V,dK,dV 256 + 3 * (Q,dO tiles 64 + lse,delta 32 + dQ f32 RMW 128)
    assert am.attention_bytes(1, 8, 1, 4, 2, 3, "bwd", 4, 4) == 128 + 32 + 256 + 3 * (64 + 32 + 128)
    assert am.dense_bytes(2, 8, 3, 4, 2, True, "fwd+bwd", 4, 4) == 2 * 3 * (352 + 1088)
    assert am.moba_bytes(1, 8, 1, 4, 2, 4, 1, True, "fwd", 4, 4) == 128 + 32 + 2 * 64


def test_decode_model_hand_computed():
    # dense: L=16, one new token, 1 head, D=4, bf16: 16 pairs; K/V cache 2*16*4*2 + Q,O 2*4*2
    assert am.decode_flops_bytes(16, 1, 1, 1, 4, 2) == (256.0, 272.0)
    # MoBA, block 4, top-2, 2 draft tokens at 14, 15: pairs 7 + 8; gate 2*4 x 2 tokens x 4 blocks;
    # loads own block (4 tokens) + one past block; means 4 blocks x 4 x 4 bytes; Q,O 2*2*4*2
    assert am.decode_flops_bytes(16, 2, 1, 1, 4, 2, block_size=4, top_k=2) == (240.0 + 64, 128.0 + 64 + 32)
    # GQA (2 query heads on 1 KV head): the KV head loads the union (own + 2 past blocks)
    f, b = am.decode_flops_bytes(16, 1, 2, 1, 4, 2, block_size=4, top_k=2)
    assert (f, b) == (4 * 4 * 8 * 2 + 2 * 4 * 1 * 2 * 4, 2 * 12 * 4 * 2 + 4 * 4 * 4 + 2 * 2 * 4 * 2)
    # verification of several draft tokens raises the intensity
    ai = [am.intensity(*am.decode_flops_bytes(65536, n, 32, 8, 128, 2)) for n in (1, 4, 8)]
    assert ai[0] < ai[1] < ai[2]


# ----------------------------------------------------------------------------- other MoBA implementations
def _qkv(b, s, hq, hkv, d, dtype=torch.float32, grad=False):
    return [torch.randn(b, s, h, d, dtype=dtype, requires_grad=grad) for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("shape", [(2, 37, 4, 2, 8, 8, 3), (1, 50, 2, 2, 16, 7, 10), (1, 64, 3, 1, 8, 16, 1)])
def test_paper_reimpl_moba_matches_reference(shape):
    b, s, hq, hkv, d, bs, tk = shape
    q, k, v = _qkv(b, s, hq, hkv, d, grad=True)
    idx = moba.select_blocks(q, k, bs, tk)
    gate = paper_reimpl_gate(q, k, bs, tk)
    big = 1 << 30
    gate_sorted = torch.where(gate < 0, big, gate).sort(-1).values
    assert torch.equal(torch.where(gate_sorted == big, moba.PAD_INDEX, gate_sorted), idx.long())
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = moba.moba_attn_func(q64, k64, v64, bs, tk, backend="reference", block_indices=idx)
    out = paper_reimpl_moba(q, k, v, bs, tk)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), dout)
    grads = torch.autograd.grad(out, (q, k, v), dout.float())
    for g, gr in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g.double(), gr, atol=5e-5, rtol=1e-4)


def test_paper_reimpl_moba_rejects_non_causal():
    q, k, v = _qkv(1, 16, 2, 2, 4)
    with pytest.raises(NotImplementedError):
        paper_reimpl_moba(q, k, v, 4, 2, causal=False)


def test_official_package_provider_says_why_it_cannot_run(tmp_path, monkeypatch):
    from bench import _moba_impls

    monkeypatch.delenv(_moba_impls.OFFICIAL_SRC_ENV, raising=False)
    fn, reason = load_official_moba(None, "cpu")
    assert fn is None and "CUDA" in reason
    monkeypatch.setattr(_moba_impls, "flash_attn_usable", lambda device: True)  # pretend CUDA + flash-attn
    fn, reason = load_official_moba(None, "cuda")
    assert fn is None and "--official_moba_src" in reason and "top-level module `moba`" in reason
    fn, reason = load_official_moba(str(tmp_path), "cuda")
    assert fn is None and "moba_efficient.py does not exist" in reason
    (tmp_path / "moba").mkdir()
    (tmp_path / "moba" / "moba_efficient.py").write_text("import flash_attn_that_is_missing\n")
    fn, reason = load_official_moba(str(tmp_path), "cuda")
    assert fn is None and "ModuleNotFoundError" in reason
    (tmp_path / "moba" / "moba_efficient.py").write_text("def moba_attn_varlen(*a):\n    return a\n")
    fn, reason = load_official_moba(str(tmp_path), "cuda")
    assert reason is None and fn(1, 2) == (1, 2)


def _flex_or_skip():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:
        pytest.skip(f"FlexAttention not importable: {e}")


@pytest.mark.parametrize("causal", [True, False])
def test_flex_moba_block_mask_structure(causal):
    """Every allowed (query, key) pair lies in a listed block; a *full* block is allowed entirely."""
    _flex_or_skip()
    s, bs, qb = 50, 8, 16
    q, k, _ = _qkv(2, s, 4, 2, 8)
    idx = moba.select_blocks(q, k, bs, 3, causal)
    bm = moba.flex_block_mask(q, k, bs, causal=causal, block_indices=idx, q_block=qb, layout="bshd")
    nb, nq = -(-s // bs), -(-s // qb)
    # true mask (B, H, S, S) from the reference's definition
    sel = torch.zeros(2, s, 4, nb + 1, dtype=torch.bool)
    sel.scatter_(-1, torch.where(idx < 0, nb, idx.long()), True)
    allowed = sel[..., :nb][..., torch.arange(s) // bs].permute(0, 2, 1, 3)  # (B, H, S, S)
    if causal:
        allowed &= torch.ones(s, s, dtype=torch.bool).tril()

    def listed(num, ind):
        out = torch.zeros(2, 4, nq, nb, dtype=torch.bool)
        for b in range(2):
            for h in range(4):
                for i in range(nq):
                    out[b, h, i, ind[b, h, i, : num[b, h, i]].long()] = True
        return out

    partial = listed(bm.kv_num_blocks, bm.kv_indices)
    full = listed(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (partial & full).any()
    pad = torch.zeros(2, 4, nq * qb, nb * bs, dtype=torch.bool)
    pad[..., :s, :s] = allowed
    tiles = pad.view(2, 4, nq, qb, nb, bs)
    any_allowed = tiles.any(dim=(3, 5))
    assert torch.equal(any_allowed, partial | full)
    # full blocks: every (real query, real key) pair of the tile is allowed
    real = torch.zeros(nq * qb, nb * bs, dtype=torch.bool)
    real[:s, :s] = True
    all_allowed = (tiles | ~real.view(nq, qb, nb, bs)).all(dim=(3, 5))
    assert not (full & ~all_allowed).any()


@pytest.mark.parametrize("causal", [True, False])
def test_flex_moba_matches_reference(causal):
    _flex_or_skip()
    from bench._moba_impls import flex_moba

    q, k, v = _qkv(1, 40, 4, 2, 8)
    idx = moba.select_blocks(q, k, 8, 2, causal)
    ref = moba.moba_attn_func(q.double(), k.double(), v.double(), 8, 2, causal=causal, backend="reference",
                              block_indices=idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = flex_moba(q, k, v, 8, 2, causal=causal, block_indices=idx, compiled=False, q_block=16)
        except (NotImplementedError, RuntimeError) as e:
            pytest.skip(f"FlexAttention does not run on this CPU build: {e}")
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- roofline
def test_roofline_peaks_table():
    assert roofline.peaks_for("NVIDIA H100 80GB HBM3")[1:3] == (989.4e12, 3.35e12)
    assert roofline.peaks_for("NVIDIA H200")[1:3] == (989.4e12, 4.8e12)
    assert roofline.peaks_for("NVIDIA A100-SXM4-80GB")[1:3] == (312e12, 2.0e12)
    assert roofline.peaks_for("NVIDIA GeForce RTX 4090")[1:3] == (165e12, 1.0e12)
    assert roofline.peaks_for("NVIDIA H100 PCIe")[3]  # warns: table is SXM
    assert roofline.peaks_for("Some Other GPU") is None
    assert roofline.roof(1.0, 989e12, 3.35e12) == 3.35e12
    assert roofline.roof(1e4, 989e12, 3.35e12) == 989e12


def test_roofline_model_points_intensity():
    cfg = dict(batch=1, heads=1, kv_heads=1, head_dim=4, dtype="bf16", block_size=4, top_k=1, causal=True, seqlen=8)
    pts = {p["name"]: p for p in roofline.model_points(cfg, decode_queries=(1,), tile_m=4, tile_n=4)}
    moba_fwd = pts["MoBA fwd (model)"]
    assert (moba_fwd["flops"], moba_fwd["bytes"]) == (320.0, 288.0)
    dense_fwd = pts["dense fwd (model)"]
    assert (dense_fwd["flops"], dense_fwd["bytes"]) == (576.0, 352.0)
    assert am.intensity(dense_fwd["flops"], dense_fwd["bytes"]) == pytest.approx(576 / 352)
    assert {"gate (model)", "decode dense n_q=1 (model)", "decode MoBA n_q=1 (model)"} <= set(pts)


def test_roofline_plot_without_timing_data(tmp_path, capsys):
    res = roofline.main(["--out", str(tmp_path / "model.png")])
    assert (tmp_path / "model.png").read_bytes()[:4] == b"\x89PNG"
    side = json.loads((tmp_path / "model.json").read_text())
    assert side["peak_flops_per_s"] == 989.4e12 and all(p["seconds"] is None for p in side["points"])
    names = {p["name"] for p in res["points"]}
    assert {"decode MoBA n_q=4 (model)", "decode dense n_q=8 (model)", "MoBA bwd (model)"} <= names


def test_roofline_plot_with_timing_data(tmp_path):
    row = dict(provider="moba-triton", kind="moba", status="ok", mode="fwd", seqlen=8192, batch=1, heads=32,
               kv_heads=8, head_dim=128, dtype="bf16", block_size=512, top_k=3, causal=True, median_ms=2.0,
               flops_effective=am.attention_flops(am.moba_pairs(8192, 512, 3) * 32, 128), gating_ms=0.5)
    dense = dict(row, provider="flash-attn", kind="dense", median_ms=5.0,
                 flops_effective=am.attention_flops(am.dense_pairs(8192) * 32, 128), gating_ms=None)
    skipped = dict(row, provider="reference", status="ok")  # left out: not a tiled kernel
    run = {"metadata": {"device_name": "NVIDIA H100 80GB HBM3",
                        "config": dict(batch=1, heads=32, kv_heads=8, head_dim=128, dtype="bf16", block_size=512,
                                       top_k=3, causal=True, seqlens=[8192])},
           "rows": [row, dense, skipped]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    ext = {"points": [{"name": "decode MoBA n_q=4", "flops": 1e9, "bytes": 2e8, "seconds": 1e-4},
                      {"name": "decode dense n_q=4", "flops": 1e9, "bytes": 5e8, "seconds": None}]}
    (tmp_path / "decode.json").write_text(json.dumps(ext))
    res = roofline.main([str(tmp_path / "run.json"), str(tmp_path / "decode.json"), "--out", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert res["peaks"][1:] == (989.4e12, 3.35e12)
    pts = {p["name"]: p for p in res["points"]}
    assert "reference fwd" not in pts
    m = pts["moba-triton fwd"]
    assert m["achieved_flops_per_s"] == pytest.approx(row["flops_effective"] / 2e-3)
    assert m["bytes"] == am.moba_bytes(1, 8192, 32, 128, 2, 512, 3, True, "fwd")
    assert pts["gate (moba.select_blocks)"]["seconds"] == pytest.approx(5e-4)
    assert pts["decode MoBA n_q=4"]["intensity"] == pytest.approx(5.0)
    assert pts["decode dense n_q=4"]["achieved_flops_per_s"] is None


def test_roofline_rejects_bad_points(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"points": [{"name": "x", "flops": 1.0}]}))
    from moba._core.cli import CliError

    with pytest.raises(CliError, match="a point lacks bytes"):
        roofline.main([str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.png")])


def test_pairs_from_indices_in_slices():
    q = torch.randn(1, 45, 2, 8)
    k = torch.randn(1, 45, 1, 8)
    for causal in (True, False):
        idx = moba.select_blocks(q, k, block_size=8, top_k=3, causal=causal)
        whole = am.moba_pairs_from_indices(idx, 8, causal)
        parts = sum(am.moba_pairs_from_indices(idx[:, a : a + 10], 8, causal, offset=a, seqlen=45) for a in range(0, 45, 10))
        assert parts == whole


@pytest.mark.gpu
def test_attn_speed_gpu_smoke(tmp_path):
    """On a CUDA machine: every GPU provider runs or is skipped/OOM with a reason, never a crash."""
    cmd = [sys.executable, "-m", "bench.attn_speed", "--device", "cuda", "--seqlens", "1k,4k", "--heads", "4",
           "--kv-heads", "2", "--head-dim", "64", "--block-size", "512", "--top-k", "3", "--repeats", "3",
           "--providers", ",".join(p for p in __import__("attn_speed").ALL_PROVIDERS if p not in ("sdpa", "reference")),
           "--out", str(tmp_path), "--quiet"]
    proc = run_child(cmd, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "attn_speed.json").read_text())
    assert data["metadata"]["device"].startswith("cuda") and data["metadata"]["driver_version"]
    rows = {(r["provider"], r["seqlen"], r["mode"]): r for r in data["rows"]}
    assert rows[("sdpa-flash", 4096, "fwd")]["status"] == "ok"
    assert rows[("moba-torch", 4096, "fwd")]["status"] == "ok"
    assert all(r["status"] in ("ok", "skipped", "oom", "error") for r in data["rows"])
    assert all(r["reason"] for r in data["rows"] if r["status"] != "ok")


def test_attn_speed_nothing_measured_exits_nonzero_without_plots(tmp_path):
    """Every provider skipped (flash-attn and sdpa-flash need CUDA): status 1, the reasons on
    stderr, JSON/CSV recording them, and no empty plots."""
    cmd = [sys.executable, "-m", "bench.attn_speed", "--cpu", "--seqlens", "128", "--providers",
           "flash-attn,sdpa-flash", "--repeats", "1", "--out", str(tmp_path), "--quiet"]
    proc = run_child(cmd, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "nothing was measured" in proc.stderr and "flash-attn: skipped" in proc.stderr
    rows = json.loads((tmp_path / "attn_speed.json").read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and r["reason"] for r in rows)
    assert not list(tmp_path.glob("*.png"))


# ----------------------------------------------------------------------------- readable outputs (issue 17)
def test_format_tick():
    assert [format_tick(v) for v in (512, 1024, 1536, 2**20, 3 * 2**30, 1000)] == ["512", "1K", "1.5K", "1M", "3G", "1000"]
    assert [format_tick(v, 1000) for v in (1e12, 2.5e9, 989e12, 999)] == ["1T", "2.5G", "989T", "999"]
    assert [format_tick(v, None) for v in (2.5, 0.1, 1e-7, 3.2e-8, 1000, 0)] == ["2.5", "0.1", "1e-7", "3.2e-8", "1000", "0"]
    with pytest.raises(ValueError, match="units"):
        format_tick(5, 100)


def _visible_labels(ax, which):
    import matplotlib

    ax.figure.canvas.draw()
    lo, hi = sorted(getattr(ax, f"get_{which}lim")())
    axis = ax.xaxis if which == "x" else ax.yaxis
    labels = [t.label1.get_text() for t in axis.get_major_ticks() if lo * 0.999 <= t.get_loc() <= hi * 1.001]
    matplotlib.pyplot.close(ax.figure)
    return [t for t in labels if t]


def test_readable_log_axis_labels_sizes_and_losses():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([512, 8192], [2.1, 4.9])
    readable_log_axis(ax, "x", base=2, units=1024)
    readable_log_axis(ax, "y")
    assert _visible_labels(ax, "x") == ["512", "1K", "2K", "4K", "8K"]
    fig, ax = plt.subplots()
    ax.plot([1, 2], [2.1, 4.9])
    readable_log_axis(ax, "y")
    assert {"3", "4"} <= set(_visible_labels(ax, "y"))
    with pytest.raises(ValueError, match="which"):
        readable_log_axis(ax, "z")
    plt.close("all")


def test_every_plot_uses_the_one_tick_formatter():
    """One formatter (scaling_runs/plotting.py), imported by every plot: no copy, no bare log scale."""
    root = ROOT
    users = {"bench/attn_speed.py": "from scaling_runs.plotting import", "bench/roofline.py": "from scaling_runs.plotting import",
             "scaling_runs/fit.py": "from .plotting import"}
    for path, imp in users.items():
        text = (root / path).read_text()
        assert imp in text, path
        assert "set_xscale(" not in text and "set_yscale(" not in text and "Formatter(" not in text, path
    defs = [p for p in [*root.glob("bench/*.py"), *root.glob("scaling_runs/*.py"), *root.glob("moba/**/*.py")]
            if "def format_tick" in p.read_text()]
    assert [p.relative_to(root).as_posix() for p in defs] == ["scaling_runs/plotting.py"]


def test_attn_speed_reports_memory_one_way_and_labels_the_cpu_baseline_sdpa(cpu_run, tmp_path, monkeypatch):
    from bench import attn_speed

    out, stdout = cpu_run
    data = json.loads((out / "attn_speed.json").read_text())
    assert data["metadata"]["schema_version"] == 2 and "above the inputs" in data["metadata"]["peak_mem"]
    for r in data["rows"]:
        assert not [k for k in r if k.startswith("peak_mem") and k != "peak_mem_delta_mib"], r
        if r["status"] == "ok" and sys.platform.startswith("linux"):
            assert r["peak_mem_delta_mib"] is not None and r["peak_mem_delta_mib"] >= 0
    with open(out / "attn_speed.csv") as f:
        assert [c for c in next(csv.reader(f)) if "mem" in c] == ["peak_mem_delta_mib"]
    assert "vs dense SDPA" in stdout and "vs SDPA (" in stdout and "flash attention" not in stdout
    # the plots: the CPU speedups are against SDPA, and the ticks read 128, 256
    figures = capture_figures(monkeypatch)
    rows = [attn_speed.Row(**r) for r in data["rows"]]
    attn_speed.write_plots(rows, data["metadata"], tmp_path)
    speedup = next(f for f in figures if f["path"].endswith("speedup_vs_seqlen.png"))
    for ax in speedup["axes"]:
        assert "SDPA" in ax["ylabel"] and "flash" not in ax["ylabel"].lower()
        assert ax["ticks"]["x"] == ["128", "256"]
    for f in figures:
        for ax in f["axes"]:
            assert not [t for t in ax["ticks"]["x"] + ax["ticks"]["y"] if "$" in t]
    assert attn_speed.baseline_label(["flash-attn", "sdpa-flash"]) == "flash-attn / SDPA flash backend"


def _cpu_attn_speed_json(tmp_path):
    row = dict(provider="moba-torch", kind="moba", status="ok", mode="fwd", seqlen=2048, batch=1, heads=4,
               kv_heads=2, head_dim=64, dtype="fp32", block_size=64, top_k=3, causal=True, median_ms=50.0,
               flops_effective=am.attention_flops(am.moba_pairs(2048, 64, 3) * 4, 64), gating_ms=5.0)
    rows = [row, dict(row, mode="bwd", median_ms=90.0), dict(row, provider="sdpa", kind="dense", median_ms=40.0,
                                                            gating_ms=None)]
    run = {"metadata": {"device_name": "CPU AMD EPYC 7B13", "config": dict(
        batch=1, heads=4, kv_heads=2, head_dim=64, dtype="fp32", block_size=64, top_k=3, causal=True, seqlens=[2048])},
        "rows": rows}
    (tmp_path / "cpu.json").write_text(json.dumps(run))
    return tmp_path / "cpu.json"


def test_roofline_cpu_ceilings_come_from_the_table_unless_measured(tmp_path, monkeypatch):
    path = _cpu_attn_speed_json(tmp_path)
    calls = []
    monkeypatch.setattr(roofline, "measure_peaks", lambda *a: calls.append(a) or ("CPU (measured)", 1e11, 1e10))
    res = roofline.main([str(path), "--out", str(tmp_path / "a.png")])
    assert calls == [] and res["peaks"] == roofline.peaks_for("CPU x")[:3]
    assert res["peaks"][1:] == (344e9, 9.39e9)
    assert "fixed" in json.loads((tmp_path / "a.json").read_text())["note"]
    res = roofline.main([str(path), "--measure", "--out", str(tmp_path / "b.png")])
    assert len(calls) == 1 and res["peaks"] == ("CPU (measured)", 1e11, 1e10)


def test_roofline_legend_is_grouped(tmp_path, monkeypatch):
    from matplotlib.legend import Legend

    figures = capture_figures(monkeypatch)
    res = roofline.main([str(_cpu_attn_speed_json(tmp_path)), "--out", str(tmp_path / "r.png")])
    ax = figures[-1]["axes"][0]["ax"]
    legends = [c for c in ax.get_children() if isinstance(c, Legend)]
    assert sorted(lg.get_title().get_text() for lg in legends) == ["kernel", "mode"]
    kernel = next(lg for lg in legends if lg.get_title().get_text() == "kernel")
    mode = next(lg for lg in legends if lg.get_title().get_text() == "mode")
    families = {p["family"] for p in res["points"]}
    assert len({p["name"] for p in res["points"]}) > len(families)  # fewer entries than point series
    assert len(kernel.get_texts()) == len(families) + 1  # + the roof
    assert {"moba-torch", "sdpa", "MoBA (model)"} <= {t.get_text() for t in kernel.get_texts()}
    assert {"fwd", "bwd", "n_q=4", "filled: measured"} <= {t.get_text() for t in mode.get_texts()}
    assert figures[-1]["axes"][0]["ticks"]["y"] and not [t for t in figures[-1]["axes"][0]["ticks"]["y"] if "$" in t]


def test_git_state_paths_are_relative_to_the_repository_root(tmp_path):
    """git runs in bench/; a path such as "triton_kernels" must still mean <root>/triton_kernels
    (it used to match nothing, so kernel reports never recorded uncommitted kernel edits)."""
    from bench._common import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "kernels" / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert git_state("kernels", cwd=tmp_path / "bench")["git_dirty"] is False
    (tmp_path / "kernels" / "a.py").write_text("x = 2\n")
    assert git_state("kernels", cwd=tmp_path / "bench")["git_dirty"] is True
    assert git_state("bench", cwd=tmp_path / "bench")["git_dirty"] is False
    assert git_state(cwd=tmp_path / "bench")["git_dirty"] is True
