"""Power-law fits and plots of a sweep: ``python -m scaling_runs.fit SWEEP_DIR [--skip_frac 0.3]``.

For every attention kind (moba, full, hybrid; a study's control arms ``local`` and ``random``
keep their own names, see ``run_kind``) and both metrics (``lm_loss`` = val_loss over
all positions, ``trailing_loss`` = loss of the last ``trailing_frac`` of positions):

1. curves: every run's (C, loss) from metrics.jsonl, C in PFLOP/s-days (6 N D by default,
   ``--x attn_aware`` for the attention-aware count); the first ``skip_frac`` of each run's
   tokens is dropped (warmup transient, not a power law);
2. compute frontier = lower envelope of the curves: at every C where some run has a point,
   the minimum over runs whose C range covers it of the run's loss, interpolated linearly in
   log-log between its evaluations (``lower_envelope``);
3. fit ``L = a * C^b`` by least squares on (log C, log L) of the frontier points.

Writes ``SWEEP_DIR/fit.json`` ({"lm_loss": {"moba": {"a", "b", ...}, "full": {...}},
"trailing_loss": {...}, "frontier": ..., "x": ...}) and PNGs in the style of the MoBA paper's
figures: ``lm_loss.png``, ``trailing_loss.png`` (log-log, x "PFLOP/s-days", every run solid,
each kind's projection dashed and labelled with its formula, legend beside the axes) and
``projections.png`` (both projections and their MoBA / full ratio).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .plotting import readable_log_axis

# Attention kinds of a sweep, plus the study's control arms (``presets.ARMS``): a study's
# ``local`` and ``random`` runs have MoBA cores but are not MoBA, so they get their own name.
KIND_LABEL = {"moba": "MoBA", "full": "Full Attention", "hybrid": "Hybrid",
              "local": "Local (top-1, own block)", "random": "Random blocks (MoBA budget)"}
KIND_COLOR = {"moba": "tab:blue", "full": "tab:red", "hybrid": "tab:purple", "local": "tab:gray",
              "random": "tab:green"}
KIND_CMAP = {"moba": "Blues", "full": "Reds", "hybrid": "Purples", "local": "Greys", "random": "Greens"}
METRICS = {"lm_loss": "val_loss", "trailing_loss": "trailing_loss"}


def run_kind(cfg: dict, folder: Path) -> str:
    """What a run folder's attention is: a study run's arm (``study_run.json``, or the control
    arm of ``presets.ARMS`` whose settings its model config has), else its attention kind."""
    from .presets import ARMS

    marker = Path(folder) / "study_run.json"
    if marker.exists():
        arm = json.loads(marker.read_text()).get("arm")
        if arm in KIND_LABEL:
            return arm
    model = cfg["model"]
    kind = cfg.get("attention_kind", model["attention"])
    if kind == "moba":
        for arm, settings in ARMS.items():
            if arm not in ("moba", "full") and all(model.get(key) == value for key, value in settings.items()):
                return arm
    return kind


def load_runs(sweep_dir: Path) -> list[dict]:
    """Every run folder under ``sweep_dir`` that has config.json and metrics.jsonl."""
    runs = []
    for cfg_path in sorted(Path(sweep_dir).glob("*/config.json")):
        folder = cfg_path.parent
        mpath = folder / "metrics.jsonl"
        if not mpath.exists():
            continue
        rows = []
        for line in mpath.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if not rows:
            continue
        cfg = json.loads(cfg_path.read_text())
        runs.append({"name": folder.name, "kind": run_kind(cfg, folder),
                     "params": cfg.get("params", {}).get("non_embedding"), "rows": rows,
                     "done": (folder / "DONE").exists(), "context": cfg["model"]["context"],
                     "trailing_frac": cfg["train"]["trailing_frac"]})
    return runs


def run_curve(run: dict, metric: str, x: str = "pflops_days", skip_frac: float = 0.3):
    """(C, loss) arrays of one run, without its first ``skip_frac`` of tokens."""
    rows = run["rows"]
    final_tokens = max(r["tokens"] for r in rows)
    keep = [r for r in rows if r["tokens"] >= skip_frac * final_tokens and r.get(METRICS[metric]) is not None]
    xs = np.array([r[x] for r in keep], dtype=float)
    ys = np.array([r[METRICS[metric]] for r in keep], dtype=float)
    order = np.argsort(xs)
    return xs[order], ys[order]


def lower_envelope(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Lower envelope of curves (x ascending, positive): at every x of any curve, the minimum of
    the curves defined there (log-log linear interpolation between a curve's points)."""
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if not curves:
        return np.zeros(0), np.zeros(0)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    best = np.full(grid.shape, np.inf)
    for x, y in curves:
        inside = (grid >= x[0]) & (grid <= x[-1])
        if len(x) == 1:
            vals = np.where(grid == x[0], y[0], np.inf)
        else:
            vals = np.full(grid.shape, np.inf)
            vals[inside] = np.exp(np.interp(np.log(grid[inside]), np.log(x), np.log(y)))
        best = np.minimum(best, vals)
    return grid, best


