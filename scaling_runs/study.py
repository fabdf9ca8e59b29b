"""A scaling study with control arms: ``python -m scaling_runs.study --preset cpu-study --out DIR``.

Runs every size x arm x seed of a study preset (``scaling_runs.presets.STUDIES``; arms
``full``, ``moba``, ``local`` = top_k 1, ``random`` = random past blocks at MoBA's budget),
then summarises the final point of every run:

* ``DIR/summary.json``: issue 16's schema: per arm the final val / trailing loss at the
  headline size (mean and Student-t 95% CI over seeds, number of seeds) and the causal
  sparsity; per arm L = a * C^b fitted on the final points (C = 6ND in PFLOP/s-days) with
  bootstrap 95% CIs on a and b (seeds resampled within each size); paired final-val-loss
  ratios arm / full over every (size, seed), mean with a bootstrap 95% CI;
* ``DIR/study.json``: everything else: the attention-aware fits, trailing-loss ratios, per-size
  tables and ratios, the final points, the preset, the data description, the wall time;
* ``DIR/scaling.png`` (loss vs PFLOP/s-days, both metrics x both compute axes) and
  ``DIR/ratios.png`` (paired ratios per size);
* ``DIR/runs/<size>-<arm>-seed<k>/``: each run's config.json, metrics.jsonl, train.log,
  DONE; checkpoints are deleted once a run is DONE unless ``--keep_checkpoints``.

Resumable: a run with DONE is skipped, a partial run resumes from its checkpoint, so the same
command finishes what is missing and re-summarises. Runs go ``--jobs`` at a time (one process
each, seed by seed, longest first within a seed); progress is a tqdm bar over runs. Exit status: 0 when every run is
DONE and the summary is written, 1 when a run failed (its ``train.log`` says why), 2 when the
plan is empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from moba._core import cli

from .cli import Parser
from .config import RunConfig, apply_overrides
from .fit import plot_study, study_summary
from .flops import PFLOPS_DAY, causal_sparsity, flops_per_token
from .model import analytic_param_counts
from .presets import ARMS, STUDIES, StudyPreset, get_study

EXIT_FAILED = 1
EXIT_EMPTY = 2


def prepare_data(preset: StudyPreset, out: Path) -> tuple[str, dict]:
    """The data option of every run and its description (writes the recall corpus when needed)."""
    if preset.data != "recall":
        return preset.data, {"data": preset.data}
    from .tasks import RecallSpec, write_recall_corpus

    folder = out / "data"
    info = write_recall_corpus(folder, *preset.recall_tokens, spec=RecallSpec(**preset.recall_spec), seed=0)
    return str(folder), info


def plan(preset: StudyPreset, out: Path, data: str, overrides: dict[str, str] | None = None) -> list[dict]:
    """Every run of the study with its config (out_dir under ``out/runs``), size, FLOPs;
    ``overrides`` ({"batch_size": "4", ...}) change every run's config (``config.apply_overrides``)."""
    runs = []
    for name, meta, cfg in preset.runs(data):
        cfg = apply_overrides(cfg, dict(overrides or {}))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out / "runs" / name)))
        n = analytic_param_counts(cfg.model)["non_embedding"]
        fpt = flops_per_token(cfg.model, n)
        tokens = cfg.train.max_tokens
        runs.append({"name": name, **meta, "config": cfg, "params": n, "tokens": tokens,
                     "flops": fpt["dense"] * tokens, "attn_aware_flops": fpt["attn_aware"] * tokens})
    return runs


