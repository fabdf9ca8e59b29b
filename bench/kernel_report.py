"""Static report of every MoBA Triton kernel as the public API launches it, for sm_90 and sm_80, no GPU.

    python -m bench.kernel_report                       # every target shape, sm_90 + sm_80 (a few minutes)
    python -m bench.kernel_report --quick               # Hq=32/Hkv=8, D=128, bf16, block 512/top-3 only
    python -m bench.kernel_report --json report.json --cc 90

How the real specialisation is captured: Triton specialises a kernel at launch on the
arguments' types, on integers equal to 1 and on 16-divisibility of integers and pointers
(plus the constexprs and launch options). To see exactly what the launchers pass, the script
installs a fake Triton driver (it reports a CUDA target, device 0, stream 0) and a
``triton.knobs.runtime.jit_cache_hook`` that records each launch's signature, constexprs,
attributes and options and then returns True, which tells Triton to skip the compile and the
launch. The launchers then run their host code on small CPU tensors with the target head
counts, head dims, dtypes, block sizes and top-k (sequence lengths do not change a
specialisation: they only set grid sizes):

* gate: ``moba.ops.triton_impl.triton_gate`` (block means + top-k kernels);
* attention: ``triton_attention_packed(..., decomposition="union" | "gather" | "auto")`` forward
  and its autograd backward (dq or dq-gather, and dk/dv), on indices from the torch gate; "auto"
  launches both sides' kernels in their ``AUTO=True`` specialisation (device flag read, early exit);
* decode: ``moba.decode.moba_decode(..., backend="triton")`` for one new token (B=1).

Identical specialisations are compiled once (``used_by`` lists every case that launches
one) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. Per kernel and
target the report reads: registers, spill stores/loads and stack frame (``ptxas -v`` rerun on
the PTX with Triton's flags), shared memory (Triton's dynamic request + the cubin's static
shared memory, from ``cuobjdump -res-usage``), theoretical occupancy (CUDA occupancy rules,
below), matmuls (``tt.dot`` in the TTIR) and how many became wgmma (``warp_group_dot`` in the
TTGIR), whether the loops are software-pipelined (``pipelining``: multi-buffered shared tiles
filled by cp.async or TMA inside a loop, from the TTGIR), and the SASS (``cuobjdump -sass``): HGMMA / HMMA / FFMA counts, local-memory
instructions (LDL/STL) and TMA instructions (UTMALDG/UTMASTG/UBLKCP). ptxas, cuobjdump and
nvdisasm are the ones Triton ships. Results of the ptxas/SASS analysis are cached by cubin
hash (``--cache``), Triton caches the compiles, so a rerun takes seconds.

Occupancy (theoretical, per SM, no GPU needed): warps per SM limited by 64 warps, 32 blocks,
65536 registers (allocated per warp in units of 256) and shared memory per SM (228 KB sm_90,
164 KB sm_80, 1 KB reserved per block, 128-byte granules); occupancy = active warps / 64.

The table goes to the terminal (rich), ``--json PATH`` writes everything. Run it without
TRITON_INTERPRET (interpreted kernels cannot be compiled; the script says so and stops).
Cost: the full run compiles 144 specialisations x 2 targets, about 5 CPU-minutes with cold
caches (2 compile processes: under 3 minutes on an idle 2-core machine); ``--quick`` compiles
14 x 2 in under a minute; with warm caches either takes about a minute (mostly the capture).
The committed baseline is bench/results/kernel-report-main-2026-12-03.json.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/kernel_report.py, from anywhere): import it as bench.kernel_report
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moba._core import cli

from ._common import git_state, make_parser, utc_now

# Triton 3.9 warns when this is unset and defaults it to 1; the launchers do not set it, so the
# kernels that run are built with FP fusion: compile the report the same way, without the warning.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

#: Per-block shared memory limits (opt-in maximum): 227 KB on sm_90, 163 KB on sm_80.
SHARED_LIMIT = {90: 232448, 80: 166912}
#: Per-SM resources for the occupancy calculation.
SM_RESOURCES = {
    90: dict(max_warps=64, max_blocks=32, regs=65536, shared=233472),
    80: dict(max_warps=64, max_blocks=32, regs=65536, shared=167936),
}
REG_ALLOC_UNIT = 256  # registers, allocated per warp
SHARED_RESERVED_PER_BLOCK = 1024
SHARED_GRANULE = 128

DTYPES = ("bf16", "fp16")
HEADS = ((16, 16), (32, 8))  # (Hq, Hkv)
HEAD_DIMS = (64, 128)
SETTINGS = ((512, 3), (128, 8))  # (block size, top-k)
PHASES = ("gate", "fwd-union", "bwd-union", "fwd-gather", "bwd-gather", "fwd-auto", "bwd-auto", "decode")

#: Kernels the static rules apply to (tests/bench/test_kernel_report.py): attention matmuls must
#: use wgmma on sm_90; these and the gate must neither spill nor touch local memory.
ATTENTION_KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_fwd_gather_kernel", "_bwd_dq_gather_kernel")
#: Attention helpers without a matmul (the spill and local-memory rules only).
ATTENTION_HELPER_KERNELS = ("_dkdv_reduce_kernel", "_bwd_delta_kernel")
GATE_KERNELS = ("_gate_topk_kernel", "_block_mean_kernel")

SASS_OPS = ("HGMMA", "HMMA", "FFMA", "LDL", "STL", "UTMALDG", "UTMASTG", "UBLKCP", "LDGSTS", "LDSM", "STSM")
TMA_OPS = ("UTMALDG", "UTMASTG", "UBLKCP")


@dataclass(frozen=True)
class Case:
    """One target shape: query/KV heads, head dim, dtype, block size, top-k."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    top_k: int

    @property
    def label(self) -> str:
        return f"hq{self.heads}/{self.kv_heads} d{self.head_dim} {self.dtype} b{self.block_size}/k{self.top_k}"


