"""bench/gate_fallback.py: the gate's float32-fallback share on synthetic keys (run here under the
Triton interpreter, in a subprocess so TRITON_INTERPRET=1 is set before Triton is imported)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests._helpers import ROOT
from tests._subprocess import run_child


def _run(*args, interpret=True):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return run_child([sys.executable, "-m", "bench.gate_fallback", *args], cwd=ROOT, env=env)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU path (interpreter) only")
def test_counts_fallbacks_and_checks_agreement(tmp_path):
    out = tmp_path / "g.json"
    proc = _run("--seqlen", "256", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--settings", "16/3",
                "--dtypes", "fp16,bf16", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["device"] == "CPU (Triton interpreter)"
    rows = data["rows"]
    assert {(r["keys"], r["dtype"]) for r in rows} == {(k, d) for k in ("iid", "offset", "common") for d in ("fp16", "bf16")}
    for r in rows:
        assert r["programs"] == 4 * 2  # 64-row tiles x heads
        assert 0 <= r["fallback_programs"] <= r["programs"] and r["fallback_share"] == r["fallback_programs"] / 8
        assert r["differ_only_at_float32_ties"], r  # any difference from the torch gate is a float32 tie


def test_refuses_without_a_gpu_or_the_interpreter():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    proc = _run("--seqlen", "256", interpret=False)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr


@pytest.mark.parametrize("args,message", [(["--settings", "16/1"], "top-k must be >= 2"), (["--settings", "16x3"], "ambiguous"), (["--dtypes", "fp32"], "bf16"),
                                          (["--keys", "nope"], "iid"), (["--heads", "3", "--kv-heads", "2"], "multiple")])
def test_bad_options_are_usage_errors(args, message):
    proc = _run("--seqlen", "256", *args)
    assert proc.returncode != 0 and message in proc.stderr
