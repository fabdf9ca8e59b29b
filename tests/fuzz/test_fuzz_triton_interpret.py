"""Driver of ``test_fuzz_triton_interpret_cases.py``: the Triton fuzzer in a subprocess with
TRITON_INTERPRET=1 (Triton picks the interpreter at import time; see
``tests/kernels/test_triton_interpret.py``). The fuzz settings (MOBA_FUZZ_*, see ``tests._helpers.fuzz_settings``) pass through."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests._subprocess import run_child

CASES = Path(__file__).with_name("test_fuzz_triton_interpret_cases.py")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="already running in the interpreter")
def test_triton_fuzzer_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    cmd = [sys.executable, "-m", "pytest", str(CASES), "-q", "-x", "-p", "no:cacheprovider", "-p", "no:logging"]
    if os.environ.get("MOBA_FUZZ_SEED"):  # make fuzz: this round's seed
        cmd.append(f"--hypothesis-seed={os.environ['MOBA_FUZZ_SEED']}")
    proc = run_child(cmd, env=env, cwd=CASES.parents[2])
    assert proc.returncode == 0, f"Triton fuzzer failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-3000:]
