"""One prepared GPU check for a lent GPU window (15 minutes in all; this script keeps to 8 by default).

    python3 -m bench.device_check                      # on the GPU machine, from the repository root
    python3 -m bench.device_check --budget_s 420 --out /tmp/check
    python -m bench.device_check --dry_run --out /tmp/dry   # CPU, Triton interpreter, tiny shapes, fake timers

With the device tool: ``run(command="python3 -m bench.device_check", timeout_s=600)``; results
land in ``$OUT`` (``--out`` defaults to ``$OUT``, else ``bench/results/device-check-<time>``).
Commit them under ``bench/results/<device>-<date>/``.

Steps, in priority order (each one a subprocess with the time left as its timeout, so a crash or
a hung kernel costs only its own step; a step that would overrun the budget is skipped):

1. ``install``: ``pip install --no-deps --no-build-isolation -e .`` (the machine has no network:
   no build isolation, no dependencies; its image has torch and triton), then import
   ``moba.triton_kernels`` and record the versions and the GPU.
2. ``correctness``: bf16 (dry run: fp16) every kernel against the PyTorch path with the same
   block indices: gate (identical selections), forward and backward in both decompositions
   ("union", "gather"), decode. docs/design.md's rule: the float32 torch path is the truth; the
   kernel's error is at most 2x the bf16 torch path's (3x for gradients).
3. ``ceilings``: bf16 GEMM (8192^3, random data) and a device-to-device copy (TB/s counting
   bytes read + written), medians of CUDA-event timings.
4. ``attention``: B=1, Hq=32, Hkv=8, D=128, bf16, causal. Dense SDPA pinned to flash and to
   cuDNN (32K, 128K) and ours (``moba_attn_func(backend="triton")``, gate included) for block
   512/top-3 and 128/top-8 at 32K, 128K, 512K: forward, forward+backward, the gate alone,
   and peak memory above the inputs.
5. ``profile``: ``torch.profiler`` time per kernel of one forward+backward (128K, block 512/top-3).

Every result is one JSON line appended to ``device_check.jsonl`` as soon as it exists, so a
timeout keeps what was done; the summary (speedups vs dense flash, gate share, memory ratio,
ceilings, correctness) is printed last and written to ``summary.json``.

``--dry_run`` runs every step on the CPU under ``TRITON_INTERPRET=1`` with tiny shapes, fp16 and
a fake timer (every call "takes" 1 ms), without installing anything: tests/bench/test_device_check.py
checks the script itself that way.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/device_check.py, from anywhere): import it as bench.device_check
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from moba._core import cli

from ._common import RESULTS, ROOT, is_oom, make_parser, sdpa, time_call_ms, utc_stamp

STEPS = ("install", "correctness", "ceilings", "attention", "profile")
#: Seconds a step is expected to take on an H200 (Triton's first compiles included); a step
#: starts only when this fits in the budget left.
STEP_ESTIMATE_S = {"install": 30, "correctness": 150, "ceilings": 20, "attention": 200, "profile": 40}
DRY_ESTIMATE_S = {name: 1 for name in STEPS}
#: A step's timeout is the budget left, capped where the OS's poll() still takes it (a budget
#: of 1e9 s means "no budget").
MAX_STEP_TIMEOUT_S = 1e6
FAKE_MS = 1.0


# ----------------------------------------------------------------------------- records
class Recorder:
    """Appends one JSON object per line to the results file, flushed at once."""

    def __init__(self, path: Path, step: str, t0: float):
        self.path, self.step, self.t0 = path, step, t0

    def __call__(self, kind: str, **fields) -> dict:
        rec = dict(step=self.step, kind=kind, t_s=round(time.time() - self.t0, 2), **fields)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
        return rec


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return out


# ----------------------------------------------------------------------------- timing
class Clock:
    """CUDA-event timing (median of calls until ``max_s``), or a fake clock for dry runs."""

    def __init__(self, fake: bool, deadline: float):
        self.fake, self.deadline = fake, deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def time_ms(self, fn, warmup: int = 1, repeats: int = 10, max_s: float = 3.0) -> dict:
        import torch

        if self.fake:
            fn()
            return dict(median_ms=FAKE_MS, n_timed=1, fake=True)
        t = time.perf_counter()
        fn()  # first call: compile / warm-up, also tells how slow one call is
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        for _ in range(warmup if first < max_s / 4 else 0):
            fn()
        times = []
        for _ in range(repeats):
            times.append(time_call_ms(fn, "cuda"))
            if sum(times) > max_s * 1e3 or self.left() < 2 * times[-1] / 1e3:
                break
        return dict(median_ms=statistics.median(times), n_timed=len(times), min_ms=min(times), max_ms=max(times))


def peak_mib(fn, device) -> float | None:
    """Peak memory above what was allocated before one call (CUDA only; None elsewhere, without
    calling ``fn``: the timed call runs it)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------- configuration
