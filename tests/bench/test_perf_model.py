"""bench/perf_model.py on hand-computed cases (the model never times anything)."""

from __future__ import annotations

import dataclasses
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


def test_union_products_by_hand(monkeypatch):
    monkeypatch.setattr(pm, "UNION_FACTOR", 2.0)
    # S=128, block 64, top-2, 64-row tiles: tile 0 sees its own block (1); tile 1 one past block
    # (min(1 candidate, 1 x 2)) + its own block (1).
    s = pm.Shape(128, heads=1, kv_heads=1, head_dim=64, block_size=64, top_k=2)
    assert pm._union_products(s) == 3.0
    # block 256: tiles at offsets 0, 64, 128, 192 of block 0 see 1/4, 2/4, 3/4, 4/4 of it
    s = pm.Shape(256, heads=1, kv_heads=1, head_dim=64, block_size=256, top_k=3)
    assert pm._union_products(s) == pytest.approx(0.25 + 0.5 + 0.75 + 1.0)
    # D=128: 128-row tiles. S=256, block 64, top-2: tile 0 covers blocks 0-1 (own block, whole:
    # min(64, 0 + 128) / 64 = 1); tile 1 (rows 128-255): min(2 past blocks, 1 x 2) + 1.
    s = pm.Shape(256, heads=1, kv_heads=1, head_dim=128, block_size=64, top_k=2)
    assert pm._union_products(s) == 4.0
    assert pm.union_attention(s)[0].programs == 2  # ceil(256 / 128) tiles x 1 head


def test_efficiencies_stay_under_the_gemm_ceiling():
    effs = [*pm.MAIN_EFF.values(), *pm.TARGET_EFF.values(), pm.GATE_TC_EFF]
    effs += [v for d in pm.DENSE_EFF.values() for v in d.values()]
    assert all(0 < e <= pm.MMA_FRACTION for e in effs)
    # main's spill-free tiles are guessed at or below FA2-class; the target is FA2-class
    assert all(pm.MAIN_EFF[k] <= pm.TARGET_EFF[k] <= pm.DENSE_EFF[("FA2", 128)]["fwd"] for k in pm.MAIN_EFF)


def test_sparser_is_faster_and_dense_limit_is_consistent():
    a = pm.design(pm.Shape(32768, block_size=512, top_k=3), H200, "target")
    b = pm.design(pm.Shape(131072, block_size=512, top_k=3), H200, "target")
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


# ----------------------------------------------------------------------------- gather path (owner computes)
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


def test_gather_segments_by_hand():
    # S=128, 2 query heads / 1 KV head, block 64, top-2, 64-token super-tiles (2 programs):
    # tile 0: 128 rows, own block only -> 2 chunks; tile 1: own block 2 chunks + 128 rows
    # picking the one past block -> 1 segment of 128 rows = 2 chunks. 6 chunks, 384 rows.
    s = pm.Shape(128, heads=2, kv_heads=1, head_dim=64, block_size=64, top_k=2)
    assert pm.gather_segments(s) == (384.0, 6.0, 2)
    assert pm.gather_segments(s, uncorrelated=True) == (384.0, 6.0, 2)




# ----------------------------------------------------------------------------- main's gate, glue, dk/dv, memory
def test_gate_counts_past_blocks_in_padded_chunks_one_half_product_and_the_recheck():
    # S=128, block 16 (8 blocks), 1 head, D=16: GATE_TILES[16] = (64 rows, 32 blocks per chunk).
    # Tile 0 (rows 0-63): last row 63 is in block 3 -> 3 candidates -> one chunk of 32;
    # tile 1: last row 127 in block 7 -> 7 candidates -> one chunk of 32.
    s = pm.Shape(128, heads=1, kv_heads=1, head_dim=16, block_size=16, top_k=3)
    assert pm.gate_chunks(s) == (2, 64)
    means, gate = pm.gate_kernels(s)
    one_product = 2 * 64 * 64 * 16  # 2 x BLOCK_M x padded blocks x D
    # one bf16 product, plus 5% of the tiles re-scored by two TF32 products at half the peak
    assert gate.flops == pytest.approx(one_product * (1 + 0.05 * 2 * 2))
    assert gate.mma_eff == pytest.approx(pm.GATE_TC_EFF)
    # top-3: sort width 8 -> 7 kept pairs + the centre re-checked per row: 2 x 64 x 8 x 16 per program
    assert pm.gate_kept(3) == 7 and pm.gate_kept(8) == 15 and pm.gate_kept(2) == 7
    assert gate.fma_flops == 2 * 64 * 64 * pm.TOPK_OPS_PER_SCORE + 2 * (2 * 64 * 8 * 16)
    assert means.hbm_bytes == 128 * 16 * 2 + 8 * 16 * 4
    # D=128 walks 16 blocks per chunk: 3 -> 16, 7 -> 16
    assert pm.gate_chunks(pm.Shape(128, heads=2, kv_heads=1, head_dim=128, block_size=16, top_k=3)) == (4, 64)
    # the 16-wide selection (top-8) at D=128 holds one program fewer per SM (static report)
    wide = pm.gate_kernels(pm.Shape(4096, block_size=128, top_k=8))[1]
    assert wide.blocks_per_sm == pm.BLOCKS_PER_SM[128]["gate"] - 1
    assert pm.gate_kernels(s, pm.TARGET)[1].flops == gate.flops  # the target's gate is main's


