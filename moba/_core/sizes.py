"""Token counts written as text: ``"512"``, ``"8k"``, ``"1.5k"``, ``"1m"`` (k = 1024, m = 1024**2).

One parser for every command line that takes sequence lengths or budgets (``bench/`` and
``scaling_runs/``), and the one notation of a (block size, top-k) setting: ``BLOCK/TOP_K``
(``512/3``, ``4k/12``; ``parse_block_topk``).
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


#: The one notation of a (block size, top-k) setting on every command line: ``BLOCK/TOP_K``.
BLOCK_TOPK_HELP = "BLOCK/TOP_K, e.g. 512/3 (block 512, top-3) or 4k/12"

_PAIR_X = re.compile(r"\s*([0-9.]+[kKmM]?)\s*[xX*]\s*([0-9.]+[kKmM]?)\s*")


def parse_block_topk(text: str) -> tuple[int, int]:
    """``"512/3"`` -> ``(512, 3)``: a (block size, top-k) setting written ``BLOCK/TOP_K``.

    The block size takes the suffixes of ``parse_size`` (``4k/12``); top-k is a whole number
    >= 1 (it counts the own block). ``AxB`` is refused: earlier tools read it as block x top-k
    in one place and top-k x block in another, so ``64x3`` cannot be read safely.
    Raises ValueError naming the notation otherwise."""
    text = str(text)
    if _PAIR_X.fullmatch(text):
        a, b = _PAIR_X.fullmatch(text).groups()
        raise ValueError(f"{text!r}: the AxB form is ambiguous (block x top-k or top-k x block); "
                         f"write {BLOCK_TOPK_HELP}, i.e. {b}/{a} or {a}/{b}")
    block, sep, top_k = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not a setting; expected {BLOCK_TOPK_HELP}")
    try:
        block_size = parse_size(block)
    except ValueError:
        raise ValueError(f"{text!r}: block size {block.strip()!r} is not a size >= 1; expected {BLOCK_TOPK_HELP}") from None
    if not top_k.strip().isdigit() or int(top_k) < 1:
        raise ValueError(f"{text!r}: top-k {top_k.strip()!r} is not a whole number >= 1; expected {BLOCK_TOPK_HELP}")
    return block_size, int(top_k)
