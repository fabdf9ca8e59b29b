"""bench/kernel_report.py: every kernel as launched compiles for sm_90 and sm_80, and the static rules.

The report runs once (``--quick --head_dims 64,128``: Hq=32/Hkv=8, bf16, block 512/top-3 at
D = 64 and 128, which launches every kernel) in a subprocess without TRITON_INTERPRET, shared by the pytest-xdist workers
through a file lock; Triton's cache and the report's analysis cache make reruns take seconds.

Static rules on sm_90 (the H100/H200 target; docs/design.md section 3): the gate and attention
kernels neither spill nor use local memory (LDL/STL), and every matmul of the attention
kernels (bf16/fp16 operands) is a wgmma, and their main loops are software-pipelined (K/V, or
q/dO for dk/dv, in multi-buffered shared tiles filled by cp.async or TMA while the previous step
computes; ``kernel_report.pipelining`` reads it from the TTGIR). A kernel that breaks a rule goes in ``KNOWN_FAILING``
(``xfail(strict=True)``, the reason quoting its numbers): the test turns red the day it is
fixed, and its marker must go. None does today (triton 3.9.0;
bench/results/kernel-report-tiles-2026-12-03.json).

Also here: the report's parsing on hand-made ptxas / cuobjdump / SASS snippets, and the size
limits of ``triton_kernels/attention.py``'s ``_check_inputs`` (issue 14, item 6).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from bench import kernel_report as kr
from tests._helpers import ROOT
from tests._subprocess import run_child

BENCH = ROOT / "bench"

QUICK_KERNELS = {
    "_block_mean_kernel", "_gate_topk_kernel", "_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel",
    "_fwd_gather_kernel", "_bwd_dq_gather_kernel", "_dkdv_reduce_kernel", "_bwd_delta_kernel",
    "_moba_decode_split_kernel", "_moba_decode_merge_kernel",
}
COMMITTED = BENCH / "results" / "kernel-report-main-2026-12-03.json"


@pytest.fixture(scope="session")
def report(tmp_path_factory) -> dict:
    """The --quick report, computed once per test session (xdist workers share it)."""
    import triton
    from filelock import FileLock

    if getattr(getattr(getattr(triton, "knobs", None), "runtime", None), "jit_cache_hook", "missing") == "missing":
        pytest.skip(f"kernel_report captures launches through triton.knobs.runtime.jit_cache_hook "
                    f"(Triton >= 3.4), not in triton {triton.__version__}")
    base = tmp_path_factory.getbasetemp()
    # under xdist every worker has its own basetemp inside the session's: share the parent
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "kernel_report_quick.json"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = run_child(
                [sys.executable, "-m", "bench.kernel_report", "--quick", "--head_dims", "64,128", "--jobs", "2",
                 "--json", str(path)],
                cwd=ROOT, env=env,
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(path.read_text())


def _rows(report: dict, kernel: str, cc: int) -> list[dict]:
    """Every specialisation of ``kernel`` on sm_``cc`` (e.g. the explicit and the "auto" one)."""
    rows = [r for r in report["rows"] if r["kernel"] == kernel and r["cc"] == cc]
    assert rows, f"{kernel} not in the report for sm_{cc}"
    return rows


def _row(report: dict, kernel: str, cc: int, head_dim: int = 128) -> dict:
    """The explicit-decomposition specialisation (AUTO false or absent) at ``head_dim``."""
    return next(r for r in _rows(report, kernel, cc)
                if not r["constexprs"].get("AUTO") and r["constexprs"].get("HEAD_DIM", head_dim) == head_dim)


# ----------------------------------------------------------------------------- compile + limits
@pytest.mark.parametrize("cc", [90, 80])
def test_every_kernel_compiles(report, cc):
    rows = [r for r in report["rows"] if r["cc"] == cc]
    assert {r["kernel"] for r in rows} == QUICK_KERNELS
    errors = [f"{r['kernel']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("cc", [90, 80])
def test_shared_memory_within_limits(report, cc):
    limit = {90: 228 * 1024, 80: 164 * 1024}[cc]
    assert kr.SHARED_LIMIT[cc] <= limit
    too_big = [f"{r['kernel']}: {r['shared_bytes']} B" for r in report["rows"]
               if r["cc"] == cc and r["shared_bytes"] > kr.SHARED_LIMIT[cc]]
    assert not too_big, too_big
    assert all(r["shared_ok"] and r["blocks_per_sm"] >= 1 for r in report["rows"] if r["cc"] == cc)


def test_capture_is_the_real_specialisation(report):
    """What the launchers pass, not the config tables: Triton's own specialisation (integers
    equal to 1 become constants) and the launch-time choices (top-3 -> a sort width of 8: 2 picks, the own block, 5 more kept by the first pass)."""
    gate = _row(report, "_gate_topk_kernel", 90)
    assert gate["constexprs"]["SORT_WIDTH"] == 8 and gate["constexprs"]["causal"] == 1
    fwd = _row(report, "_fwd_kernel", 90)
    # causal == 1 is specialised into a constant by Triton at launch; the config tables do not say so
    assert fwd["constexprs"] == {"causal": 1, "BIG": 1 << 30, "HEAD_DIM": 128, "BLOCK_M": 128, "BLOCK_N": 32,
                                "USE_TMA": True, "AUTO": False}
    assert fwd["dtype"] == "bf16" and fwd["num_warps"] == 8 and fwd["num_stages"] == 3
    dkdv = _row(report, "_bwd_dkdv_kernel", 90)
    assert len(dkdv["used_by"]) == 3  # the union, gather and auto backward launch the same dk/dv kernel
    # "auto" launches both sides' forward and dq kernels in their AUTO=True specialisation
    for kernel in ("_fwd_kernel", "_bwd_dq_kernel", "_fwd_gather_kernel", "_bwd_dq_gather_kernel"):
        autos = [r for r in _rows(report, kernel, 90) if r["constexprs"].get("AUTO") and r["constexprs"]["HEAD_DIM"] == 128]
        assert len(autos) == 1 and all(u.endswith("-auto") for u in autos[0]["used_by"]), kernel
    assert all(len(r["used_by"]) >= 1 for r in report["rows"])


# ----------------------------------------------------------------------------- static rules (sm_90)
_SPILLS = "spills"
_LOCAL = "local memory"
_WGMMA = "wgmma"
_PIPELINED = "pipelined"

#: Rules broken today (triton 3.9.0, sm_90, the --quick shape): (kernel, rule) -> why. Empty
#: since the attention tiles were retuned (issue 14, item 3; bench/results/kernel-report-tiles-2026-12-03.json).
KNOWN_FAILING: dict[tuple[str, str], str] = {}


def _rule_params():
    params = []
    for kernel in kr.GATE_KERNELS + kr.ATTENTION_KERNELS + kr.ATTENTION_HELPER_KERNELS:
        rules = [_SPILLS, _LOCAL] + ([_WGMMA, _PIPELINED] if kernel in kr.ATTENTION_KERNELS else [])
        for rule in rules:
            reason = KNOWN_FAILING.get((kernel, rule))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(kernel, rule, marks=marks, id=f"{kernel}-{rule.replace(' ', '-')}"))
    return params


@pytest.mark.parametrize(("kernel", "rule"), _rule_params())
def test_static_rule_sm90(report, kernel, rule):
    for r in _rows(report, kernel, 90):  # explicit and "auto" specialisations alike
        assert "error" not in r, r.get("error")
        if rule == _SPILLS:
            assert r["spill_bytes"] == 0, f"{kernel}: {r['spill_store_bytes']} B spill stores, {r['spill_load_bytes']} B loads"
        elif rule == _LOCAL:
            assert r["local_mem_instr"] == 0, f"{kernel}: {r['LDL']} LDL + {r['STL']} STL"
        elif rule == _PIPELINED:
            # the main loop's two streamed operands (K and V; q and dO for dk/dv) multi-buffered,
            # at least two deep, filled asynchronously (cp.async or TMA) inside the loop
            assert r["pipelined"] and r["pipeline_depth"] >= 2 and r["pipelined_tiles"] >= 2, (
                f"{kernel}: not software-pipelined ({kr.pipelined_cell(r)}, num_stages={r['num_stages']})")
        else:
            assert r["dots"] > 0 and r["wgmma_dots"] == r["dots"], f"{kernel}: {r['wgmma_dots']}/{r['dots']} matmuls on wgmma"
            assert r["HGMMA"] > 0


def _triton_minor() -> str:
    import triton
    from moba.triton_kernels.versions import triton_minor

    return triton_minor(triton.__version__)


#: sm_80 spills per Triton release (``make kernel-matrix``): (release, kernel) -> why.
KNOWN_FAILING_SM80: dict[tuple[str, str], str] = {
    ("3.6", "_bwd_dq_kernel"): "triton 3.6: plain dq at D=128 (128, 32, 8, 1) spills 12 B on sm_80 (255 registers), "
                               "as before the pipelining (bench/results/kernel-report-pipelined-triton3.6-2026-12-07.json)",
}


@pytest.mark.parametrize("kernel", [
    pytest.param(k, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILING_SM80[(_triton_minor(), k)])]
                 if (_triton_minor(), k) in KNOWN_FAILING_SM80 else [])
    for k in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")])
def test_attention_tiles_do_not_spill_on_sm80(report, kernel):
    """The union and dk/dv tiles are chosen to fit sm_80 (A100) too: no spills, no LDL/STL."""
    for r in _rows(report, kernel, 80):
        assert r["spill_bytes"] == 0 and r["local_mem_instr"] == 0, (
            f"{kernel} on sm_80: {r['spill_bytes']} B spills, {r['local_mem_instr']} LDL/STL at {r['regs']} registers")


def test_known_failures_name_real_kernels():
    kernels = set(kr.GATE_KERNELS + kr.ATTENTION_KERNELS + kr.ATTENTION_HELPER_KERNELS)
    assert {k for k, _ in KNOWN_FAILING} <= kernels


# ----------------------------------------------------------------------------- parsing
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_bwd_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for _bwd_dkdv_kernel
    80 bytes stack frame, 84 bytes spill stores, 76 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 80 bytes cumulative stack size, 680 bytes cmem[0]
ptxas info    : Compile time = 1234.5 ms
"""

