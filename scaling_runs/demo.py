"""The demo (``make demo``): the cpu-tiny sweep end to end, then the power-law fits.

    python -m scaling_runs.demo [--out runs/cpu-tiny] [--OPTION VALUE ...]

Trains 3 sizes x {MoBA, full attention} on the embedded corpus (the Python standard
library's sources, byte level; no download) on the CPU, fits L = a * C^b on each kind's
compute frontier (LM loss and trailing loss), writes fit.json and the plots, and prints the
formulas and plot paths. Resumable: a second run skips finished runs and only refits.
The config options (every field of ``scaling_runs.config``) override every run's config.
"""

from __future__ import annotations

import time
from pathlib import Path

from .cli import Parser, add_config_options, config_overrides
from .fit import KIND_LABEL, METRICS, fit_sweep, formula
from .presets import PRESETS
from .sweep import run_sweep


def build_parser() -> Parser:
    p = Parser("python -m scaling_runs.demo", __doc__, usage="%(prog)s [--out DIR] [--OPTION VALUE ...]")
    p.add_argument("--out", metavar="DIR", default="runs/cpu-tiny", help="sweep folder (fit.json and plots too)")
    p.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS), help="the sweep grid")
    add_config_options(p, default_note="the preset's value; applies to every run")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    out, preset = Path(a.out), a.preset
    opts = {k.split(".", 1)[1]: v for k, v in config_overrides(a).items()}  # by field name, like the sweep's
    t0 = time.time()
    run_sweep(preset, out, opts)
    fits = fit_sweep(out)
    print("\nFitted power laws (C in PFLOP/s-days, C = 6 * N_non_embedding * tokens):")
    for metric in METRICS:
        for kind, f in fits[metric].items():
            print(f"  {metric:<14} {KIND_LABEL[kind]:<15} L = {formula(f)}")
    print("\nPaper (Lu et al. 2025), for comparison: LM loss MoBA 2.625 C^-0.063, full 2.622 C^-0.063; "
          "trailing MoBA 1.546 C^-0.108, full 1.464 C^-0.097")
    print(f"\nfit: {out / 'fit.json'}")
    for p in fits["plots"]:
        print(f"plot: {p}")
    print(f"demo wall time: {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