def test_no_design_syncs_auto_launches_both_sides():
    s = pm.Shape(32768)
    syncs = {name: sum(k.syncs for k in pm.design_kernels(s, name)[0]) for name in pm.DESIGNS}
    assert syncs == {"main-union": 0, "main-gather": 0, "main-auto": 0, "target": 0}
    # "auto": the unchosen side's forward and dq grids run empty programs (one launch each)
    for uncorrelated in (False, True):
        kernels, _, dec = pm.design_kernels(s, "main-auto", uncorrelated)
        empty = [k for k in kernels if k.empty_programs]
        assert len(empty) == 2 and all(k.flops == 0 and k.launches == 1 for k in empty)
        assert all(("gather" in k.name) == (dec == "union") for k in empty)
        assert not any(k.empty_programs for k in pm.design_kernels(s, f"main-{dec}", uncorrelated)[0])
    # their time: a launch + one EMPTY_WAVE_US per wave of empty programs
    k = pm.Kernel("x", "fwd", programs=1000, blocks_per_sm=2, empty_programs=1000, hbm_bytes=0)
    assert pm.kernel_seconds(k, H200) == pytest.approx((pm.LAUNCH_US + 4 * pm.EMPTY_WAVE_US) * 1e-6)  # 132 SMs x 2
    with pytest.raises(ValueError, match="design"):
        pm.design_kernels(s, "today-union")


def test_dkdv_split_longest_program_by_hand():
    # 512K, Hq=32/Hkv=8, block 512, top-3: mean = 512K x 32 x 3 / (1024 x 8) = 6144 rows per pair;
    # split = max(4096, 4 x 6144 rounded up to 16 rows per step) = 24576; the sink (every query
    # of a KV head: 512K x 4 rows) splits into ceil(2097152 / 24576) = 86 chunks.
    s = pm.Shape(512 * 1024)
    assert pm.dkdv_split(s) == (24576, 2097152, 86)
    dkdv, reduce = pm.dkdv_kernels(s)
    assert dkdv.serial_flops == 4 * 2 * 24576 * 128 * 128  # 4 matmuls over 12288 rows x 128 keys x D
    assert dkdv.programs == (1024 * 8 + 86 * 8 - 8) * 4  # (pairs + extra chunks) x 4 key tiles
    assert reduce.programs == 8 * 4
    # partial buffers at dkdv_work's static bound: min(P + R // split, 2 x (R // split))
    # R = 512K x 32 x 3 = 50331648 rows, R // split = 2048
    assert pm.dkdv_parts_bound(s) == min(8192 + 2048, 2 * 2048)


def test_memory_delta_temporaries_by_hand():
    # r = 4096 x 4 = 16384 rows, D=64: main's delta is the fused kernel (no temporaries, dO and O
    # read once); the eager delta it replaced held dO.float(), O.float() and their product
    s = pm.Shape(4096, heads=4, kv_heads=1, head_dim=64, block_size=512, top_k=3)
    r, d = 16384, 64
    assert pm.dkdv_split(s)[0] == 24576 and pm.dkdv_parts_bound(s) == 4  # min(8 + 2, 2 x 2)
    parts = 4 * 512 * 64 * 4 * 2
    eager = dataclasses.replace(pm.MAIN, name="eager-delta", fused_delta=False)
    main, target = pm.memory(s, "union", pm.MAIN), pm.memory(s, "union", pm.TARGET)
    assert main == target
    assert pm.memory(s, "union", eager)["mem_fwd_bwd"] - main["mem_fwd_bwd"] == 3 * r * d * 4 - parts
    fused = pm.delta_kernel(s)
    assert (fused.name, fused.hbm_bytes, fused.programs, fused.launches) == ("_bwd_delta_kernel", r * (2 * d * 2 + 4),
                                                                              r // 32, 1)
    assert pm.delta_kernel(s, eager).hbm_bytes == r * (2 * d * 2 + 28 * d + 4)
    # forward: the gather path's fp32 row state (4D + 4 bytes per row, no per-slot term) is its
    # peak (> 5 int64 build temporaries per slot); the union path's, 3 int64 temporaries per
    # slot; the gather selection adds 3 int32 per segment (64 programs x 8 blocks).
    nnz = r * 3
    assert pm.memory(s, "gather")["mem_fwd"] - pm.memory(s, "union")["mem_fwd"] == r * (4 * d + 4) - nnz * 24 + 3 * 512 * 4


def test_auto_rule_uses_the_union_tile_rows():
    s = pm.Shape(512 * 1024)
    union_rows = pm._union_products(s) * 32 * 128
    gather_rows = pm.gather_segments(s)[0]
    assert pm.decomposition(s) == ("union" if union_rows <= pm.UNION_MARGIN * gather_rows else "gather")
    assert pm.decomposition(s, uncorrelated=True) == "gather"
    # on random selections the union path approaches dense attention; the gather path does not
    union = pm.design(s, H200, "main-union", uncorrelated=True)["fwd_bwd_s"]
    assert pm.design(s, H200, "main-auto", uncorrelated=True)["fwd_bwd_s"] < union / 5


def test_target_is_faster_and_smaller_than_main_at_the_issue_shapes():
    # the target differs from main by its tiles' efficiency only (the fused delta is main's)
    assert dataclasses.replace(pm.TARGET, name=pm.MAIN.name, eff=pm.MAIN_EFF) == pm.MAIN
    for seqlen, bs, k in ((128 * 1024, 512, 3), (512 * 1024, 128, 8)):
        s = pm.Shape(seqlen, block_size=bs, top_k=k)
        main, target = pm.design(s, H200, "main-auto"), pm.design(s, H200, "target")
        assert target["fwd_bwd_s"] < main["fwd_bwd_s"] and target["gate_s"] == pytest.approx(main["gate_s"])
        assert target["mem_fwd_bwd"] == main["mem_fwd_bwd"]  # only the tiles' efficiency differs
        assert not any("merge" in kk["name"] for kk in main["kernels"])