RES_USAGE = """\

Resource usage:
 Common:
  GLOBAL:0
 Function _fwd_kernel:
  REG:255 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """\
        code for sm_90a
                Function : _fwd_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                  /* 0x00000a00ff017b82 */
        /*0010*/                   STL [R1+0x10], R4 ;                                     /* 0x0000100401007387 */
        /*0020*/              @!P0 LDL.64 R6, [R1+0x10] ;                                  /* 0x0000100001068983 */
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;      /* 0x00e00004181879f0 */
        /*0040*/               @P1 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;          /* 0x00e00008181879f0 */
        /*0050*/                   UTMALDG.2D [UR8], [UR4] ;                               /* 0x00000008040075b4 */
        /*0060*/              @UP0 UBLKCP.S.G [UR4], [UR6], UR8 ;                          /* 0x00000004060073ba */
        /*0070*/                   FFMA R0, R2, R3, R0 ;                                   /* 0x0000000302007223 */
        /*0080*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;                   /* 0x000000100c08723c */
        /*0090*/                   EXIT ;                                                  /* 0x000000000000794d */
"""


def test_parse_ptxas_log():
    assert kr.parse_ptxas_log(PTXAS_LOG) == dict(regs=255, stack_bytes=80, spill_store_bytes=84, spill_load_bytes=76)
    with pytest.raises(ValueError, match="ptxas"):
        kr.parse_ptxas_log("ptxas fatal   : Unsupported .version 9.4")


def test_parse_res_usage():
    assert kr.parse_res_usage(RES_USAGE) == dict(regs=255, stack_bytes=16, static_shared_bytes=1024, local_bytes=0)


def test_parse_sass_counts_opcodes_with_predicates_and_modifiers():
    out = kr.parse_sass(SASS)
    assert out["HGMMA"] == 2 and out["HMMA"] == 1 and out["FFMA"] == 1
    assert out["LDL"] == 1 and out["STL"] == 1 and out["local_mem_instr"] == 2
    assert out["UTMALDG"] == 1 and out["UBLKCP"] == 1 and out["tma_instr"] == 2
    assert out["n_instr"] == 10


def test_count_dots():
    ttir = "%5 = tt.dot %1, %2, %3 : tensor<64x64xbf16>\n%9 = tt.dot %4, %6, %7\n"
    ttgir = "%5 = ttng.warp_group_dot %1, %2, %3 {isAsync = true}\n%9 = tt.dot %4, %6, %7\n"
    assert kr.count_dots(ttir, ttgir) == dict(dots=2, wgmma_dots=1)


# Hand-written TTGIR in the shape Triton's pipeliner emits (names shortened).
TTGIR_PIPELINED = """\
  tt.func public @k(%K: !tt.ptr<bf16>) {
    %k_buf = ttg.local_alloc : () -> !ttg.memdesc<2x32x128xbf16, #shared, #smem, mutable>
    %v_buf = ttg.local_alloc : () -> !ttg.memdesc<3x32x128xbf16, #shared, #smem, mutable>
    %bar = ttg.local_alloc : () -> !ttg.memdesc<2x1xi64, #shared2, #smem, mutable>
    %lse = ttg.local_alloc : () -> !ttg.memdesc<1x32xf32, #shared1, #smem, mutable>
    %k0 = ttg.memdesc_index %k_buf[%c0_i32] : !ttg.memdesc<2x32x128xbf16> -> !ttg.memdesc<32x128xbf16>
    %t0 = ttg.async_copy_global_to_local %ptr, %k0 mask %m : tensor<32x128x!tt.ptr<bf16>> -> <32x128xbf16>
    %r:3 = scf.for %i = %c0 to %n step %c32 iter_args(%a = %x) -> (tensor<64x128xf32>) : i64 {
      %c = scf.if %p -> (i32) {
        scf.yield %c1 : i32
      } else {
        scf.yield %c0 : i32
      }
      %k1 = ttg.memdesc_index %k_buf[%c] : !ttg.memdesc<2x32x128xbf16> -> !ttg.memdesc<32x128xbf16>
      %t1 = ttg.async_copy_global_to_local %ptr2, %k1 mask %m : tensor<32x128x!tt.ptr<bf16>> -> <32x128xbf16>
      %v1 = ttg.memdesc_index %v_buf[%c] : !ttg.memdesc<3x32x128xbf16> -> !ttg.memdesc<32x128xbf16>
      %b1 = ttg.memdesc_index %bar[%c] : !ttg.memdesc<2x1xi64> -> !ttg.memdesc<1xi64>
      ttng.async_tma_copy_global_to_local %desc[%i, %c0] %v1, %b1, %true : !tt.tensordesc<tensor<32x128xbf16>>
      %l1 = ttg.memdesc_index %lse[%c0] : !ttg.memdesc<1x32xf32> -> !ttg.memdesc<32xf32>
      %t2 = ttg.async_copy_global_to_local %ptr3, %l1 : tensor<32x!tt.ptr<f32>> -> <32xf32>
      scf.yield %a : tensor<64x128xf32>
    }
    tt.return
  }