def config(dry: bool) -> dict:
    """Shapes per step: the targets on a GPU, tiny ones for the dry run."""
    if dry:
        return dict(
            dtype="fp16", device="cpu",
            correctness=[dict(s=128, hq=2, hkv=1, d=16, bs=32, k=2)],
            gemm=64, copy_mib=1,
            attn=dict(hq=2, hkv=1, d=16, settings=[(32, 2), (16, 3)], seqlens=[128], dense_seqlens=[128],
                      profile=(128, 32, 2)),
        )
    return dict(
        dtype="bf16", device="cuda",
        correctness=[dict(s=4096, hq=32, hkv=8, d=128, bs=512, k=3), dict(s=2048, hq=16, hkv=16, d=64, bs=128, k=8)],
        gemm=8192, copy_mib=4096,
        attn=dict(hq=32, hkv=8, d=128, settings=[(512, 3), (128, 8)], seqlens=[32768, 131072, 524288],
                  dense_seqlens=[32768, 131072], profile=(131072, 512, 3)),
    )


def _dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ----------------------------------------------------------------------------- steps
def step_install(rec: Recorder, cfg: dict, dry: bool, clock: Clock) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    if dry:
        rec("install", status="skipped", reason="dry run (would run: " + " ".join(cmd[2:]) + ")")
    else:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, clock.left()))
        rec("install", status="ok" if proc.returncode == 0 else "fail", rc=proc.returncode,
            tail=(proc.stdout + proc.stderr)[-1500:])
    probe = ("import platform, torch, triton, moba, moba.triton_kernels.attention as a; "
             "print(platform.python_version(), torch.__version__, torch.version.cuda, triton.__version__, a.__file__); "
             "print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, timeout=120,
                          env=_child_env(dry))
    rec("import", status="ok" if proc.returncode == 0 else "fail", out=(proc.stdout + proc.stderr)[-1500:])
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        rec("nvidia-smi", status="ok", out=smi.stdout.strip())
    except (OSError, subprocess.SubprocessError) as e:
        rec("nvidia-smi", status="skipped", reason=str(e)[:200])


def _max_err(x, ref) -> float:
    """Max absolute error (docs/design.md's tolerance rule compares max errors)."""
    return float((x.double() - ref.double()).abs().max())


def step_correctness(rec: Recorder, cfg: dict, dry: bool, clock: Clock) -> None:
    import torch

    dev, dt = torch.device(cfg["device"]), _dtype(cfg["dtype"])
    for c in cfg["correctness"]:
        if clock.left() < 5:
            rec("correctness", status="skipped", reason="budget", **c)
            continue
        _check_config(rec, c, cfg, dev, dt)


def _gate_fallback_share(q, k, block_size, top_k) -> float | None:
    """Share of the gate's (query tile, head) programs that re-scored their candidates in
    float32 (near ties at the cut; half inputs only), from the kernel's own counter."""
    import torch

    from .gate_fallback import gate_with_fallbacks

    if q.dtype == torch.float32:
        return None
    _, n_fallbacks, programs = gate_with_fallbacks(q, k, block_size, top_k)
    return n_fallbacks / max(1, programs)