def target_cases() -> list[Case]:
    """Every target shape of issue 14 (16 cases)."""
    return [Case(hq, hkv, d, dt, bs, k) for (hq, hkv), d, dt, (bs, k) in itertools.product(HEADS, HEAD_DIMS, DTYPES, SETTINGS)]


def quick_cases(head_dims=(128,)) -> list[Case]:
    """The headline shape only: Hq=32/Hkv=8, bf16, block 512/top-3 (every kernel once), at D=128
    or at each of ``head_dims``."""
    return [Case(32, 8, d, "bf16", 512, 3) for d in head_dims]


@dataclass
class Spec:
    """One compiled specialisation (picklable: the kernel is named by module + attribute)."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict  # {param name: value}
    attrs: list  # [[param index, [[attr, value], ...]], ...]
    options: dict  # num_warps, num_stages, ...
    used_by: list = field(default_factory=list)

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.signature, self.constexprs, self.attrs, self.options],
                          sort_keys=True, default=str)


# ----------------------------------------------------------------------------- capture
class _FakeDriver:
    """Enough of a Triton driver for ``JITFunction.run`` to specialise and reach the cache hook."""

    def __init__(self, cc: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cc, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


_OPTION_KEYS = ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion", "maxnreg", "launch_cooperative_grid",
                "launch_pdl")


class _Recorder:
    def __init__(self):
        self.label = ""
        self.specs: dict[str, Spec] = {}

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled=False):  # noqa: A002
        jit_fn = fn.jit_function
        names = [p.name for p in jit_fn.params]
        spec_data = json.loads(compile["specialization_data"])
        options = {k: spec_data["options"][k] for k in _OPTION_KEYS if k in spec_data["options"]}
        constexprs = {names[path[0]]: _plain(value) for path, value in (compile["constants"] or {}).items()}
        attrs = sorted([list(path)[0], [list(a) for a in value]] for path, value in compile["configs"][0].items() if value)
        spec = Spec(jit_fn.fn.__module__, jit_fn.fn.__name__, dict(compile["signature"]), constexprs, attrs, options)
        spec = self.specs.setdefault(spec.key(), spec)
        if self.label not in spec.used_by:
            spec.used_by.append(self.label)
        return True  # skip Triton's compile and the launch


def _plain(value):
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return getattr(value, "value", str(value))


def _check_not_interpreted():
    from moba.triton_kernels import attention

    if type(attention._fwd_kernel).__name__ == "InterpretedFunction":
        raise SystemExit("kernel_report: TRITON_INTERPRET=1 was set when the kernels were imported; "
                         "run without it (interpreted kernels cannot be compiled)")


def _run_case(case: Case, rec: _Recorder, phases) -> None:
    import torch

    from moba import decode as moba_decode_mod
    from moba._core.layout import build_layout
    from moba.ops import triton_impl as tb
    from moba.ops.gate import select_packed

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    n_blocks = case.top_k + 2  # more blocks than top-k: the gate kernel runs (not the dense shortcut)
    s = n_blocks * case.block_size
    cu = [0, s]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(s, case.heads, case.head_dim, generator=gen).to(dtype)
    k = torch.randn(s, case.kv_heads, case.head_dim, generator=gen).to(dtype)
    v = torch.randn(s, case.kv_heads, case.head_dim, generator=gen).to(dtype)
    scale = case.head_dim**-0.5
    if "gate" in phases:
        rec.label = f"{case.label} gate"
        tb.triton_gate(q, k, cu, cu, case.block_size, case.top_k, True)
    layout = build_layout(cu, cu, case.block_size, q.device)
    idx = select_packed(q.float(), k.float(), layout, case.top_k, True)  # valid indices (the kernel gate is skipped)
    for dec in ("union", "gather", "auto"):  # "auto" launches both sides with AUTO=True (flag read + exit)
        if f"fwd-{dec}" not in phases and f"bwd-{dec}" not in phases:
            continue
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        rec.label = f"{case.label} fwd-{dec}"
        out, _ = tb.triton_attention_packed(qq, kk, vv, cu, cu, case.block_size, idx, True, scale, dec)
        if f"bwd-{dec}" in phases:
            rec.label = f"{case.label} bwd-{dec}"
            out.backward(torch.ones_like(out))  # the launched backward (values are never computed)
    if "decode" in phases:
        rec.label = f"{case.label} decode"
        k_cache, v_cache = k[None], v[None]  # (1, L, Hkv, D): a prompt of L tokens in the cache
        state = moba_decode_mod.BlockMeanState(case.block_size)
        moba_decode_mod.moba_decode(q[None, -1:], k_cache, v_cache, state, case.block_size, case.top_k,
                                    backend="triton")


def capture_specs(cases: list[Case], phases=PHASES, cc: int = 90) -> list[Spec]:
    """Run the launchers for every case with a fake driver of target sm_``cc``; return the unique
    specialisations. The target matters: the launchers choose per target (TMA loads on sm_90 only)."""
    import torch
    import triton
    from triton.runtime.driver import driver

    _check_not_interpreted()
    rec = _Recorder()
    previous_hook = triton.knobs.runtime.jit_cache_hook
    previous_driver = driver._active
    driver.set_active(_FakeDriver(cc))
    triton.knobs.runtime.jit_cache_hook = rec.hook
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in cases:
            _run_case(case, rec, phases)
    finally:
        triton.knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver
        torch.set_num_threads(threads)
    # JITFunction keeps per-device binders bound to the fake target: drop them.
    from moba.triton_kernels import attention, decode, gate

    for mod in (attention, decode, gate):
        for obj in vars(mod).values():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                obj.device_caches.clear()
    return list(rec.specs.values())


# ----------------------------------------------------------------------------- parsing
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_ptxas_log(text: str) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v`` output (one entry function)."""
    regs = _PTXAS_REGS.search(text)
    frame = _PTXAS_FRAME.search(text)
    if regs is None or frame is None:
        raise ValueError(f"not a ptxas -v log of one function: {text[:300]!r}")
    stack, spill_st, spill_ld = (int(x) for x in frame.groups())
    return dict(regs=int(regs.group(1)), stack_bytes=stack, spill_store_bytes=spill_st, spill_load_bytes=spill_ld)


