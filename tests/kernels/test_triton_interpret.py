"""Triton kernels on CPU in the Triton interpreter: the driver.

Triton decides interpreter mode when a kernel is *decorated* (import time), so setting
TRITON_INTERPRET=1 from a test is too late once anything imported the kernels, and setting
it for the whole session would turn the GPU tests into interpreter runs. So this test runs
``tests/kernels/test_triton_interpret_cases.py`` (kernels vs the dense reference, the gate, the
custom ops, torch.compile) in a subprocess with TRITON_INTERPRET=1. That file skips itself
in a session without TRITON_INTERPRET=1; a session started with TRITON_INTERPRET=1 runs it
directly and skips this driver.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests._subprocess import run_child

CASES = Path(__file__).with_name("test_triton_interpret_cases.py")


#: The cases are split into this many shards, each its own test, so that pytest-xdist spreads the
#: interpreter work over every worker (shard ``i`` runs the cases whose index is ``i`` mod N).
SHARDS = 4


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="already running in the interpreter")
@pytest.mark.parametrize("shard", range(SHARDS))
def test_interpreter_suite(shard):
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1", MOBA_TEST_SHARD=f"{shard}/{SHARDS}")
    cmd = [sys.executable, "-m", "pytest", str(CASES), "-q", "-x", "-p", "no:cacheprovider"]
    proc = run_child(cmd, env=env, cwd=CASES.parents[2])
    assert proc.returncode == 0, f"interpreter tests failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-3000:]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="checks the non-interpreter message")
def test_cpu_without_interpreter_gives_a_clear_reason():
    import moba
    from moba.ops.triton_impl import unavailable_reason

    reason = unavailable_reason("cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert moba.available_backends("cpu")["triton"] == reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        import torch

        q = torch.randn(1, 16, 2, 16)
        moba.moba_attn_func(q, q, q, 8, 2, backend="triton")
