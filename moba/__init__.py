"""MoBA: Mixture of Block Attention.

Each query attends to its own key block plus the ``top_k - 1`` past blocks whose mean key
scores highest against it (Lu et al., 2025). See docs/design.md section 1 for the exact contract,
section 2 for the layout: ``moba.ops`` (the op and its backends), ``moba.decode``, ``moba.nn``,
``moba.generate``, ``moba.integrations``; this module re-exports the public names.

>>> import torch, moba
>>> q = torch.randn(1, 2048, 8, 64); k = v = torch.randn(1, 2048, 2, 64)
>>> out = moba.moba_attn_func(q, k, v, block_size=256, top_k=3)
"""

from ._core.checks import PAD_INDEX
from .config import MoBAConfig
from .decode import BlockMeanState, KVCache, LayerKVCache, moba_decode
from .ops import (
    available_backends,
    flex_block_mask,
    full_attn_func,
    full_attn_implementation,
    full_attn_varlen_func,
    full_attn_with_kvcache,
    last_full_attn_implementation,
    moba_attn_func,
    moba_attn_varlen,
    moba_attn_varlen_func,
    moba_attn_varlen_naive,
    select_blocks,
    select_blocks_varlen,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from moba import register_moba`` (the official MoBA package's import) without loading the
    # transformers integration, or transformers, at ``import moba``.
    if name == "register_moba":
        from .integrations.transformers import register_moba

        return register_moba
    raise AttributeError(f"module 'moba' has no attribute {name!r}")


__all__ = [
    "BlockMeanState",
    "KVCache",
    "LayerKVCache",
    "PAD_INDEX",
    "MoBAConfig",
    "available_backends",
    "flex_block_mask",
    "full_attn_func",
    "full_attn_implementation",
    "full_attn_varlen_func",
    "full_attn_with_kvcache",
    "last_full_attn_implementation",
    "moba_attn_func",
    "moba_attn_varlen",
    "moba_attn_varlen_func",
    "moba_attn_varlen_naive",
    "moba_decode",
    "register_moba",
    "select_blocks",
    "select_blocks_varlen",
]
