"""The demo (``make demo``): a short version of the cpu-study (``scaling_runs.study``).

    python -m scaling_runs.demo [--out runs/demo] [--sizes s1,s2,s3] [--seeds 0,1] [--OPTION VALUE ...]

Trains the ``cpu-study`` preset's three smallest sizes x its four arms (full, moba, local =
own block only, random = random past blocks at MoBA's budget) x two seeds on the CPU, on the
study's topic-document corpus (written under OUT/data; no download), then prints each arm's
final losses, the paired arm / full loss ratios and the fitted power laws, and writes
summary.json, study.json, scaling.png and ratios.png into OUT. It is exactly
``python -m scaling_runs.study --preset cpu-study --sizes ... --seeds ...`` (the command is
printed and recorded in study.json); the full study (5 sizes x 3 seeds, about 40 min) and its
committed results are in docs/results.md. Resumable: a second run skips finished runs and only
re-summarises. The config options (every field of ``scaling_runs.config`` but the per-run
out_dir, seed and token budget) override every run's config, like the study's ``--set``.
"""

from __future__ import annotations

import time
from pathlib import Path

from moba._core import cli

from . import study
from .cli import Parser, add_config_options, checked, config_overrides
from .presets import ARMS, get_study

PRESET = "cpu-study"
SIZES = "s1,s2,s3"  # the three smallest: a few minutes on 2 cores (docs/results.md)
SEEDS = "0,1"  # two, so that the fits' bootstrap over seeds has something to resample
# set per run by the study (run folder, seed, tokens per parameter): not options of the demo
NOT_OPTIONS = ("train.out_dir", "train.seed", "train.max_tokens")


def _names(allowed: list[str]):
    """An argparse type: a comma-separated non-empty subset of ``allowed``, passed on as typed."""
    def check(text: str) -> None:
        items = [x.strip() for x in text.split(",")]
        if not all(items) or any(x not in allowed for x in items):
            raise ValueError(f"expected a comma-separated subset of {allowed}")
    return checked(check, "list")


def _seeds(text: str) -> None:
    if not all(x.strip().lstrip("-").isdigit() for x in text.split(",")):
        raise ValueError("expected comma-separated integers")


def build_parser() -> Parser:
    preset = get_study(PRESET)
    p = Parser("python -m scaling_runs.demo", __doc__, usage="%(prog)s [--out DIR] [--OPTION VALUE ...]")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="study folder (summary, plots, runs/)")
    p.add_argument("--sizes", default=SIZES, type=_names([s.name for s in preset.sizes]),
                   help=f"comma-separated subset of the {PRESET} sizes")
    p.add_argument("--arms", default=",".join(preset.arms), type=_names(list(ARMS)), help="comma-separated arms")
    p.add_argument("--seeds", default=SEEDS, type=checked(_seeds, "seed list"), help="comma-separated seeds")
    p.add_argument("--jobs", type=cli.positive_int, default=2, help="runs trained side by side (one process each)")
    p.add_argument("--n_boot", type=cli.nonnegative_int, default=2000, help="bootstrap replicates of the power-law fits")
    add_config_options(p, default_note=f"the {PRESET} preset's value; applies to every run", skip=NOT_OPTIONS)
    return p


def study_argv(a) -> list[str]:
    """The ``scaling_runs.study`` arguments the demo's parsed options ``a`` stand for."""
    argv = ["--preset", PRESET, "--out", str(a.out), "--sizes", a.sizes, "--arms", a.arms,
            "--seeds", a.seeds, "--jobs", str(a.jobs), "--n_boot", str(a.n_boot)]
    for key, value in config_overrides(a).items():
        argv += ["--set", f"{key}={value}"]  # apply_overrides parses the text by the field's type
    return argv


def main(argv: list[str] | None = None) -> int:
    """Run the short study; its exit status (0 when every run is DONE and summarised)."""
    a = build_parser().parse_args(argv)
    args = study_argv(a)
    print("[demo] python -m scaling_runs.study " + " ".join(args), flush=True)
    t0 = time.time()
    rc = study.main(args)
    out = Path(a.out)
    if rc == 0:
        for name in ("summary.json", "study.json", "scaling.png", "ratios.png"):
            print(f"[demo] {out / name}")
    print(f"[demo] wall time {time.time() - t0:.0f} s (the full study: python -m scaling_runs.study "
          f"--preset {PRESET}; its results: scaling_runs/results/cpu-study-*)")
    return rc


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "scaling_runs.demo"))
