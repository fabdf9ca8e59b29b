"""bench/perf_model.py on hand-computed cases (the model never times anything)."""

from __future__ import annotations

import json
import math

import pytest

from bench import _attn_model as am
from bench import perf_model as pm

H200 = pm.GPUS["H200"]


def test_tail_efficiency_counts_the_last_wave():
    assert pm.tail_efficiency(132, 132) == 1.0
    assert pm.tail_efficiency(264, 132) == 1.0
    assert pm.tail_efficiency(133, 132) == pytest.approx(133 / 264)  # 2 waves, the second with 1 program
    assert pm.tail_efficiency(3, 132, blocks_per_sm=2) == pytest.approx(3 / 264)
    assert pm.tail_efficiency(0, 132) == 1.0


def test_kernel_seconds_is_the_larger_of_compute_and_memory_plus_launch():
    gpu = pm.GPU("toy", sms=1, bf16_tflops=1.0, fp32_tflops=1.0, hbm_tbps=1.0, mem_gib=1)
    launch = pm.LAUNCH_US * 1e-6
    # 1e12 FLOPs at 1 TFLOP/s x 0.5 efficiency = 2 s; 1e11 bytes at 1 TB/s x HBM_FRACTION < 2 s
    k = pm.Kernel("k", "fwd", flops=1e12, hbm_bytes=1e11, programs=1, mma_eff=0.5)
    assert pm.kernel_seconds(k, gpu) == pytest.approx(2.0 + launch)
    k = pm.Kernel("k", "fwd", flops=1e9, hbm_bytes=9e12, programs=1, mma_eff=0.5)
    assert pm.kernel_seconds(k, gpu) == pytest.approx(9e12 / (1e12 * pm.HBM_FRACTION) + launch)
    # 2 programs on 1 SM slot: two waves, both full: no tail penalty
    k = pm.Kernel("k", "fwd", flops=1e12, programs=2, mma_eff=1.0)
    assert pm.kernel_seconds(k, gpu) == pytest.approx(1.0 + launch)
    # the longest program runs on one SM: 3e12 serial FLOPs at (1 TFLOP/s / 1 SM) x 1.0 = 3 s
    k = pm.Kernel("k", "fwd", flops=1e12, programs=1, mma_eff=1.0, serial_flops=3e12)
    assert pm.kernel_seconds(k, gpu) == pytest.approx(3.0 + launch)


