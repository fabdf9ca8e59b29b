"""Plots readable at a glance: legends beside or under the data (never on it) and whole in the
saved image, runs named by what they are, accuracy axes that fit the data.

Every figure is checked as it is saved (``Figure.savefig`` is wrapped): the area the PNG keeps
is the figure, or with ``bbox_inches="tight"`` the tight box matplotlib computes from the same
arguments; every legend must lie inside it and outside every axes' data area.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402

from scaling_runs import eval_budget  # noqa: E402
from scaling_runs.fit import fit_sweep, plot_study, study_summary  # noqa: E402
from scaling_runs.presets import ARMS  # noqa: E402


def _legend_problems(fig: Figure, kwargs: dict) -> list[str]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    if kwargs.get("bbox_inches") == "tight":
        kept = fig.get_tightbbox(renderer, bbox_extra_artists=kwargs.get("bbox_extra_artists"))
        kept = kept.transformed(fig.dpi_scale_trans)
    else:
        kept = fig.bbox
    problems = []
    legends = [leg for leg in fig.findobj(Legend) if leg.get_visible()]
    for leg in legends:
        box = leg.get_window_extent(renderer)
        name = leg.get_title().get_text() or (leg.get_texts()[0].get_text() if leg.get_texts() else "?")
        if box.x0 < kept.x0 - 1 or box.y0 < kept.y0 - 1 or box.x1 > kept.x1 + 1 or box.y1 > kept.y1 + 1:
            problems.append(f"legend {name!r} is cut off: {box.bounds} outside the saved area {kept.bounds}")
        for ax in fig.axes:
            if box.overlaps(ax.get_window_extent(renderer)):
                problems.append(f"legend {name!r} covers the data of the axes {ax.get_title() or ax.get_ylabel()!r}")
    return problems


@pytest.fixture
def saved_figures(monkeypatch):
    """[(path, legend problems, legend texts)] of every figure saved during the test."""
    seen = []
    original = Figure.savefig

    def savefig(fig, *args, **kwargs):
        texts = [t.get_text() for leg in fig.findobj(Legend) for t in leg.get_texts()]
        seen.append((str(args[0]) if args else "", _legend_problems(fig, kwargs), texts))
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


def _study_points():
    rng = np.random.default_rng(1)
    pts = []
    for i, size in enumerate(["s1", "s2", "s3", "s4"]):
        for arm, shift in (("full", 1.0), ("moba", 1.002), ("local", 1.05), ("random", 1.03)):
            for seed in range(3):
                c = 1e-9 * 4**i
                loss = shift * 3 * c**-0.05 * (1 + 0.003 * rng.standard_normal())
                pts.append({"size": size, "arm": arm, "seed": seed, "val_loss": loss, "trailing_loss": loss * 0.95,
                            "pflops_days": c, "attn_aware_pflops_days": c * (1.1 if arm == "full" else 1.03)})
    return pts


def test_study_plots_keep_legends_off_the_data(tmp_path, saved_figures):
    spars = {a: 0.7 for a in ARMS} | {"full": 0.0}
    _, details = study_summary(_study_points(), "s4", spars, n_boot=50)
    plot_study(_study_points(), details, tmp_path, 512, 32)
    assert [p.rsplit("/", 1)[-1] for p, _, _ in saved_figures] == ["scaling.png", "ratios.png"]
    for path, problems, texts in saved_figures:
        assert not problems, f"{path}: {problems}"
        assert any("Local" in t for t in texts) and any("Random" in t for t in texts), texts


def _write_run(root, name, model, cs, losses, arm=None):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "attention_kind": model["attention"], "params": {"non_embedding": 1000},
        "model": {"context": 512, "top_k": 3, "block_selection": "gate", **model}, "train": {"trailing_frac": 0.25}}))
    rows = [{"step": i + 1, "tokens": 1000 * (i + 1), "pflops_days": float(c), "attn_aware_pflops_days": float(c),
             "val_loss": float(v), "trailing_loss": float(v)} for i, (c, v) in enumerate(zip(cs, losses, strict=True))]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "DONE").write_text("{}")
    if arm is not None:
        (d / "study_run.json").write_text(json.dumps({"size": "s1", "arm": arm, "seed": 0}))


@pytest.mark.parametrize("with_marker", [True, False], ids=["study_run.json", "config only"])
def test_fit_names_the_study_arms(tmp_path, saved_figures, with_marker):
    """A study's local (top-1) and random-block runs have MoBA cores but are not MoBA."""
    models = {"full": {"attention": "full"}, "moba": {"attention": "moba"},
              "local": {"attention": "moba", "top_k": 1}, "random": {"attention": "moba", "block_selection": "random"}}
    c = np.logspace(-9, -7, 8)
    for shift, (arm, model) in enumerate(models.items()):
        for size, scale in (("s1", 1.0), ("s2", 0.97)):
            _write_run(tmp_path, f"{size}-{arm}-seed0", model, c, (2.5 + 0.05 * shift) * scale * (c / 1e-9) ** -0.05,
                       arm if with_marker else None)
    fits = fit_sweep(tmp_path, skip_frac=0.0)
    assert set(fits["lm_loss"]) == set(models)
    assert {r["name"].split("-")[1]: r["kind"] for r in fits["runs"]} == {a: a for a in models}
    assert len(saved_figures) == 3
    for path, problems, texts in saved_figures:
        assert not problems, f"{path}: {problems}"
        joined = " | ".join(texts)
        assert "Local (top-1, own block)" in joined and "Random blocks (MoBA budget)" in joined, joined
        assert sum(t.startswith("MoBA") for t in texts) <= 2, texts  # MoBA's runs and its fit, nothing else


