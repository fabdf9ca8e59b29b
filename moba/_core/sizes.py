"""Token counts written as text: ``"512"``, ``"8k"``, ``"1.5k"``, ``"1m"`` (k = 1024, m = 1024**2).

One parser for every command line that takes sequence lengths or budgets (``bench/`` and
``scaling_runs/``).
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*")


def parse_size(text: str) -> int:
    """``"8k"`` -> 8192, ``"1m"`` -> 1048576, ``"512"`` -> 512, ``"1.5k"`` -> 1536.

    Raises ValueError for anything else, and for sizes that are not a positive whole number."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 512, 8k, 1m)")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
    if value != int(value) or value < 1:
        raise ValueError(f"size {text!r} is not a positive whole number of tokens")
    return int(value)