def test_dense_flash_counts_causal_pairs():
    s = pm.Shape(1024, heads=2, kv_heads=1, head_dim=128)
    dn = pm.dense_flash(s, H200, "FA2")
    flops_fwd = 4 * 128 * (1024 * 1025 // 2) * 2
    assert dn["flops_fwd"] == flops_fwd
    assert dn["fwd_s"] == pytest.approx(flops_fwd / (989.4e12 * pm.DENSE_EFF[("FA2", 128)]["fwd"]))
    assert dn["bwd_s"] == pytest.approx(2.5 * flops_fwd / (989.4e12 * pm.DENSE_EFF[("FA2", 128)]["bwd"]))
    # out (bf16) + lse (fp32): 1024 tokens x 2 heads
    assert dn["mem_fwd"] == 1024 * 2 * (128 * 2 + 4)
    assert pm.dense_flash(s, H200, "FA3")["fwd_s"] < dn["fwd_s"]


def test_attended_pairs_reuse_attn_model():
    s = pm.Shape(4096, heads=4, kv_heads=2, head_dim=64, block_size=512, top_k=3, batch=2)
    assert pm.attended_pairs(s) == am.moba_pairs(4096, 512, 3, True) * 4 * 2


def test_gather_rows_round_up_per_pair():
    # 4096 tokens x 4 heads x 3 slots over 8 blocks = 6144 rows per (block, KV head), a multiple of 64
    s = pm.Shape(4096, heads=4, kv_heads=1, head_dim=64, block_size=512, top_k=3)
    assert pm._gather_rows(s) == 6144 * 8
    # 100 tokens x 1 head x 1 slot over 1 block: 100 rows -> 128
    s = pm.Shape(100, heads=1, kv_heads=1, head_dim=64, block_size=512, top_k=1)
    assert pm._gather_rows(s) == 128


def test_union_products_by_hand(monkeypatch):
    monkeypatch.setattr(pm, "UNION_FACTOR", 2.0)
    # S=128, block 64, top-2, 64-row tiles: tile 0 sees its own block (1); tile 1 one past block
    # (min(1 candidate, 1 x 2)) + its own block (1).
    s = pm.Shape(128, heads=1, kv_heads=1, head_dim=64, block_size=64, top_k=2)
    assert pm._union_products(s) == 3.0
    # block 256: tiles at offsets 0, 64, 128, 192 of block 0 see 1/4, 2/4, 3/4, 4/4 of it
    s = pm.Shape(256, heads=1, kv_heads=1, head_dim=64, block_size=256, top_k=3)
    assert pm._union_products(s) == pytest.approx(0.25 + 0.5 + 0.75 + 1.0)


def test_today_gate_fma_passes_over_every_block():
    # S=128, block 16 -> 8 blocks padded to 32; top-3 -> 2 passes; 2 tiles of 64 rows, 1 head, D=16
    s = pm.Shape(128, heads=1, kv_heads=1, head_dim=16, block_size=16, top_k=3)
    means, gate = pm.today_gate(s)
    assert gate.fma_flops == 2 * 2 * 64 * 32 * 16 * 2
    assert gate.programs == 2
    assert means.hbm_bytes == 128 * 16 * 2 + 8 * 16 * 4


def test_gather_memory_holds_the_partials():
    s = pm.Shape(8192, heads=4, kv_heads=4, head_dim=64, block_size=512, top_k=3)
    nnz = 8192 * 4 * 3
    gather = pm.memory_today(s, "gather")["mem_fwd"]
    union = pm.memory_today(s, "union")["mem_fwd"]
    assert gather - union >= nnz * (4 * 64 + 4)  # one float32 (out, lse) partial per (row, slot)
    assert pm.memory_redesign(s)["mem_fwd"] < union


def test_efficiencies_stay_under_the_gemm_ceiling():
    effs = [*pm.TODAY_EFF.values(), *pm.REDESIGN_EFF.values(), pm.GATE_TC_EFF]
    effs += [v for d in pm.DENSE_EFF.values() for v in d.values()]
    assert all(0 < e <= pm.MMA_FRACTION for e in effs)


def test_sparser_is_faster_and_dense_limit_is_consistent():
    a = pm.design(pm.Shape(32768, block_size=512, top_k=3), H200, "redesign")
    b = pm.design(pm.Shape(131072, block_size=512, top_k=3), H200, "redesign")
    ratio = b["fwd_bwd_s"] / a["fwd_bwd_s"]
    assert 2 < ratio < 8  # roughly linear in S at fixed block / top-k (quadratic gate term is small)
    for name in pm.DESIGNS:
        m = pm.design(pm.Shape(32768), H200, name)
        assert m["fwd_s"] > 0 and 0 <= m["gate_share_fwd"] <= 1 and m["mem_fwd_bwd"] >= m["mem_fwd"]


def test_main_prints_modelled_labels_and_writes_json(tmp_path, capsys):
    out = tmp_path / "model.json"
    rows = pm.main(["--seqlens", "32k", "--settings", "512/3", "--json", str(out)])
    text = capsys.readouterr().out
    assert "MODELLED" in text and "modelled" in text
    assert len(rows) == len(pm.DESIGNS)
    data = json.loads(out.read_text())
    assert data["modelled"] is True and data["assumptions"]["mma_fraction"] == pm.MMA_FRACTION
    assert all(r["modelled"] for r in data["rows"])
    assert all(math.isfinite(r["speedup_fwd_bwd_vs_FA2"]) for r in data["rows"])


# ----------------------------------------------------------------------------- owner-computes gather (issue 14, item 2)
def test_expected_distinct_by_hand():
    assert pm.expected_distinct(1, 5) == pytest.approx(1.0)
    assert pm.expected_distinct(2, 1) == pytest.approx(1.0)
    assert pm.expected_distinct(4, 2) == pytest.approx(4 * (1 - (3 / 4) ** 2))  # 1.75
    assert pm.expected_distinct(0, 3) == 0.0


def test_gather_tile_follows_the_launcher_rule():
    from moba.triton_kernels import attention

    # 1024 tokens, 8 KV heads: 64-token tiles give 16 x 8 = 128 programs <= 1024
    assert pm.gather_tile(pm.Shape(1024, kv_heads=8)) == 64
    # 512K tokens: 4096-token tiles give 128 x 8 = 1024 programs
    assert pm.gather_tile(pm.Shape(512 * 1024, kv_heads=8)) == 4096
    assert (pm.GATHER_TILE_RANGE, pm.GATHER_PROGRAMS) == (attention.GATHER_TILE_RANGE, attention.GATHER_PROGRAMS)
    assert pm.UNION_MARGIN == attention.UNION_MARGIN
    for s in (1000, 70_000, 512 * 1024):
        assert pm.gather_tile(pm.Shape(s, kv_heads=8)) == attention.gather_tile(s, 8)


def test_owner_segments_by_hand():
    # S=128, 2 query heads / 1 KV head, block 64, top-2, 64-token super-tiles (2 programs):
    # tile 0: 128 rows, own block only -> 2 chunks; tile 1: own block 2 chunks + 128 rows
    # picking the one past block -> 1 segment of 128 rows = 2 chunks. 6 chunks, 384 rows.
    s = pm.Shape(128, heads=2, kv_heads=1, head_dim=64, block_size=64, top_k=2)
    assert pm._owner_segments(s) == (384.0, 6.0, 2)
    assert pm._owner_segments(s, uncorrelated=True) == (384.0, 6.0, 2)


def test_owner_memory_by_hand():
    # r = 256 rows, 2 slots (nnz 512), D = 64 bf16; 2 programs x 2 blocks = 4 segments
    s = pm.Shape(128, heads=2, kv_heads=1, head_dim=64, block_size=64, top_k=2)
    out_lse, idx, sel = 256 * (128 + 4), 256 * 2 * 8, 512 * 4 + 3 * 4 * 4
    state = 256 * (4 * 64 + 4)  # fp32 output sum + softmax sum per row: no per-slot term
    fwd = out_lse + idx + sel + max(512 * 40, state)
    bwd = out_lse + idx + sel + 256 * 128 + 2 * 128 * 64 * 2 + 256 * 4 + 256 * 64 * 4
    assert pm.memory_owner(s, "gather") == dict(mem_fwd=fwd, mem_fwd_bwd=max(fwd, bwd))


def test_owner_gather_beats_per_slot_partials_at_the_targets():
    """Modelled: no merge pass and no per-slot partials: faster and within 1.2x dense memory."""
    for seqlen, bs, k in ((128 * 1024, 512, 3), (512 * 1024, 512, 3), (512 * 1024, 128, 8)):
        s = pm.Shape(seqlen, block_size=bs, top_k=k)
        before, after = pm.design(s, H200, "today-gather"), pm.design(s, H200, "owner-gather")
        assert after["fwd_bwd_s"] < before["fwd_bwd_s"]
        dense = pm.dense_flash(s, H200, "FA2")["mem_fwd_bwd"]
        assert after["mem_fwd_bwd"] <= 1.2 * dense < before["mem_fwd_bwd"]
        assert not any("merge" in kk["name"] or "sum (PyTorch)" in kk["name"] for kk in after["kernels"])


def test_owner_auto_picks_union_on_correlated_and_gather_on_random_selections():
    s = pm.Shape(512 * 1024)
    assert pm.owner_decomposition(s) == "union"
    assert pm.owner_decomposition(s, uncorrelated=True) == "gather"
    # on random selections the union path approaches dense attention; the gather path does not
    union = pm.design(s, H200, "today-union", uncorrelated=True)["fwd_bwd_s"]
    assert pm.design(s, H200, "owner-auto", uncorrelated=True)["fwd_bwd_s"] < union / 5