def _check_config(rec: Recorder, c: dict, cfg: dict, dev, dt) -> None:
    """Every kernel family at one shape against the torch path (same block indices)."""
    import torch

    import moba
    from moba._core.layout import build_layout
    from moba.ops import triton_impl as tb
    from moba.ops.gate import select_packed

    torch.manual_seed(0)
    s, hq, hkv, d, bs, k = c["s"], c["hq"], c["hkv"], c["d"], c["bs"], c["k"]
    q = torch.randn(s, hq, d, device=dev).to(dt)
    kk = torch.randn(s, hkv, d, device=dev).to(dt)
    v = torch.randn(s, hkv, d, device=dev).to(dt)
    cu = [0, s]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    scale = d**-0.5
    label = dict(config=c, dtype=cfg["dtype"])
    # gate: identical selections to the torch gate on the same (upcast) inputs
    try:
        layout = build_layout(cu, cu, bs, dev)
        ref_idx = select_packed(q.float(), kk.float(), layout, k, True)
        idx = tb.triton_gate(q, kk, cu, cu, bs, k, True)
        same = float((idx.sort(-1).values == ref_idx.sort(-1).values).all(-1).float().mean())
        rec("correctness", kernel="gate", status="ok" if same >= 0.999 else "fail", rows_identical=same,
            fallback_tiles=_gate_fallback_share(q, kk, bs, k), **label)
    except Exception as e:  # noqa: BLE001 - record and go on
        rec("correctness", kernel="gate", status="error", error=_err(e), **label)
        ref_idx = select_packed(q.float(), kk.float(), build_layout(cu, cu, bs, dev), k, True)
    dout = torch.randn_like(q)

    def torch_path(x_dt):
        xs = [t.detach().to(x_dt).requires_grad_() for t in (q, kk, v)]
        o = moba.moba_attn_varlen_func(*xs, cu_t, s, bs, k, backend="torch", block_indices=ref_idx)
        o.backward(dout.to(x_dt))
        return [o] + [t.grad for t in xs]

    truth = torch_path(torch.float32)
    low = torch_path(dt)
    for dec in ("union", "gather"):
        try:
            xs = [t.detach().clone().requires_grad_() for t in (q, kk, v)]
            out, _ = tb.triton_attention_packed(*xs, cu, cu, bs, ref_idx, True, scale, dec)
            out.backward(dout)
            got = [out] + [t.grad for t in xs]
            for name, g, t_ref, l_ref, factor in zip(("out", "dq", "dk", "dv"), got, truth, low, (2, 3, 3, 3),
                                                      strict=True):
                err, err_low = _max_err(g, t_ref), _max_err(l_ref, t_ref)
                ok = bool(torch.isfinite(g).all()) and err <= factor * err_low + 1e-5
                rec("correctness", kernel=f"attention-{dec}", tensor=name, status="ok" if ok else "fail",
                    max_err=err, max_err_torch_lowp=err_low, allowed_factor=factor, **label)
        except Exception as e:  # noqa: BLE001
            rec("correctness", kernel=f"attention-{dec}", status="error", error=_err(e), **label)
    # decode: the newest token over a cache holding the whole sequence
    try:
        outs = {}
        for backend, x_dt in (("triton", dt), ("torch", dt), ("torch32", torch.float32)):
            state = moba.BlockMeanState(bs)
            outs[backend] = moba.moba_decode(q[None, -1:].to(x_dt), kk[None].to(x_dt), v[None].to(x_dt), state, bs,
                                             k, backend="torch" if backend.startswith("torch") else "triton")
        err, err_low = _max_err(outs["triton"], outs["torch32"]), _max_err(outs["torch"], outs["torch32"])
        ok = bool(torch.isfinite(outs["triton"]).all()) and err <= 2 * err_low + 1e-5
        rec("correctness", kernel="decode", tensor="out", status="ok" if ok else "fail",
            max_err=err, max_err_torch_lowp=err_low, allowed_factor=2, **label)
    except Exception as e:  # noqa: BLE001
        rec("correctness", kernel="decode", status="error", error=_err(e), **label)


