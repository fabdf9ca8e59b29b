"""Decoding with a KV cache: incremental block means + sparse attention, and tree attention.

* ``kv_cache``: ``BlockMeanState``, ``KVCache`` / ``LayerKVCache`` and ``moba_decode``.
* ``tree``: ``moba_tree_attention`` for tree-shaped speculative drafts.
"""

from .kv_cache import BlockMeanState, KVCache, LayerKVCache, decode_attention_torch, moba_decode
from .tree import ancestor_mask, check_parents, moba_tree_attention, tree_depths

__all__ = [
    "BlockMeanState",
    "KVCache",
    "LayerKVCache",
    "ancestor_mask",
    "check_parents",
    "decode_attention_torch",
    "moba_decode",
    "moba_tree_attention",
    "tree_depths",
]
