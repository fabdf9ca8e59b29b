"""Compute frontier (lower envelope) and power-law fits of scaling_runs.fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scaling_runs.fit import fit_power_law, fit_sweep, lower_envelope
from tests._helpers import capture_figures


def test_lower_envelope_by_hand():
    c1 = (np.array([1.0, 2.0, 4.0]), np.array([10.0, 8.0, 6.0]))
    c2 = (np.array([2.0, 4.0, 8.0]), np.array([9.0, 5.0, 3.0]))
    x, y = lower_envelope([c1, c2])
    np.testing.assert_allclose(x, [1, 2, 4, 8])
    np.testing.assert_allclose(y, [10, 8, 5, 3])
    # a curve between grid points is interpolated linearly in log-log
    c3 = (np.array([1.0, 4.0]), np.array([4.0, 1.0]))  # L = 4 / C: exactly 2 at C = 2
    x, y = lower_envelope([c1, c3])
    np.testing.assert_allclose(y, [4.0, 2.0, 1.0])


def test_lower_envelope_is_below_every_curve_and_touches_one():
    rng = np.random.default_rng(0)
    curves = []
    for _ in range(6):
        x = np.sort(rng.uniform(0, 3, size=8))
        x = 10 ** np.unique(x)
        y = 5 * x ** -0.1 * rng.uniform(1.0, 1.5, size=x.size)
        curves.append((x, y))
    gx, gy = lower_envelope(curves)
    for x, y in curves:
        at = np.searchsorted(gx, x)
        assert np.all(gy[at] <= y + 1e-12)
    # every envelope value at a curve's own point equals some curve's value there or below it
    points = {(float(a), float(b)) for x, y in curves for a, b in zip(x, y, strict=True)}
    for a, b in zip(gx, gy, strict=True):
        own = [pb for pa, pb in points if pa == a]
        assert b <= min(own) + 1e-12


def test_fit_recovers_exact_power_law():
    c = np.logspace(-3, 1, 20)
    f = fit_power_law(c, 2.5 * c ** -0.07)
    assert f["a"] == pytest.approx(2.5, rel=1e-9)
    assert f["b"] == pytest.approx(-0.07, rel=1e-9)
    assert f["r2"] == pytest.approx(1.0)


def _write_run(root, name, kind, cs, losses, trailing):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "attention_kind": kind, "params": {"non_embedding": 1000},
        "model": {"attention": kind, "context": 256}, "train": {"trailing_frac": 0.25}}))
    rows = [{"step": i + 1, "tokens": 1000 * (i + 1), "pflops_days": float(c), "attn_aware_pflops_days": float(c),
             "val_loss": float(l), "trailing_loss": float(t)} for i, (c, l, t) in enumerate(zip(cs, losses, trailing, strict=True))]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "DONE").write_text("{}")


def test_fit_sweep_recovers_known_law_on_frontier(tmp_path):
    laws = {"moba": (2.6, -0.06, 1.5, -0.11), "full": (2.5, -0.05, 1.4, -0.09)}
    for kind, (a, b, ta, tb) in laws.items():
        # two runs on the law (different compute ranges) and one worse run over the whole range
        for name, lo, hi, penalty in (("small", -3, -1.5, 1.0), ("large", -2, 0, 1.0), ("bad", -3, 0, 1.3)):
            c = np.logspace(lo, hi, 12)
            _write_run(tmp_path, f"{name}-{kind}", kind, c, penalty * a * c ** b, penalty * ta * c ** tb)
    fits = fit_sweep(tmp_path, skip_frac=0.0)
    for kind, (a, b, ta, tb) in laws.items():
        assert fits["lm_loss"][kind]["a"] == pytest.approx(a, rel=1e-6)
        assert fits["lm_loss"][kind]["b"] == pytest.approx(b, rel=1e-6)
        assert fits["trailing_loss"][kind]["a"] == pytest.approx(ta, rel=1e-6)
        assert fits["trailing_loss"][kind]["b"] == pytest.approx(tb, rel=1e-6)
    saved = json.loads((tmp_path / "fit.json").read_text())
    assert set(saved["lm_loss"]) == {"moba", "full"} and saved["frontier"]["lm_loss"]["moba"]
    for name in ("lm_loss.png", "trailing_loss.png", "projections.png"):
        assert (tmp_path / name).stat().st_size > 1000


# ----------------------------------------------------------------------------- readable plots
def test_fit_plots_have_readable_log_ticks(tmp_path, monkeypatch):
    """Loss axes read 2, 3, 4 and compute axes 1e-7 ..., never matplotlib's 10^x / 2x10^0 mathtext."""
    for kind, a in (("moba", 2.6), ("full", 2.5)):
        c = np.logspace(-8, -6, 12)  # PFLOP/s-days of small CPU runs
        _write_run(tmp_path, f"r-{kind}", kind, c, a * (c / 1e-8) ** -0.1, 1.2 * a * (c / 1e-8) ** -0.1)
    figures = capture_figures(monkeypatch)
    fit_sweep(tmp_path, skip_frac=0.0)
    assert {Path(f["path"]).name for f in figures} == {"lm_loss.png", "trailing_loss.png", "projections.png"}
    main_axes = [ax for f in figures for ax in f["axes"] if ax["ax"].get_yscale() == "log"]
    assert len(main_axes) == 4
    for ax in main_axes:
        labels = ax["ticks"]["x"] + ax["ticks"]["y"] + ax["ticks"]["x_minor"] + ax["ticks"]["y_minor"]
        assert labels and not [t for t in labels if "$" in t or "10^" in t], labels
        assert ax["ticks"]["x_minor"] == [] and ax["ticks"]["y_minor"] == []
        assert "1e-7" in ax["ticks"]["x"]
        # a loss axis spanning less than a decade still gets several plain labels
        ys = [float(t) for t in ax["ticks"]["y"]]
        assert len(ys) >= 2 and all(1 <= y <= 10 for y in ys)
