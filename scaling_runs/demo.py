"""The demo (``make demo``): the cpu-tiny sweep end to end, then the power-law fits.

    python -m scaling_runs.demo [--out runs/cpu-tiny]

Trains 3 sizes x {MoBA, full attention} on the embedded corpus (the Python standard
library's sources, byte level; no download) on the CPU, fits L = a * C^b on each kind's
compute frontier (LM loss and trailing loss), writes fit.json and the plots, and prints the
formulas and plot paths. Resumable: a second run skips finished runs and only refits.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import parse_overrides
from .fit import KIND_LABEL, METRICS, fit_sweep, formula
from .sweep import run_sweep


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    opts = parse_overrides(argv)
    out = Path(opts.pop("out", "runs/cpu-tiny"))
    preset = opts.pop("preset", "cpu-tiny")
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
