"""Readable log axes for every plot of the project: ticks read 512, 1K, 2K, ... or 1T, not 10^x.

One place for the tick format, imported by ``scaling_runs.fit`` and by the plots in ``bench/``
(bench sits over scaling_runs; moba imports neither). Matplotlib is imported lazily, inside
``readable_log_axis``: ``format_tick`` needs nothing but the standard library.
"""

from __future__ import annotations

import math

#: Suffixes of ``format_tick`` for successive powers of its ``units``.
SUFFIXES = ("", "K", "M", "G", "T", "P", "E")


def _significant(value: float, digits: int = 3) -> str:
    """``value`` with about ``digits`` significant digits, no trailing zeros; scientific
    ("1e-7", "2.5e8") only below 0.001 or from 100000 up."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    exp = math.floor(math.log10(abs(value)))
    if -3 <= exp < 5:
        text = f"{value:.{max(0, digits - 1 - exp)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mant = round(value / 10**exp, digits - 1)
    if abs(mant) >= 10:  # 9.996e7 rounds to 10.0e7
        mant, exp = mant / 10, exp + 1
    text = f"{mant:.{digits - 1}f}".rstrip("0").rstrip(".")
    return f"{text}e{exp}"


def format_tick(value: float, units: int | None = 1024) -> str:
    """A short label for a tick value.

    ``units=1024`` (token counts, sizes): 512 -> "512", 1024 -> "1K", 1536 -> "1.5K",
    2**20 -> "1M". ``units=1000`` (FLOPs, FLOP/s): 1e12 -> "1T", 2.5e9 -> "2.5G".
    ``units=None`` (losses, milliseconds, PFLOP/s-days): plain numbers, 3 significant
    digits, "1e-7" for very small ones.
    """
    if units is None or value == 0 or not math.isfinite(value):
        return _significant(value)
    if units not in (1000, 1024):
        raise ValueError(f"units must be 1000, 1024 or None, got {units!r}")
    scaled = float(value)
    for suffix in SUFFIXES:
        # "1000" stays as it is for units 1024, and values below 1 keep their digits
        if abs(scaled) < units or suffix == SUFFIXES[-1]:
            return _significant(scaled) + suffix
        scaled /= units
    raise AssertionError("unreachable")


def _log_subs(lo: float, hi: float, base: float) -> tuple[float, ...]:
    """Which multiples of each power of ``base`` get a labelled tick: all of them on a short
    span (a loss between 2 and 5 gets 2, 3, 4, 5), 1-2-5 on a few decades, powers only beyond."""
    if base != 10:
        return (1.0,)
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    if decades <= 1.2:
        return (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0) if decades <= 0.5 else (1.0, 2.0, 3.0, 5.0)
    if decades <= 3.0:
        return (1.0, 2.0, 5.0)
    return (1.0,)


def readable_log_axis(ax, which: str = "x", base: float = 10, units: int | None = None) -> None:
    """Put ``ax``'s ``which`` axis ("x" or "y") on a log scale with ticks labelled by
    ``format_tick(value, units)``: powers of ``base`` (2: 512, 1K, 2K, ...), plus 2, 3, 5, ...
    times them on base-10 axes that span few decades. Call it after plotting (the tick choice
    reads the data limits); minor ticks stay, unlabelled.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if which not in ("x", "y"):
        raise ValueError(f"which must be 'x' or 'y', got {which!r}")
    axis = ax.xaxis if which == "x" else ax.yaxis
    getattr(ax, f"set_{which}scale")("log", base=base)
    lo, hi = sorted(getattr(ax, f"get_{which}lim")())
    axis.set_major_locator(LogLocator(base=base, subs=_log_subs(lo, hi, base), numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: format_tick(v, units)))
    axis.set_minor_formatter(NullFormatter())