def step_ceilings(rec: Recorder, cfg: dict, dry: bool, clock: Clock) -> None:
    import torch

    dev, dt = torch.device(cfg["device"]), _dtype(cfg["dtype"])
    n = cfg["gemm"]
    mats = [torch.randn(n, n, device=dev, dtype=dt) for _ in range(2)]  # random data, never zeros
    t = clock.time_ms(lambda: mats[0] @ mats[1], warmup=3, repeats=10)
    rec("gemm", status="ok", n=n, dtype=cfg["dtype"], tflops=2 * n**3 / (t["median_ms"] * 1e-3) / 1e12, **t)
    mats.clear()
    bufs = [torch.empty(cfg["copy_mib"] * 2**20, dtype=torch.uint8, device=dev).random_()]
    bufs.append(torch.empty_like(bufs[0]))
    t = clock.time_ms(lambda: bufs[1].copy_(bufs[0]), warmup=3, repeats=10)
    rec("copy", status="ok", mib=cfg["copy_mib"], tbps=2 * bufs[0].numel() / (t["median_ms"] * 1e-3) / 1e12, **t)


def _measure(rec, clock, dev, fn, grads, dout, max_s, **label) -> None:
    """fwd (no grad) and, when ``grads`` is given, fwd+bwd: time and peak memory, one record each."""
    import torch

    modes = ["fwd"] + (["fwd+bwd"] if grads is not None else [])
    for mode in modes:
        if clock.left() < 3:
            rec("attention", mode=mode, status="skipped", reason="budget", **label)
            continue
        try:
            if mode == "fwd":
                def step():
                    with torch.no_grad():
                        fn()
            else:
                def step():
                    for t in grads:
                        t.grad = None
                    fn().backward(dout)
            mem = peak_mib(step, dev)
            t = clock.time_ms(step, warmup=1, repeats=5, max_s=max_s)
            rec("attention", mode=mode, status="ok", peak_mib=mem, **t, **label)
        except Exception as e:  # noqa: BLE001
            oom = is_oom(e)
            rec("attention", mode=mode, status="oom" if oom else "error", error=_err(e), **label)
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def step_attention(rec: Recorder, cfg: dict, dry: bool, clock: Clock) -> None:
    import torch

    dev = torch.device(cfg["device"])
    for s in cfg["attn"]["seqlens"]:
        _attention_at(rec, clock, cfg, dry, s)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _attention_at(rec: Recorder, clock: Clock, cfg: dict, dry: bool, s: int) -> None:
    """Dense SDPA (flash, cuDNN) and ours (every block/top-k setting) at one sequence length."""
    import torch

    import moba
    from moba.ops import triton_impl as tb

    dev, dt = torch.device(cfg["device"]), _dtype(cfg["dtype"])
    a = cfg["attn"]
    hq, hkv, d = a["hq"], a["hkv"], a["d"]
    max_s = 0.0 if dry else 2.0
    torch.manual_seed(s)
    q, k, v = (torch.randn(1, s, h, d, device=dev, dtype=dt, requires_grad=True) for h in (hq, hkv, hkv))
    dout = torch.randn_like(q)
    shape = dict(s=s, hq=hq, hkv=hkv, d=d, dtype=cfg["dtype"])
    if s in a["dense_seqlens"]:
        for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
            backend = None if dry else backend  # CPU: torch's default SDPA stands in
            _measure(rec, clock, dev, lambda b=backend: sdpa(q, k, v, True, b), (q, k, v), dout, max_s,
                     provider=name, **shape)
    cu = [0, s]
    for bs, top_k in a["settings"]:
        label = dict(provider="moba-triton", block_size=bs, top_k=top_k, **shape)
        if clock.left() < 3:
            rec("attention", mode="gate", status="skipped", reason="budget", **label)
            continue
        try:
            with torch.no_grad():
                t = clock.time_ms(lambda bs=bs, top_k=top_k: tb.triton_gate(q[0], k[0], cu, cu, bs, top_k, True),
                                  repeats=5, max_s=max_s)
            rec("attention", mode="gate", status="ok", **t, **label)
        except Exception as e:  # noqa: BLE001
            rec("attention", mode="gate", status="error", error=_err(e), **label)
        _measure(rec, clock, dev, lambda bs=bs, top_k=top_k: moba.moba_attn_func(q, k, v, bs, top_k, backend="triton"),
                 (q, k, v), dout, max_s, **label)