def fit_power_law(x, y) -> dict:
    """Least squares of log L = log a + b log C; returns {"a", "b", "r2", "n_points"}."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if lx.size < 2:
        raise ValueError("need at least two points to fit a power law")
    b, log_a = np.polyfit(lx, ly, 1)
    pred = log_a + b * lx
    ss_res = float(((ly - pred) ** 2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    return {"a": float(np.exp(log_a)), "b": float(b), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "n_points": int(lx.size)}


def formula(fit: dict) -> str:
    return f"{fit['a']:.4g} C^{fit['b']:.4f}"


def fit_runs(runs: list[dict], x: str = "pflops_days", skip_frac: float = 0.3) -> dict:
    out: dict = {"x": x, "skip_frac": skip_frac, "units": "PFLOP/s-days"}
    frontier: dict = {}
    for metric in METRICS:
        out[metric] = {}
        frontier[metric] = {}
        for kind in sorted({r["kind"] for r in runs}):
            curves = [run_curve(r, metric, x, skip_frac) for r in runs if r["kind"] == kind]
            fx, fy = lower_envelope(curves)
            if fx.size < 2:
                continue
            out[metric][kind] = fit_power_law(fx, fy)
            frontier[metric][kind] = [[float(a), float(b)] for a, b in zip(fx, fy, strict=True)]
    out["frontier"] = frontier
    return out


def _ylabel(metric: str, runs: list[dict]) -> str:
    ctx = runs[0]["context"] if runs else "?"
    if metric == "lm_loss":
        return f"LM loss ({ctx} ctx)"
    frac = runs[0]["trailing_frac"] if runs else 0
    return f"Trailing LM loss (last {int(round(frac * ctx)) if runs else '?'} of {ctx})"


def plot(sweep_dir: Path, runs: list[dict], fits: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = fits["x"]
    xlabel = "PFLOP/s-days" if x == "pflops_days" else "PFLOP/s-days (attention-aware)"
    paths = []
    kinds = sorted({r["kind"] for r in runs}, key=lambda k: list(KIND_LABEL).index(k))
    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(7, 5))
        for kind in kinds:
            mine = sorted([r for r in runs if r["kind"] == kind], key=lambda r: r["params"] or 0)
            cmap = plt.get_cmap(KIND_CMAP[kind])
            for i, r in enumerate(mine):
                xs, ys = run_curve(r, metric, x, 0.0)
                shade = 0.45 + 0.5 * (i / max(1, len(mine) - 1))
                label = f"{KIND_LABEL[kind]}: {len(mine)} run(s), darker = larger" if i == len(mine) - 1 else None
                ax.plot(xs, ys, "-", color=cmap(shade), lw=1.3, alpha=0.9, label=label)
        lo = min(min(run_curve(r, metric, x, 0.0)[0]) for r in runs)
        hi = max(max(run_curve(r, metric, x, 0.0)[0]) for r in runs)
        grid = np.logspace(np.log10(lo), np.log10(hi), 100)
        for kind in kinds:
            f = fits[metric].get(kind)
            if f:
                ax.plot(grid, f["a"] * grid ** f["b"], "--", color=KIND_COLOR[kind], lw=2,
                        label=f"{KIND_LABEL[kind]} Projection: {formula(f)}")
        readable_log_axis(ax, "x")  # PFLOP/s-days: "1e-7", "3e-7", ...
        readable_log_axis(ax, "y")  # losses: "2", "3", "4"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_ylabel(metric, runs))
        ax.set_title(f"{'LM' if metric == 'lm_loss' else 'Trailing'} loss vs compute ({sweep_dir.name})")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)  # beside the data, not on it
        p = sweep_dir / f"{metric}.png"
        fig.savefig(p, dpi=130, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col", gridspec_kw={"height_ratios": [3, 1.3]})
    for col, metric in enumerate(METRICS):
        f = fits[metric]
        lo = min(min(run_curve(r, metric, x, 0.0)[0]) for r in runs)
        hi = max(max(run_curve(r, metric, x, 0.0)[0]) for r in runs)
        grid = np.logspace(np.log10(lo), np.log10(hi) + 1, 100)  # one decade of extrapolation
        ax, axr = axes[0, col], axes[1, col]
        for kind in kinds:
            if kind in f:
                ax.plot(grid, f[kind]["a"] * grid ** f[kind]["b"], "--", color=KIND_COLOR[kind], lw=2,
                        label=f"{KIND_LABEL[kind]} Projection: {formula(f[kind])}")
                fr = np.array(fits["frontier"][metric][kind])
                ax.plot(fr[:, 0], fr[:, 1], ".", color=KIND_COLOR[kind], ms=4, alpha=0.6)
        if "moba" in f and "full" in f:
            ratio = (f["moba"]["a"] * grid ** f["moba"]["b"]) / (f["full"]["a"] * grid ** f["full"]["b"])
            axr.plot(grid, ratio, "-", color="k")
            axr.axhline(1.0, color="gray", lw=0.8, ls=":")
        axr.set_ylabel("MoBA / Full")
        axr.ticklabel_format(axis="y", useOffset=False, style="plain")
        axr.set_xlabel(xlabel)
        readable_log_axis(ax, "x")  # shared with axr
        readable_log_axis(ax, "y")
        ax.set_ylabel(_ylabel(metric, runs))
        ax.grid(True, which="both", alpha=0.25)
        axr.grid(True, which="both", alpha=0.25)
        handles, labels = ax.get_legend_handles_labels()  # below the ratio panel, off the data
        axr.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.5), fontsize=7, frameon=False)
        ax.set_title("LM loss" if metric == "lm_loss" else "Trailing loss")
    p = sweep_dir / "projections.png"
    fig.savefig(p, dpi=130, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)
    return paths


def fit_sweep(sweep_dir: Path, x: str = "pflops_days", skip_frac: float = 0.3, plots: bool = True) -> dict:
    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir)
    if not runs:
        raise ValueError(f"{sweep_dir}: no runs with metrics.jsonl found")
    fits = fit_runs(runs, x, skip_frac)
    fits["runs"] = [{"name": r["name"], "kind": r["kind"], "params": r["params"], "done": r["done"],
                     "final": r["rows"][-1]} for r in runs]
    fits["plots"] = [str(p) for p in plot(sweep_dir, runs, fits)] if plots else []
    (sweep_dir / "fit.json").write_text(json.dumps(fits, indent=2))
    return fits


def print_fits(fits: dict) -> None:
    for metric in METRICS:
        for kind, f in fits[metric].items():
            print(f"{metric:>14} {KIND_LABEL[kind]:>15}: L = {formula(f)}   (C in PFLOP/s-days, "
                  f"{f['n_points']} frontier points, R^2 {f['r2']:.3f})")


def build_parser():
    from moba._core import cli

    from .cli import Parser

    parser = Parser("python -m scaling_runs.fit", __doc__)
    parser.add_argument("sweep_dir", type=cli.existing_dir,
                        help="a sweep folder (run folders with config.json and metrics.jsonl)")
    parser.add_argument("--x", default="dense", choices=("dense", "attn_aware"),
                        help="compute axis: dense 6 N D, or the attention-aware count")
    parser.add_argument("--skip_frac", type=cli.float_in(0, 1, high_open=True), default=0.3,
                        help="share of each run's tokens dropped (warmup)")
    return parser


def main(argv: list[str] | None = None) -> None:
    from moba._core import cli

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser.print_help()
        return
    a = parser.parse_args(argv)
    sweep_dir = Path(a.sweep_dir)
    x = {"attn_aware": "attn_aware_pflops_days"}.get(a.x, "pflops_days")
    if not load_runs(sweep_dir):
        raise cli.fail(f"sweep_dir {sweep_dir}: no run folders with metrics.jsonl inside (a sweep folder, "
                       "e.g. runs/cpu-tiny after `python -m scaling_runs.sweep --preset cpu-tiny`)")
    fits = fit_sweep(sweep_dir, x, a.skip_frac)
    print_fits(fits)
    print(f"wrote {sweep_dir / 'fit.json'}")
    for p in fits["plots"]:
        print(f"plot: {p}")


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "scaling_runs.fit"))


# ---------------------------------------------------------------------------------------
# studies (``scaling_runs.study``): final point per run, bootstrap CIs, paired ratios

#: Arm -> (label, color, line style, marker) of the study plots; the paper's labels for MoBA / full.
ARM_STYLE = {
    "full": ("Full Attention", "tab:red", "-", "o"),
    "moba": ("MoBA", "tab:blue", "-", "s"),
    "local": ("Local (top-1, own block)", "tab:gray", ":", "v"),
    "random": ("Random blocks (MoBA budget)", "tab:green", "-.", "^"),
}
#: Compute axes: final-row key -> axis label.
AXES = {"pflops_days": "PFLOP/s-days (6ND)", "attn_aware_pflops_days": "PFLOP/s-days (attention-aware)"}
STUDY_METRICS = {"lm": "val_loss", "trailing": "trailing_loss"}


def power_law_ci(points: dict, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """L = a * C^b on final points with a bootstrap over seeds.

    points: {group (a size): [(C, L), ...] (one per seed)}; at least two groups. The point
    estimate fits every point (least squares in log-log); each bootstrap replicate resamples,
    within every group, its points with replacement (runs of one size share C; the seeds
    carry the noise) and refits. Returns {"a", "b", "a_ci95", "b_ci95", "n_points", "n_boot"}
    with percentile intervals at ``level``; the intervals are None when every size has a single
    point (nothing to resample).
    """
    groups = [np.asarray(v, dtype=float).reshape(-1, 2) for _, v in sorted(points.items())]
    groups = [g for g in groups if len(g)]
    if len({float(x) for g in groups for x in g[:, 0]}) < 2:
        raise ValueError("need final points at two compute values or more to fit a power law")
    allp = np.concatenate(groups)
    point = fit_power_law(allp[:, 0], allp[:, 1])
    if all(len(g) < 2 for g in groups):
        # One seed per size: resampling within sizes reproduces the data, so a bootstrap
        # interval would have zero width and claim a certainty the runs do not give.
        return {"a": point["a"], "b": point["b"], "a_ci95": None, "b_ci95": None,
                "n_points": int(len(allp)), "n_boot": 0}
    rng = np.random.default_rng(seed)
    a_s, b_s = np.empty(n_boot), np.empty(n_boot)
    for i in range(n_boot):
        rep = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        lx, ly = np.log(rep[:, 0]), np.log(rep[:, 1])
        b, log_a = np.polyfit(lx, ly, 1)
        a_s[i], b_s[i] = np.exp(log_a), b
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {"a": point["a"], "b": point["b"], "a_ci95": [float(v) for v in np.percentile(a_s, q)],
            "b_ci95": [float(v) for v in np.percentile(b_s, q)], "n_points": int(len(allp)), "n_boot": n_boot}


def mean_ci(values, level: float = 0.95) -> dict:
    """{"mean", "ci95" (Student t interval; null for one value), "n_seeds"} of per-seed values."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("mean_ci needs at least one value")
    m = float(v.mean())
    if v.size < 2:
        return {"mean": m, "ci95": None, "n_seeds": 1}
    half = float(stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return {"mean": m, "ci95": [m - half, m + half], "n_seeds": int(v.size)}


def paired_ratio(arm: dict, ref: dict, n_boot: int = 9999, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``arm[key] / ref[key]`` over the keys both have (pairs: (size, seed)), with a
    bootstrap CI over pairs (scipy.stats.bootstrap, BCa; percentile when BCa is degenerate).

    Returns {"mean", "ci95", "n_pairs"}; ValueError when no key is shared.
    """
    from scipy import stats

    keys = sorted(set(arm) & set(ref))
    if not keys:
        raise ValueError("no (size, seed) pair is shared by the two arms")
    r = np.array([arm[k] / ref[k] for k in keys], dtype=float)
    if r.size < 2 or np.ptp(r) == 0:
        return {"mean": float(r.mean()), "ci95": [float(r.mean())] * 2, "n_pairs": int(r.size)}
    ci = None
    for method in ("BCa", "percentile"):
        res = stats.bootstrap((r,), np.mean, confidence_level=level, n_resamples=n_boot, method=method,
                              random_state=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            ci = [lo, hi]
            break
    return {"mean": float(r.mean()), "ci95": ci, "n_pairs": int(r.size)}


def study_summary(points: list[dict], headline: str, sparsity: dict, n_boot: int = 2000) -> tuple[dict, dict]:
    """(summary, details) of a study's final points.

    points: one dict per finished run: size, arm, seed, val_loss, trailing_loss, pflops_days,
    attn_aware_pflops_days. ``summary`` has issue 16's schema: per arm the final losses at the
    ``headline`` size (mean, t-interval over seeds) and the sparsity; per arm the fits on the
    6ND axis (lm, trailing); paired final-val-loss ratios to full over every (size, seed).
    ``details`` adds the attention-aware fits, trailing-loss ratios, per-size tables and ratios.
    An empty list raises ValueError (no plot or summary of nothing).
    """
    if not points:
        raise ValueError("the study has no finished runs: nothing to summarise")
    arms = [a for a in ARM_STYLE if any(p["arm"] == a for p in points)]
    summary: dict = {"arms": {}, "fits": {}, "ratios": {}}
    details: dict = {"headline_size": headline, "fits": {}, "ratios": {}, "per_size": {}}
    for arm in arms:
        mine = [p for p in points if p["arm"] == arm]
        head = [p for p in mine if p["size"] == headline]
        summary["arms"][arm] = {
            "final_val_loss": mean_ci([p["val_loss"] for p in head]) if head else None,
            "final_trailing_loss": mean_ci([p["trailing_loss"] for p in head]) if head else None,
            "sparsity": sparsity[arm]}
        sizes = sorted({p["size"] for p in mine})
        details["per_size"][arm] = {s: {m: mean_ci([p[key] for p in mine if p["size"] == s])
                                        for m, key in STUDY_METRICS.items()} for s in sizes}
        for axis in AXES:
            fits = {}
            for m, key in STUDY_METRICS.items():
                groups: dict = {}
                for p in mine:
                    groups.setdefault(p["size"], []).append((p[axis], p[key]))
                fits[m] = power_law_ci(groups, n_boot) if len(groups) >= 2 else None
            details["fits"].setdefault(axis, {})[arm] = fits
        summary["fits"][arm] = {m: (None if f is None else {k: f[k] for k in ("a", "b", "a_ci95", "b_ci95")})
                                for m, f in details["fits"]["pflops_days"][arm].items()}
    if "full" in arms:
        for arm in arms:
            if arm == "full":
                continue
            for m, key in STUDY_METRICS.items():
                def by_pair(a, key=key):
                    return {(p["size"], p["seed"]): p[key] for p in points if p["arm"] == a}
                r = paired_ratio(by_pair(arm), by_pair("full"))
                details["ratios"].setdefault(m, {})[f"{arm}/full"] = r
                details["ratios"].setdefault(f"{m}_by_size", {})[f"{arm}/full"] = {
                    s: paired_ratio({k: v for k, v in by_pair(arm).items() if k[0] == s}, by_pair("full"))
                    for s in sorted({p["size"] for p in points if p["arm"] == arm})}
            summary["ratios"][f"{arm}/full"] = {k: details["ratios"]["lm"][f"{arm}/full"][k] for k in ("mean", "ci95")}
    return summary, details


def plot_study(points: list[dict], details: dict, out_dir: Path, context: int, trailing: int) -> list[Path]:
    """Loss vs PFLOP/s-days per arm (both metrics x both compute axes) and the paired ratios.

    Per arm: the final point of every run (markers), the mean over seeds per size joined by a
    line in the arm's style with a band from the seeds' 95% interval, and the fitted power law
    as a dashed projection one decade beyond the largest compute. Raises ValueError when there
    is nothing to plot.
    """
    if not points:
        raise ValueError("no finished runs to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .plotting import readable_log_axis

    out_dir = Path(out_dir)
    arms = [a for a in ARM_STYLE if any(p["arm"] == a for p in points)]
    ylabels = {"lm": f"LM loss (seqlen={context})", "trailing": f"Trailing LM loss (seqlen={context}, last {trailing})"}
    # Legends stay off the data: the arms once for the whole figure (above the panels), each
    # panel's fitted formulas in a legend under that panel; constrained layout makes room.
    fig = plt.figure(figsize=(13, 11.5), layout="constrained")
    axes = fig.subplots(2, 2)
    any_fit = False
    for col, axis in enumerate(AXES):
        for row, (m, key) in enumerate(STUDY_METRICS.items()):
            ax = axes[row, col]
            fit_handles = []
            for arm in arms:
                label, color, ls, marker = ARM_STYLE[arm]
                mine = [p for p in points if p["arm"] == arm]
                sizes = sorted({p["size"] for p in mine}, key=lambda s: np.mean([p[axis] for p in mine if p["size"] == s]))
                xs = np.array([np.mean([p[axis] for p in mine if p["size"] == s]) for s in sizes])
                stats_ = [mean_ci([p[key] for p in mine if p["size"] == s]) for s in sizes]
                ys = np.array([s_["mean"] for s_ in stats_])
                lo = np.array([s_["ci95"][0] if s_["ci95"] else s_["mean"] for s_ in stats_])
                hi = np.array([s_["ci95"][1] if s_["ci95"] else s_["mean"] for s_ in stats_])
                ax.scatter([p[axis] for p in mine], [p[key] for p in mine], color=color, marker=marker, s=12,
                           alpha=0.45, linewidths=0)
                ax.plot(xs, ys, ls=ls, color=color, lw=1.6, marker=marker, ms=4)
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
                f = details["fits"][axis][arm][m]
                if f is not None and len(xs) >= 2:
                    grid = np.logspace(np.log10(xs.min()), np.log10(xs.max()) + 1, 60)
                    (line,) = ax.plot(grid, f["a"] * grid ** f["b"], "--", color=color, lw=1.1, alpha=0.9)
                    ci = (f"b 95% CI [{f['b_ci95'][0]:.3f}, {f['b_ci95'][1]:.3f}]" if f["b_ci95"]
                          else "one seed per size: no CI")
                    line.set_label(f"{label}: {f['a']:.3g} C^{f['b']:.4f} ({ci})")
                    fit_handles.append(line)
                    any_fit = True
            readable_log_axis(ax, "x")
            readable_log_axis(ax, "y")
            ax.set_xlabel(AXES[axis])
            ax.set_ylabel(ylabels[m])
            ax.grid(True, which="both", alpha=0.25)
            if fit_handles:
                ax.legend(handles=fit_handles, title="power-law fits L = a C^b (dashed)", loc="upper center",
                          bbox_to_anchor=(0.5, -0.12), fontsize=7.5, title_fontsize=8, frameon=False)
    arm_handles = [Line2D([], [], color=ARM_STYLE[a][1], ls=ARM_STYLE[a][2], marker=ARM_STYLE[a][3], ms=5, lw=1.6,
                          label=ARM_STYLE[a][0]) for a in arms]
    arm_handles += [Line2D([], [], color="dimgrey", marker="o", ms=4, ls="none", alpha=0.6,
                           label="one run's final point")]
    if any_fit:
        arm_handles.append(Line2D([], [], color="dimgrey", ls="--", lw=1.1, label="fit, one decade beyond the data"))
    fig.legend(handles=arm_handles, loc="outside upper center", ncol=3, fontsize=9, frameon=False, title_fontsize=10,
               title="Final loss vs compute per arm: mean over seeds per size (lines), their 95% interval (bands)")
    paths = [out_dir / "scaling.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    ratios = details["ratios"]
    if ratios:
        fig = plt.figure(figsize=(11, 4.6), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, m in zip(axes, STUDY_METRICS, strict=True):
            by_size = ratios.get(f"{m}_by_size", {})
            for j, (name, per) in enumerate(by_size.items()):
                arm = name.split("/")[0]
                label, color, ls, marker = ARM_STYLE[arm]
                sizes = list(per)
                x = np.arange(len(sizes)) + (j - 1) * 0.15
                mean = np.array([per[s]["mean"] for s in sizes])
                err = np.array([[per[s]["mean"] - per[s]["ci95"][0], per[s]["ci95"][1] - per[s]["mean"]]
                                if per[s]["ci95"] else [0, 0] for s in sizes]).T
                ax.errorbar(x, mean, yerr=err, fmt=marker, ls=ls, color=color, capsize=3, label=f"{label} / Full")
                ax.set_xticks(np.arange(len(sizes)), sizes)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylabel(f"final {'LM' if m == 'lm' else 'trailing'} loss / full attention's")
            ax.set_xlabel("size (same seed paired; bars: bootstrap 95% CI over seeds)")
            ax.grid(True, alpha=0.25)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside upper center", ncol=len(labels), fontsize=8, frameon=False)
        paths.append(out_dir / "ratios.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