def parse_res_usage(text: str) -> dict:
    """REG / STACK / SHARED / LOCAL of the (single) function in ``cuobjdump -res-usage`` output."""
    m = _RES_USAGE.search(text)
    if m is None:
        raise ValueError(f"no resource usage line in: {text[:300]!r}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return dict(regs=reg, stack_bytes=stack, static_shared_bytes=shared, local_bytes=local)


def parse_sass(text: str) -> dict:
    """Opcode counts from ``cuobjdump -sass`` (predicates skipped, modifiers dropped):
    {"ops": {opcode: count}, plus the counts of ``SASS_OPS``, "local_mem_instr" (LDL + STL)
    and "tma_instr" (UTMALDG + UTMASTG + UBLKCP)}."""
    ops = Counter(_SASS_OP.findall(text))
    out = {op: ops.get(op, 0) for op in SASS_OPS}
    out["local_mem_instr"] = out["LDL"] + out["STL"]
    out["tma_instr"] = sum(out[op] for op in TMA_OPS)
    out["n_instr"] = sum(ops.values())
    return out


def count_dots(ttir: str, ttgir: str) -> dict:
    """Matmuls in the kernel (``tt.dot`` in the TTIR) and those lowered to wgmma (``warp_group_dot``)."""
    return dict(dots=len(re.findall(r"\btt\.dot\b", ttir)), wgmma_dots=len(re.findall(r"\bwarp_group_dot\b", ttgir)))


_LOCAL_ALLOC = re.compile(r"(%[\w.#]+) = ttg\.local_alloc\b[^\n]*?-> !ttg\.memdesc<((?:\d+x)+)(\w+),")
_MEMDESC_VIEW = re.compile(r"(%[\w.#]+) = ttg\.(?:memdesc_index|memdesc_subview|memdesc_subslice)\s+(%[\w.#]+)\[")
_ASYNC_COPY = re.compile(r"\b(ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local|"
                         r"ttng\.async_tma_gather)\b([^\n]*)")
_SSA = re.compile(r"%[\w.#]+")


def pipelining(ttgir: str) -> dict:
    """Whether a kernel's loops are software-pipelined, read from its TTGIR.

    Triton's pipeliner turns a loop's loads into asynchronous copies into multi-buffered shared
    tiles: a ``ttg.local_alloc`` of shape ``N x rows x cols`` (N >= 2 buffers), filled by
    ``ttg.async_copy_global_to_local`` (cp.async) or ``ttng.async_tma_copy_global_to_local``
    (TMA) issued inside an ``scf.for`` body, so the loads of step i+1 are in flight while step
    i computes. Returns ``pipelined`` (at least one such tile), ``pipeline_depth`` (the most
    buffers of one such tile, 0 if none), ``pipelined_tiles`` (how many such tiles: e.g. 2 when
    K and V are both multi-buffered) and ``pipeline_kind`` ("cp.async", "tma", both joined by
    "+", or "" if none).
    """
    depth_of: dict[str, int] = {}  # multi-buffered 2-D+ tile allocations -> buffers
    for name, dims, _elem in _LOCAL_ALLOC.findall(ttgir):
        shape = [int(x) for x in dims.rstrip("x").split("x")]
        if len(shape) >= 3 and shape[0] >= 2:
            depth_of[name] = shape[0]
    root = {view: base for view, base in _MEMDESC_VIEW.findall(ttgir)}

    def base_alloc(value: str) -> str | None:
        seen = set()
        while value not in depth_of and value in root and value not in seen:
            seen.add(value)
            value = root[value]
        return value if value in depth_of else None

    filled: dict[str, set] = {}  # alloc -> kinds of the in-loop copies that fill it
    stack: list[str] = []  # ops whose regions enclose the current line
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            if stack:
                stack.pop()
            text = text[1:].strip()
            if text.endswith("{"):  # "} else {", "} do {": the same op, a new region
                stack.append(stack[-1] if stack else "")
                continue
        m = _ASYNC_COPY.search(text)
        if m and "scf.for" in stack:
            kind = "cp.async" if m.group(1).startswith("ttg.") else "tma"
            for value in _SSA.findall(m.group(2)):
                alloc = base_alloc(value)
                if alloc is not None:
                    filled.setdefault(alloc, set()).add(kind)
        if text.endswith("{"):
            op = re.search(r"\b(scf\.\w+|tt\.func|module|ttg\.warp_specialize\w*)\b", text)
            stack.append(op.group(1) if op else "")
    kinds = sorted(set().union(*filled.values())) if filled else []
    return dict(pipelined=bool(filled), pipeline_depth=max((depth_of[a] for a in filled), default=0),
                pipelined_tiles=len(filled), pipeline_kind="+".join(kinds))


def occupancy(cc: int, num_warps: int, regs: int, shared_bytes: int) -> dict:
    """Theoretical occupancy: resident blocks per SM and active warps / max warps."""
    res = SM_RESOURCES[cc]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (res["regs"] // regs_per_warp) // num_warps
    by_warps = res["max_warps"] // num_warps
    smem = math.ceil((shared_bytes + SHARED_RESERVED_PER_BLOCK) / SHARED_GRANULE) * SHARED_GRANULE
    by_shared = res["shared"] // smem
    blocks = min(by_regs, by_warps, by_shared, res["max_blocks"])
    limiter = min((("registers", by_regs), ("warps", by_warps), ("shared", by_shared)), key=lambda x: x[1])[0]
    return dict(blocks_per_sm=blocks, occupancy=blocks * num_warps / res["max_warps"], occupancy_limiter=limiter)


# ----------------------------------------------------------------------------- compile + analyse
def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_path(cc: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOBA_KERNEL_REPORT_CACHE", Path.home() / ".cache" / "moba-kernel-report"))


def _analyse_binary(ptx: str, cubin: bytes, cc: int, enable_fp_fusion: bool, cache_dir: Path | None) -> dict:
    """ptxas -v + cuobjdump (-res-usage, -sass) of one kernel, cached by the binary's hash."""
    digest = hashlib.sha256(ptx.encode() + cubin + f"{cc}{enable_fp_fusion}".encode()).hexdigest()
    cached = cache_dir / f"{digest}.json" if cache_dir else None
    if cached is not None and cached.exists():
        try:
            return json.loads(cached.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx_path.write_text(ptx)
        cubin_path.write_bytes(cubin)
        # Triton's own ptxas flags (backends/nvidia/compiler.py make_cubin), -v for the log.
        cmd = [_ptxas_path(cc), "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={arch}", str(ptx_path), "-o", str(Path(tmp) / "k.o")]
        ptxas = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin_path)], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin_path)], capture_output=True, text=True, check=True)
    out = dict(parse_ptxas_log(ptxas.stderr + ptxas.stdout))
    usage = parse_res_usage(res.stdout)
    out["static_shared_bytes"] = usage["static_shared_bytes"]
    out["cubin_regs"] = usage["regs"]
    out["sass"] = parse_sass(sass.stdout)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(out))
        except OSError:
            pass
    return out


