"""bench.context_parallel without the measured part: gate statistics and the labelled model."""

from __future__ import annotations

import json

from tests._helpers import ROOT


def test_model_and_selection_statistics(tmp_path):
    from bench.context_parallel import main

    result = main(["--skip_measure", "--selection_seqlen", "2048", "--selection_worlds", "8",
                   "--model_seqlens", "1m", "--model_worlds", "8,32", "--out", str(tmp_path)])
    assert result["measured"] == [] and "MODELLED" in result["meta"]["note"]
    kinds = {r["keys"] for r in result["selection"]}
    assert kinds == {"random", "heavy"}
    assert all(0.0 <= r["fetched_fraction_max"] <= 1.0 for r in result["selection"])
    at32 = next(r for r in result["modelled"] if r["world"] == 32)
    assert at32["auto_vs_ring"]["random"] <= 0.25  # the target at 1M tokens, 32 ranks
    text = (tmp_path / "context_parallel.md").read_text()
    assert "MODELLED" in text and json.loads((tmp_path / "context_parallel.json").read_text())["modelled"]


def test_committed_results_are_labelled():
    folder = ROOT / "bench" / "results" / "cpu-context-parallel-2026-12-07"
    data = json.loads((folder / "context_parallel.json").read_text())
    assert "MODELLED" in data["meta"]["note"] and data["measured"] and data["modelled"]
    assert "MODELLED" in (folder / "context_parallel.md").read_text()
