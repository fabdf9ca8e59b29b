"""bench/device_check.py checks itself: --dry-run runs every step on the CPU (Triton interpreter,
tiny shapes, fake timers, nothing installed); the budget skips steps; the summary is built from
the JSON lines alone, so a run cut short still summarises what it did."""

from __future__ import annotations

import json
import os
import sys

from bench import device_check as dc
from tests._helpers import ROOT
from tests._subprocess import run_child


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return run_child([sys.executable, "-m", "bench.device_check", *args], cwd=ROOT, env=env)


def test_dry_run_runs_every_step(tmp_path):
    # an unlimited budget: on a slow machine the default one would skip steps (that is its job)
    proc = _run("--dry-run", "--out", str(tmp_path), "--budget-s", "1e9")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = dc.read_records(tmp_path / "device_check.jsonl")
    steps = {r["step"]: r["status"] for r in records if r["kind"] == "step"}
    assert steps == {name: "ok" for name in dc.STEPS}, steps
    assert not [r for r in records if r["status"] in ("error", "fail")], [r for r in records if r["status"] != "ok"][:3]
    kinds = {r["kind"] for r in records}
    assert {"install", "import", "correctness", "gemm", "copy", "attention", "profile"} <= kinds
    # every kernel family was checked against the torch path
    checked = {r["kernel"] for r in records if r["kind"] == "correctness"}
    assert checked == {"gate", "attention-union", "attention-gather", "decode"}
    gate = [r for r in records if r["kind"] == "correctness" and r["kernel"] == "gate"]
    assert all(r["fallback_tiles"] is None or 0 <= r["fallback_tiles"] <= 1 for r in gate)
    modes = {(r["provider"], r["mode"]) for r in records if r["kind"] == "attention"}
    assert {("moba-triton", "gate"), ("moba-triton", "fwd"), ("moba-triton", "fwd+bwd"),
            ("sdpa-flash", "fwd"), ("sdpa-cudnn", "fwd+bwd")} <= modes
    # the summary is printed last and saved
    out = proc.stdout
    assert out.index("device_check summary") > out.index("profile: ok")  # printed after every step
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["correctness"]["failed"] == [] and summary["correctness"]["ok"] > 0
    assert {(r["block_size"], r["top_k"], r["mode"]) for r in summary["attention"]} == {
        (32, 2, "fwd"), (32, 2, "fwd+bwd"), (16, 3, "fwd"), (16, 3, "fwd+bwd")}
    assert all(r["speedup"] == 1.0 for r in summary["attention"])  # fake timers: 1 ms everywhere


def test_budget_skips_steps_and_still_summarises(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path), "--budget-s", "0.5", "--steps", "ceilings,profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = dc.read_records(tmp_path / "device_check.jsonl")
    steps = {r["step"]: r for r in records if r["kind"] == "step"}
    assert {k: r["status"] for k, r in steps.items()} == {"ceilings": "skipped", "profile": "skipped"}
    assert "budget" in steps["ceilings"]["reason"]
    assert "device_check summary" in proc.stdout


def test_summary_from_partial_records(tmp_path):
    """A run killed mid-way: the lines written so far (and a cut last line) still summarise."""
    path = tmp_path / "device_check.jsonl"
    lines = [
        dict(step="attention", kind="attention", status="ok", provider="sdpa-flash", s=32768, mode="fwd",
             median_ms=10.0, peak_mib=100.0),
        dict(step="attention", kind="attention", status="ok", provider="sdpa-cudnn", s=32768, mode="fwd",
             median_ms=8.0, peak_mib=120.0),
        dict(step="attention", kind="attention", status="ok", provider="moba-triton", s=32768, mode="gate",
             block_size=512, top_k=3, median_ms=1.0),
        dict(step="attention", kind="attention", status="ok", provider="moba-triton", s=32768, mode="fwd",
             block_size=512, top_k=3, median_ms=2.0, peak_mib=60.0),
        dict(step="correctness", kind="correctness", status="fail", kernel="attention-gather", tensor="dq"),
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": "attention", "kind": "atten')
    summary = dc.summarize(dc.read_records(path))
    (row,) = summary["attention"]
    assert row["dense"] == "sdpa-cudnn" and row["speedup"] == 4.0 and row["gate_share"] == 0.5
    assert row["mem_ratio"] == 0.5
    assert summary["correctness"]["failed"] == ["attention-gather dq fail"]