def compile_spec(spec: Spec, cc: int, cache_dir: str | None = None) -> dict:
    """Compile one specialisation for sm_``cc`` and read its resources; errors are returned, not raised."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=spec.kernel, module=spec.module, cc=cc, num_warps=spec.options.get("num_warps"),
               num_stages=spec.options.get("num_stages"), constexprs=spec.constexprs,
               dtype=next((t.lstrip("*") for t in spec.signature.values() if t in ("*bf16", "*fp16", "*fp32")), None),
               used_by=list(spec.used_by))
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        names = [p.name for p in fn.params]
        constexprs = {(names.index(name),): value for name, value in spec.constexprs.items()}
        attrs = {(index,): [tuple(a) for a in value] for index, value in spec.attrs}
        src = ASTSource(fn=fn, signature=spec.signature, constexprs=constexprs, attrs=attrs)
        options = {k: v for k, v in spec.options.items() if v is not None}
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["dynamic_shared_bytes"] = int(compiled.metadata.shared)
        row.update(count_dots(compiled.asm.get("ttir", ""), compiled.asm.get("ttgir", "")))
        row.update(pipelining(compiled.asm.get("ttgir", "")))
        info = _analyse_binary(compiled.asm["ptx"], compiled.asm["cubin"], cc, bool(options.get("enable_fp_fusion", True)),
                               Path(cache_dir) if cache_dir else None)
        sass = info.pop("sass")
        row.update(info)
        row["shared_bytes"] = row["dynamic_shared_bytes"] + row["static_shared_bytes"]
        row["spill_bytes"] = row["spill_store_bytes"] + row["spill_load_bytes"]
        row.update({k: sass[k] for k in ("HGMMA", "HMMA", "FFMA", "LDL", "STL", "local_mem_instr", "tma_instr")})
        row["tma"] = sass["tma_instr"] > 0
        row.update(occupancy(cc, row["num_warps"], row["regs"], row["shared_bytes"]))
        row["shared_ok"] = row["shared_bytes"] <= SHARED_LIMIT[cc]
    except Exception as exc:  # noqa: BLE001 - one failing kernel never stops the report
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return row


def _compile_job(args):
    spec_dict, cc, cache_dir = args
    return compile_spec(Spec(**spec_dict), cc, cache_dir)


def build_report(cases: list[Case], ccs=(90, 80), jobs: int = 1, cache_dir: str | None = None, log=print) -> dict:
    """Capture, deduplicate, compile and analyse. Returns {"metadata", "rows"} (one row per spec and target)."""
    t0 = time.perf_counter()
    git = git_state("triton_kernels", "moba")  # before the (long) compile: what was captured
    # captured once per target: what the launchers pass on sm_90 (TMA) differs from sm_80
    specs = {cc: capture_specs(cases, cc=cc) for cc in ccs}
    log(f"captured {', '.join(f'{len(specs[cc])} (sm_{cc})' for cc in ccs)} unique specialisations from "
        f"{len(cases)} shape case(s) in {time.perf_counter() - t0:.1f} s; compiling with {jobs} job(s)")
    work = [(asdict(s), cc, cache_dir) for cc in ccs for s in specs[cc]]
    if jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_compile_job, work))
    else:
        rows = [_compile_job(w) for w in work]
    return dict(metadata=_metadata(cases, ccs, time.perf_counter() - t0, git), rows=rows)


def _metadata(cases, ccs, seconds, git: dict) -> dict:
    import torch
    import triton

    return {
        "report": "kernel_report",
        "schema_version": 1,
        "date": utc_now(),
        **git,
        "triton_version": triton.__version__,
        "torch_version": torch.__version__,
        "ptxas": {cc: _ptxas_path(cc).rsplit("/", 1)[-1] for cc in ccs},
        "python": platform.python_version(),
        "targets": [f"sm_{cc}" for cc in ccs],
        "cases": [asdict(c) | {"label": c.label} for c in cases],
        "wall_seconds": round(seconds, 1),
        "note": "static: compiled without a GPU; occupancy is theoretical (registers, shared memory, warps)",
    }


# ----------------------------------------------------------------------------- output
def _describe(row: dict) -> str:
    c = row.get("constexprs", {})
    parts = [row.get("dtype") or "", f"D{c['HEAD_DIM']}" if "HEAD_DIM" in c else ""]
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_B", "SORT_WIDTH", "BLOCK_T", "GROUP", "N_SPLITS"):
        if name in c:
            parts.append(f"{name.split('_')[-1][0]}{c[name]}" if name.startswith("BLOCK") else f"{name.lower()}={c[name]}")
    return " ".join(p for p in parts if p)


def launched_by(used_by: list[str]) -> str:
    """Compact summary of the cases that launch a specialisation: heads, settings, phases."""
    heads = sorted({u.split(" ")[0] for u in used_by})
    settings = sorted({u.split(" ")[3] for u in used_by if len(u.split(" ")) > 4})
    phases = sorted({u.split(" ")[-1] for u in used_by})
    return f"{','.join(heads)} {','.join(settings)} {','.join(phases)}"


def table_rows(report: dict) -> list[list[str]]:
    out = []
    for r in sorted(report["rows"], key=lambda r: (-r["cc"], r["kernel"], r.get("dtype") or "", json.dumps(r["constexprs"]))):
        if "error" in r:
            out.append([f"sm_{r['cc']}", r["kernel"], _describe(r), launched_by(r["used_by"]), "ERROR " + r["error"][:60]]
                       + [""] * 9)
            continue
        out.append([
            f"sm_{r['cc']}", r["kernel"], _describe(r), launched_by(r["used_by"]), str(r["num_warps"]), str(r["regs"]),
            f"{r['spill_bytes']}" + (f" ({r['stack_bytes']})" if r["stack_bytes"] else ""),
            f"{r['shared_bytes'] / 1024:.1f}", f"{r['occupancy']:.0%} ({r['blocks_per_sm']})",
            f"{r['wgmma_dots']}/{r['dots']}", str(r["HGMMA"]), str(r["local_mem_instr"]), "yes" if r["tma"] else "no",
            pipelined_cell(r),
        ])
    return out


HEADERS = ["target", "kernel", "config", "launched by", "warps", "regs", "spill B (stack)", "smem KB", "occupancy (blocks)",
           "wgmma dots", "HGMMA", "LDL+STL", "TMA", "pipelined"]


def pipelined_cell(row: dict) -> str:
    """'no', or the deepest multi-buffering, the tiles and how they are filled: '2x2 tma' = two
    shared tiles (K and V) with 2 buffers each, filled by TMA inside the loop."""
    if not row.get("pipelined"):
        return "no"
    return f"{row['pipeline_depth']}x{row['pipelined_tiles']} {row['pipeline_kind']}"


def print_table(report: dict) -> None:
    rows = table_rows(report)
    title = (f"MoBA Triton kernels as launched, compiled without a GPU (triton {report['metadata']['triton_version']}, "
             f"{len(report['metadata']['cases'])} shape case(s))")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in HEADERS:
            table.add_column(h, justify="left" if h in ("target", "kernel", "config", "launched by") else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=230).print(table)
    except ImportError:
        print(title)
        print(" | ".join(HEADERS))
        for row in rows:
            print(" | ".join(row))


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    return "\n".join(lines)


def _cc(text: str) -> int:
    """``--cc`` entry: a compute capability of ``SM_RESOURCES`` (``90``, ``80``)."""
    if not text.isdigit() or int(text) not in SM_RESOURCES:
        raise argparse.ArgumentTypeError(f"expected one of {sorted(SM_RESOURCES)}{cli.did_you_mean(text, map(str, SM_RESOURCES))}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, "bench.kernel_report")
    p.add_argument("--quick", action="store_true", help="one shape (Hq=32/Hkv=8, D=128, bf16, block 512/top-3)")
    p.add_argument("--head_dims", type=cli.list_of(cli.positive_int, "head dims"), default=None,
                   help="with --quick: the headline shape at these head dims (comma list, default: 128)")
    p.add_argument("--cc", type=cli.list_of(_cc, "compute capabilities"), default=[90, 80],
                   help=f"comma list of compute capabilities, from {','.join(map(str, sorted(SM_RESOURCES)))} (default: 90,80)")
    p.add_argument("--jobs", type=cli.positive_int, default=min(8, os.cpu_count() or 1),
                   help="compile processes (default: the CPU count, at most 8)")
    p.add_argument("--json", dest="json_path", default=None, help="write the full report as JSON")
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead of the rich table")
    p.add_argument("--cache", default=str(default_cache_dir()),
                   help="cache of the ptxas/SASS analysis by cubin hash ('' disables; default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    bad = [cc for cc in args.cc if cc not in SM_RESOURCES]
    if bad:
        raise SystemExit(f"--cc: supported compute capabilities are {sorted(SM_RESOURCES)}, got {bad}")
    if args.head_dims and not args.quick:
        raise SystemExit("--head_dims: only with --quick (the full run covers every target head dim)")
    cases = quick_cases(args.head_dims or (128,)) if args.quick else target_cases()
    report = build_report(cases, tuple(args.cc), max(1, args.jobs), args.cache or None)
    if args.markdown:
        print(markdown_table(report))
    else:
        print_table(report)
    errors = [r for r in report["rows"] if "error" in r]
    for r in errors:
        print(f"sm_{r['cc']} {r['kernel']} failed: {r['error']}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.json_path}")
    print(f"{len(report['rows'])} kernel x target rows in {report['metadata']['wall_seconds']} s")
    if report["rows"] and len(errors) == len(report["rows"]):
        raise SystemExit("error: every kernel failed to compile: nothing was measured")
    return report


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "bench.kernel_report"))