def run_one(run: dict, keep_checkpoints: bool = False) -> str:
    """Train one run in its own process (resuming when it has a checkpoint); "done", "skipped"
    or "failed (...)". Deletes the checkpoints of a DONE run unless ``keep_checkpoints``."""
    out = Path(run["config"].train.out_dir)
    if (out / "DONE").exists():
        return "skipped"
    out.mkdir(parents=True, exist_ok=True)
    launch = out / "launch.json"
    launch.write_text(json.dumps(run["config"].to_dict(), indent=2))
    (out / "study_run.json").write_text(json.dumps({k: run[k] for k in ("size", "arm", "seed")}))
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(out / "train.log", "a") as log:
        rc = subprocess.call([sys.executable, "-m", "scaling_runs.train", "--config", str(launch)],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0 or not (out / "DONE").exists():
        return f"failed (rc {rc}, see {out / 'train.log'})"
    if not keep_checkpoints:
        for p in out.glob("ckpt*.pt"):
            p.unlink()
    return "done"


def execute(runs: list[dict], jobs: int = 2, keep_checkpoints: bool = False, progress: bool = True) -> dict:
    """Run what is not DONE, ``jobs`` at a time, seed by seed and largest FLOPs first within a
    seed (a study stopped early has whole seeds of every size and arm); {name: status}."""
    from tqdm import tqdm

    order = sorted(runs, key=lambda r: (r["seed"], -r["attn_aware_flops"]))
    results = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, \
            tqdm(total=len(order), desc="study runs", unit="run", disable=not progress) as bar:
        futures = {pool.submit(run_one, r, keep_checkpoints): r for r in order}
        for fut in as_completed(futures):
            r = futures[fut]
            try:
                results[r["name"]] = fut.result()
            except Exception as exc:  # noqa: BLE001 - one failed run must not stop the others
                results[r["name"]] = f"failed ({type(exc).__name__}: {exc})"
            if results[r["name"]].startswith("failed"):
                tqdm.write(f"[study] {r['name']}: {results[r['name']]}", file=sys.stderr)
            bar.set_postfix_str(f"last {r['name']}", refresh=False)
            bar.update(1)
    return results


def final_points(runs: list[dict]) -> list[dict]:
    """The final row (``DONE``) of every finished run with its size, arm and seed."""
    points = []
    for r in runs:
        done = Path(r["config"].train.out_dir) / "DONE"
        if not done.exists():
            continue
        last = json.loads(done.read_text())
        points.append({"name": r["name"], "size": r["size"], "arm": r["arm"], "seed": r["seed"],
                       "params": r["params"], "tokens": last["tokens"],
                       "val_loss": last["val_loss"], "trailing_loss": last["trailing_loss"],
                       "pflops_days": last["pflops_days"],
                       "attn_aware_pflops_days": last["attn_aware_flops"] / PFLOPS_DAY,
                       "elapsed_s": last.get("elapsed_s")})
    return points


def headline_size(points: list[dict], order: list[str]) -> str:
    """The largest size (in ``order``) among those with the most seeds in every arm."""
    arms = {p["arm"] for p in points}
    seeds = {s: min(len({p["seed"] for p in points if p["size"] == s and p["arm"] == a}) for a in arms)
             for s in {p["size"] for p in points}}
    best = max(seeds.values())
    return max((s for s, n in seeds.items() if n == best), key=order.index)


def summarize(preset: StudyPreset, runs: list[dict], out: Path, data_info: dict, n_boot: int = 2000,
              extra: dict | None = None, headline: str | None = None) -> dict:
    """Write summary.json, study.json and the plots from the finished runs; returns the summary."""
    points = final_points(runs)
    if not points:
        raise ValueError(f"{out}: no finished run to summarise (an empty study is an error)")
    m = preset.base.model
    sparsity = {arm: causal_sparsity(m.context, "full" if ARMS[arm].get("attention") == "full" else "moba",
                                     m.block_size, ARMS[arm].get("top_k", m.top_k)) for arm in preset.arms}
    headline = headline or headline_size(points, [s.name for s in preset.sizes])
    summary, details = study_summary(points, headline, sparsity, n_boot)
    trailing = max(1, int(round(m.context * preset.base.train.trailing_frac)))
    plots = plot_study(points, details, out, m.context, trailing)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    record = {"preset": preset.name, "note": preset.note, "sizes": [dataclasses.asdict(s) for s in preset.sizes],
              "arms": {a: ARMS[a] for a in preset.arms}, "seeds": preset.seeds, "tokens_per_param": preset.tpp,
              "base_config": preset.base.to_dict(), "data": data_info,
              "trailing": f"last {trailing} of {m.context} positions (1/{round(1 / preset.base.train.trailing_frac)})",
              **details, "points": points, "plots": [p.name for p in plots], **(extra or {})}
    (out / "study.json").write_text(json.dumps(record, indent=2, default=str))
    return summary


def print_summary(summary: dict) -> None:
    for arm, s in summary["arms"].items():
        v, t = s["final_val_loss"], s["final_trailing_loss"]
        ci = (lambda c: "n/a" if not c else f"[{c[0]:.4f}, {c[1]:.4f}]")
        if v:
            print(f"  {arm:<7} sparsity {s['sparsity']:.4f}  val {v['mean']:.4f} {ci(v['ci95'])}  "
                  f"trailing {t['mean']:.4f} {ci(t['ci95'])}  ({v['n_seeds']} seeds)")
    for name, r in summary["ratios"].items():
        lo, hi = r["ci95"] or (float("nan"),) * 2
        print(f"  {name:<12} final val loss ratio {r['mean']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")
    for arm, f in summary["fits"].items():
        if f.get("lm"):
            ci = f["lm"]["b_ci95"]
            print(f"  {arm:<7} L = {f['lm']['a']:.4g} C^{f['lm']['b']:.4f}  b 95% CI "
                  + (f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "none (one seed per size)"))


def build_parser() -> Parser:
    p = Parser("python -m scaling_runs.study", __doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-study", choices=sorted(STUDIES), help="study preset (scaling_runs.presets.STUDIES)")
    p.add_argument("--out", default=None, help="study folder (default: runs/<preset>)")
    p.add_argument("--jobs", type=cli.positive_int, default=2, help="runs trained side by side (one process each)")
    p.add_argument("--sizes", default=None, help="comma-separated subset of the preset's sizes (default: all)")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {list(ARMS)} (default: the preset's)")
    p.add_argument("--seeds", default=None, type=cli.checked(cli.list_of(cli.nonnegative_int, "seeds"), "seed list"), help="comma-separated seeds (default: the preset's)")
    p.add_argument("--tpp", type=cli.positive_float, default=None, help="tokens per non-embedding parameter (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=cli.checked(_key_value, "KEY=VALUE"),
                   help="change every run's config (repeatable), e.g. --set lr=1e-2; tokens stay the preset's")
    p.add_argument("--headline", default=None,
                   help="size whose per-arm losses summary.json reports (default: the largest size among "
                        "those with the most seeds in every arm)")
    p.add_argument("--n_boot", type=cli.nonnegative_int, default=2000, help="bootstrap replicates of the power-law fits")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep ckpt*.pt of finished runs")
    p.add_argument("--summarize_only", action="store_true", help="train nothing; summarise the finished runs")
    p.add_argument("--dry_run", action="store_true", help="print the plan (runs, tokens, FLOPs) and stop")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _key_value(text: str) -> None:
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ValueError("expected KEY=VALUE, e.g. lr=1e-2")


def _subset(given: str | None, allowed: list, what: str, cast=str) -> list | None:
    if given is None:
        return None
    if cast is not str:
        return cli.list_of(cast, what)(given)
    try:
        return cli.names(allowed, what.rstrip("s"))(given)
    except argparse.ArgumentTypeError as e:
        raise cli.fail(f"--{what}: {e}") from None


def selected_preset(a: argparse.Namespace) -> StudyPreset:
    """The study preset ``a.preset`` narrowed to the ``--sizes`` / ``--arms`` / ``--seeds`` /
    ``--tpp`` of the parsed command line ``a``."""
    preset = get_study(a.preset)
    sizes = _subset(a.sizes, [s.name for s in preset.sizes], "sizes")
    if sizes is not None:
        preset.sizes = [s for s in preset.sizes if s.name in sizes]
    arms = _subset(a.arms, list(ARMS), "arms")
    if arms is not None:
        preset.arms = arms
    seeds = _subset(a.seeds, [], "seeds", int)
    if seeds is not None:
        preset.seeds = seeds
    if a.tpp is not None:
        preset.tpp = a.tpp
    return preset


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    preset = selected_preset(a)
    overrides = dict(kv.split("=", 1) for kv in a.set)
    try:  # a bad --set is an error before any data is prepared
        apply_overrides(RunConfig(), overrides)
    except (KeyError, ValueError, TypeError) as exc:
        raise cli.fail(f"--set {' '.join(a.set)}: {exc.args[0] if isinstance(exc, KeyError) else exc}") from None
    if a.headline is not None and a.headline not in [s.name for s in preset.sizes]:
        raise cli.fail(f"--headline: unknown size {a.headline!r}{cli.did_you_mean(a.headline, [s.name for s in preset.sizes])}; "
                       f"expected one of {', '.join(s.name for s in preset.sizes)}")
    out = Path(a.out or f"runs/{preset.name}")
    out.mkdir(parents=True, exist_ok=True)
    data, data_info = prepare_data(preset, out)
    runs = plan(preset, out, data, overrides)
    if not runs:
        print("[study] the plan is empty (no size, arm or seed left)", file=sys.stderr)
        return EXIT_EMPTY
    total = sum(r["tokens"] for r in runs)
    print(f"[study] {preset.name}: {len(runs)} runs, {total:,} tokens, "
          f"{sum(r['flops'] for r in runs) / PFLOPS_DAY:.3g} PFLOP/s-days (6ND) -> {out}", flush=True)
    if a.dry_run:
        for r in runs:
            print(f"  {r['name']:<22} N {r['params']:>8,}  tokens {r['tokens']:>10,}  "
                  f"6ND {r['flops'] / PFLOPS_DAY:.3g}  attn-aware {r['attn_aware_flops'] / PFLOPS_DAY:.3g}")
        return 0
    t0 = time.time()
    failed = []
    if not a.summarize_only:
        results = execute(runs, a.jobs, a.keep_checkpoints, not a.no_progress)
        failed = [n for n, s in results.items() if s.startswith("failed")]
    wall = time.time() - t0
    try:
        summary = summarize(preset, runs, out, data_info, a.n_boot,
                            {"wall_time_s_last_invocation": round(wall, 1), "jobs": a.jobs,
                             "command": "python -m scaling_runs.study " + " ".join(argv or sys.argv[1:])},
                            a.headline)
    except ValueError as exc:
        print(f"[study] error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"[study] {len(runs) - len(failed)}/{len(runs)} runs DONE; training wall time {wall:.0f} s; "
          f"wrote {out / 'summary.json'}, {out / 'study.json'}, {out / 'scaling.png'}")
    print_summary(summary)
    if failed:
        print(f"[study] {len(failed)} run(s) failed: {', '.join(sorted(failed))}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "scaling_runs.study"))