def step_profile(rec: Recorder, cfg: dict, dry: bool, clock: Clock) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import moba

    dev, dt = torch.device(cfg["device"]), _dtype(cfg["dtype"])
    a = cfg["attn"]
    s, bs, top_k = a["profile"]
    q, k, v = (torch.randn(1, s, h, a["d"], device=dev, dtype=dt, requires_grad=True) for h in (a["hq"], a["hkv"], a["hkv"]))

    def step():
        moba.moba_attn_func(q, k, v, bs, top_k, backend="triton").backward(torch.ones_like(q))

    step()  # compile outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()

    def dev_us(e):
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0

    key = dev_us if dev.type == "cuda" else (lambda e: e.cpu_time_total)
    top = sorted(events, key=key, reverse=True)[:20]
    total = sum(key(e) for e in events)
    for e in top:
        rec("profile", status="ok", name=e.key[:120], calls=e.count, device_us=dev_us(e), cpu_us=e.cpu_time_total,
            s=s, block_size=bs, top_k=top_k)
    rec("profile-total", status="ok", sum_us=total, note="sum over all profiler keys (kernels and host ops overlap)")


STEP_FNS = {"install": step_install, "correctness": step_correctness, "ceilings": step_ceilings,
            "attention": step_attention, "profile": step_profile}


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:400]}"