"""


def test_pipelining_reads_multibuffered_tiles_filled_in_loops():
    assert kr.pipelining(TTGIR_PIPELINED) == dict(pipelined=True, pipeline_depth=3, pipelined_tiles=2,
                                                  pipeline_kind="cp.async+tma")
    assert kr.pipelined_cell(dict(kr.pipelining(TTGIR_PIPELINED))) == "3x2 cp.async+tma"


def test_pipelining_ignores_single_buffers_and_copies_outside_loops():
    # the same kernel with every in-loop copy removed: only the prologue copy is left
    prologue_only = "\n".join(line for line in TTGIR_PIPELINED.splitlines()
                              if "async_copy" not in line or "%t0" in line)
    prologue_only = "\n".join(line for line in prologue_only.splitlines() if "async_tma_copy" not in line)
    assert kr.pipelining(prologue_only)["pipelined"] is False
    # single-buffered (1 x ...) tiles and barrier arrays (2 x 1 x i64, not a tile) never count
    only_lse = "\n".join(line for line in TTGIR_PIPELINED.splitlines() if "%t1" not in line and "async_tma" not in line)
    assert kr.pipelining(only_lse) == dict(pipelined=False, pipeline_depth=0, pipelined_tiles=0, pipeline_kind="")
    # a plain load -> local_alloc -> wgmma chain (what num_stages=1 gives)
    serial = """    %acc = scf.for %i = %c0 to %n step %c32 iter_args(%a = %x) -> (tensor<64x128xf32>) : i64 {
      %k = tt.load %ptr, %m : tensor<32x128x!tt.ptr<bf16>>
      %ks = ttg.local_alloc %k : (tensor<32x128xbf16>) -> !ttg.memdesc<32x128xbf16, #shared, #smem>
      scf.yield %a : tensor<64x128xf32>
    }"""
    assert kr.pipelining(serial)["pipelined"] is False
    assert kr.pipelined_cell(dict(pipelined=False)) == "no"


def test_occupancy_by_hand():
    # 8 warps x 255 registers: 256 regs/thread -> 8192 per warp -> 8 warps per SM -> 1 block, 8/64
    assert kr.occupancy(90, 8, 255, 80 * 1024) == dict(blocks_per_sm=1, occupancy=0.125, occupancy_limiter="registers")
    # 4 warps x 32 registers, 65 KB shared: (233472 // (66560 + 1024)) = 3 blocks by shared memory
    occ = kr.occupancy(90, 4, 32, 65 * 1024)
    assert occ["blocks_per_sm"] == 3 and occ["occupancy_limiter"] == "shared"
    # tiny kernel: 16 blocks of 4 warps fill 64 warps
    assert kr.occupancy(80, 4, 25, 2048)["occupancy"] == 1.0


def test_committed_report_covers_every_target_shape():
    data = json.loads(COMMITTED.read_text())
    assert len(data["metadata"]["cases"]) == len(kr.target_cases())
    assert {r["cc"] for r in data["rows"]} == {90, 80}
    assert not [r for r in data["rows"] if "error" in r]
    labels = {label.rsplit(" ", 1)[0] for r in data["rows"] for label in r["used_by"]}
    assert labels == {c.label for c in kr.target_cases()}


# ----------------------------------------------------------------------------- _check_inputs limits
def _meta(*shape):
    return torch.empty(shape, device="meta", dtype=torch.bfloat16)


def test_check_inputs_accepts_long_sequences_with_many_heads():
    """S = 512K and 1M with 32 heads, D = 128 (T * Hq * D >= 2**31): offsets are int64."""
    from moba.triton_kernels.attention import _check_inputs

    for s in (512 * 1024, 1024 * 1024):
        q, kv = _meta(s, 32, 128), _meta(s, 8, 128)
        _check_inputs(q, kv, kv)
        _check_inputs(q, kv, kv, 12)


def test_check_inputs_boundaries():
    from moba.triton_kernels.attention import INT32_MAX, _check_inputs

    kv = _meta(16, 1, 16)
    # int32 row ids token * Hq + head: Tq * Hq <= 2**31 - 1
    _check_inputs(_meta(INT32_MAX, 1, 16), _meta(INT32_MAX, 1, 16), _meta(INT32_MAX, 1, 16))
    with pytest.raises(ValueError, match="row ids"):
        _check_inputs(_meta(2**30, 2, 16), kv, kv)
    # int32 selection offsets: Tq * Hq * n_slots <= 2**31 - 1
    _check_inputs(_meta(2**28 - 1, 2, 16), kv, kv, 4)  # 2**31 - 8
    with pytest.raises(ValueError, match="selection offsets"):
        _check_inputs(_meta(2**28, 2, 16), kv, kv, 4)  # 2**31
    # int32 key-token indices
    with pytest.raises(ValueError, match="tokens"):
        _check_inputs(_meta(16, 1, 16), _meta(2**31, 1, 16), _meta(2**31, 1, 16))
    # the block-mean grid's y dimension
    _check_inputs(_meta(16, 65535, 16), _meta(16, 65535, 16), _meta(16, 65535, 16))
    with pytest.raises(ValueError, match="65535 KV heads"):
        _check_inputs(_meta(16, 65536, 16), _meta(16, 65536, 16), _meta(16, 65536, 16))
    # head dim never matters
    _check_inputs(_meta(2**20, 8, 256), _meta(2**20, 8, 256), _meta(2**20, 8, 256), 16)
