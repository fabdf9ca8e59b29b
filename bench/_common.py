"""What every bench tool records and shares: run metadata (git state, device, versions, date),
the out-of-memory test, the dense SDPA runner and the command-line parser.

Only the standard library at import: ``device_check`` imports this before torch is installed.
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import time
from pathlib import Path

from moba._core import cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """The current UTC time as ``YYYYmmdd-HHMMSS`` (folder names)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def _git(*args: str, cwd: Path = HERE) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(*paths: str, cwd: Path = HERE) -> dict:
    """``{"git_commit": HEAD or None, "git_dirty": uncommitted changes to tracked files}``;
    with ``paths`` (relative to the repository root), dirty means changes under those paths only."""
    # ":/" anchors a pathspec at the repository root (git runs in bench/)
    status = ["status", "--porcelain", "--untracked-files=no"] + (["--", *(f":/{p}" for p in paths)] if paths else [])
    return {"git_commit": _git("rev-parse", "HEAD", cwd=cwd), "git_dirty": bool(_git(*status, cwd=cwd))}


def package_version(module: str) -> str | None:
    """``module.__version__`` ("unknown" without one), or None when it does not import."""
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001  (a broken optional package is "not there")
        return None


def device_name(device) -> str:
    """The GPU's name for a CUDA device, else ``"CPU <model name>"``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            proc = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), proc)
    except OSError:
        pass
    return f"CPU {proc}"


def is_oom(err: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA, or the CPU allocator's)."""
    import torch

    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


#: SDPA backends that refused ``enable_gqa``: K/V are repeated for them instead (costs memory).
_SDPA_NO_GQA: set[str] = set()


def sdpa(q, k, v, causal: bool = True, backend: str | None = None):
    """torch SDPA in flash-attn layout (B, S, H, D), optionally pinned to one backend
    (an ``SDPBackend`` name: "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH").

    GQA uses ``enable_gqa`` (no copy of K/V); a backend that rejects it gets K/V repeated
    to the query heads (inside the timed call: that is what using it costs).
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[2] // k.shape[2]

    def run(kk, vv, gqa):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=causal, enable_gqa=gqa,
        ).transpose(1, 2)

    if backend is None:
        return run(k, v, group > 1)
    with sdpa_kernel(getattr(SDPBackend, backend)):
        if group > 1 and backend not in _SDPA_NO_GQA:
            try:
                return run(k, v, True)
            except RuntimeError as e:
                if is_oom(e):
                    raise
                _SDPA_NO_GQA.add(backend)
        if group > 1:
            return run(k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2), False)
        return run(k, v, False)


def make_parser(doc: str | None, prog: str | None = None) -> cli.Parser:
    """The parser every bench tool uses: ``moba._core.cli.Parser`` (the command-line convention
    shared with ``scaling_runs``: underscores, dashes accepted, no abbreviations, typo
    suggestions, defaults shown, ``--debug``). ``prog``: the module, e.g. ``"bench.roofline"``."""
    return cli.Parser(f"python -m {prog}" if prog else None, doc)


def time_call_ms(fn, device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on a GPU (the call's kernels, measured
    on the stream), ``time.perf_counter`` elsewhere."""
    import torch

    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


#: argparse types: a token count ('8k' -> 8192, '1m' -> 1048576, '1.5k' -> 1536) and a comma list of them
parse_size = cli.size
parse_sizes = cli.size_list