def _child_env(dry: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


# ----------------------------------------------------------------------------- summary
def summarize(records: list[dict]) -> dict:
    """Correctness counts, ceilings, and per (setting, S, mode) our time vs dense flash."""
    corr = [r for r in records if r["kind"] == "correctness"]
    out = dict(correctness=dict(ok=sum(r["status"] == "ok" for r in corr),
                                failed=[f"{r.get('kernel')} {r.get('tensor', '')} {r['status']}".strip()
                                        for r in corr if r["status"] not in ("ok", "skipped")]))
    for kind, field in (("gemm", "tflops"), ("copy", "tbps")):
        got = [r for r in records if r["kind"] == kind and r["status"] == "ok"]
        out[f"{kind}_{field}"] = got[-1][field] if got else None
    attn = [r for r in records if r["kind"] == "attention" and r["status"] == "ok"]
    dense = {}
    for r in attn:
        if r["provider"].startswith("sdpa"):
            key = (r["s"], r["mode"])
            if key not in dense or r["median_ms"] < dense[key]["median_ms"]:
                dense[key] = r
    rows = []
    for r in attn:
        if r["provider"] != "moba-triton" or r["mode"] == "gate":
            continue
        gate = next((g for g in attn if g["provider"] == "moba-triton" and g["mode"] == "gate" and g["s"] == r["s"]
                     and g["block_size"] == r["block_size"] and g["top_k"] == r["top_k"]), None)
        base = dense.get((r["s"], r["mode"]))
        rows.append(dict(
            s=r["s"], block_size=r["block_size"], top_k=r["top_k"], mode=r["mode"], moba_ms=r["median_ms"],
            dense=base["provider"] if base else None, dense_ms=base["median_ms"] if base else None,
            speedup=base["median_ms"] / r["median_ms"] if base else None,
            gate_share=gate["median_ms"] / r["median_ms"] if gate and r["mode"] == "fwd" else None,
            mem_ratio=(r["peak_mib"] / base["peak_mib"]) if base and r.get("peak_mib") and base.get("peak_mib") else None,
        ))
    out["attention"] = rows
    out["steps"] = {r["step"]: r["status"] for r in records if r["kind"] == "step"}
    return out


def print_summary(summary: dict, fake: bool) -> None:
    print("=" * 100)
    print("device_check summary" + ("  (DRY RUN: fake timers, CPU interpreter, tiny shapes: no number means anything)"
                                    if fake else ""))
    print("steps: " + ", ".join(f"{k}={v}" for k, v in summary["steps"].items()))
    c = summary["correctness"]
    print(f"correctness: {c['ok']} ok, failed: {c['failed'] or 'none'}")
    if summary["gemm_tflops"] is not None or summary["copy_tbps"] is not None:
        g, cp = summary["gemm_tflops"], summary["copy_tbps"]
        print(f"ceilings: bf16 GEMM {g if g is None else round(g, 1)} TFLOP/s, copy {cp if cp is None else round(cp, 2)} TB/s")
    print(f"{'setting':>9} {'S':>8} {'mode':>8} {'moba ms':>10} {'dense ms':>10} {'speedup':>8} {'gate/fwd':>8} {'mem x':>6}")
    for r in summary["attention"]:
        def f(x, spec):
            return "-" if x is None else format(x, spec)
        print(f"{r['block_size']:>5}/k{r['top_k']:<2} {r['s']:>8} {r['mode']:>8} {f(r['moba_ms'], '.3f'):>10} "
              f"{f(r['dense_ms'], '.3f'):>10} {f(r['speedup'], '.2f'):>8} {f(r['gate_share'], '.0%'):>8} "
              f"{f(r['mem_ratio'], '.2f'):>6}")


# ----------------------------------------------------------------------------- driver
def run_step(name: str, args) -> int:
    """Child process: one step, records appended to the JSONL file."""
    fake = args.dry_run
    rec = Recorder(Path(args.out) / "device_check.jsonl", name, args.t0)
    clock = Clock(fake, args.deadline)
    try:
        STEP_FNS[name](rec, config(args.dry_run), args.dry_run, clock)
    except Exception as e:  # noqa: BLE001
        rec("step-error", status="error", error=_err(e), traceback=traceback.format_exc()[-3000:])
        return 1
    return 0


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return RESULTS / f"device-check-{utc_stamp()}"


def build_parser():
    p = make_parser(__doc__, "bench.device_check")
    p.add_argument("--budget_s", type=cli.positive_float, default=480.0, help="total seconds for every step")
    p.add_argument("--out", default=None, help="results folder (default: $OUT, else bench/results/device-check-<time>)")
    p.add_argument("--dry_run", action="store_true", help="CPU, Triton interpreter, tiny shapes, fake timers")
    p.add_argument("--steps", type=cli.names(STEPS, "step"), default=list(STEPS),
                   help=f"comma list, run in this order: {','.join(STEPS)}")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.step:
        sys.exit(run_step(args.step, args))

    t0 = time.time()
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "device_check.jsonl"
    steps = args.steps
    deadline = t0 + args.budget_s
    estimate = DRY_ESTIMATE_S if args.dry_run else STEP_ESTIMATE_S
    rec = Recorder(jsonl, "driver", t0)
    rec("start", status="ok", argv=sys.argv, budget_s=args.budget_s, dry_run=args.dry_run, steps=steps)
    print(f"device_check: {len(steps)} steps, budget {args.budget_s:.0f} s, results -> {jsonl}", flush=True)
    for name in steps:
        left = deadline - time.time()
        step_rec = Recorder(jsonl, name, t0)
        if left < estimate[name]:
            step_rec("step", status="skipped", reason=f"budget: {left:.0f} s left, step needs ~{estimate[name]} s")
            print(f"[{time.time() - t0:6.0f} s] {name}: skipped (budget)", flush=True)
            continue
        print(f"[{time.time() - t0:6.0f} s] {name} ...", flush=True)
        cmd = [sys.executable, "-m", "bench.device_check", "--step", name, "--out", str(out),
               "--deadline", str(deadline), "--t0", str(t0)] + (["--dry_run"] if args.dry_run else [])
        started = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(args.dry_run), timeout=min(max(1.0, left), MAX_STEP_TIMEOUT_S),
                                  capture_output=True, text=True)
            status = "ok" if proc.returncode == 0 else "fail"
            tail = (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired as e:
            status, tail = "timeout", str(e.stderr or "")[-2000:]
        step_rec("step", status=status, seconds=round(time.time() - started, 1), log_tail=tail if status != "ok" else "")
        print(f"[{time.time() - t0:6.0f} s] {name}: {status} ({time.time() - started:.0f} s)", flush=True)
        if status != "ok" and tail:
            print(tail[-800:], flush=True)
    records = read_records(jsonl)
    summary = summarize(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print_summary(summary, args.dry_run)
    return summary


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "bench.device_check"))