def test_roofline_legends_are_whole(tmp_path, saved_figures):
    from bench import roofline

    roofline.main(["--out", str(tmp_path / "model.png")])
    points = {"points": [{"name": f"decode {m} (gamma=4)", "flops": 1e9, "bytes": 2e8 * (i + 1), "seconds": 1e-2}
                         for i, m in enumerate(("plain", "speculative", "staged", "tree"))]}
    (tmp_path / "points.json").write_text(json.dumps(points))
    roofline.main([str(tmp_path / "points.json"), "--no-model", "--out", str(tmp_path / "gen.png")])
    assert len(saved_figures) == 2
    for path, problems, _ in saved_figures:
        assert not problems, f"{path}: {problems}"


@pytest.mark.parametrize("values,expected", [
    ([0.0, 0.0, 0.0], (0.0, 10.0)),          # all zero: reads as zero, not a zoom into -1%..2%
    ([float("nan"), 0.0], (0.0, 10.0)),
    ([1.5, 2.0], (0.0, 10.0)),
    ([55.0, 30.0], (0.0, 60.0)),
    ([99.2, 18.8], (0.0, 100.0)),
    ([100.0], (0.0, 100.0)),
])
def test_accuracy_axis_fits_the_data(values, expected):
    assert eval_budget.accuracy_ylim(values) == expected


def test_budget_sweep_chart_of_zero_accuracy_starts_at_zero(tmp_path, monkeypatch):
    """The CPU preset's long tasks score 0% at every budget: the chart shows 0-10%, never below 0."""
    limits = []
    original = Figure.savefig

    def savefig(fig, *args, **kwargs):
        if str(args[0]).endswith("performance_vs_budget.png"):
            limits.append(fig.axes[0].get_ylim())
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    rows = [{"mode": "moba", "name": f"budget {b}", "budget": b, "accuracy": 0.0,
             "by_task": {"passkey": {"accuracy": 0.0}}} for b in (32, 64, 128)]
    record = {"results": rows + [{"mode": "full", "name": "full", "budget": 256, "accuracy": 0.0}],
              "settings": {"tasks": ["passkey"]}}
    eval_budget.make_plots(record, tmp_path)
    assert limits == [(0.0, 10.0)]
