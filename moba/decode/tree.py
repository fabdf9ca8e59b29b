"""Tree attention over a KV cache: verify a tree of drafted tokens in one forward.

A draft *tree* holds several candidate continuations of a sequence whose keys and values sit
in a cache of ``L`` tokens. Node ``i`` has a parent (``-1``: a root, continuing the cached
sequence directly) and a depth (roots: 0); it stands at position ``L + depth[i]`` of the
sequence made of the cache and its own path (its ancestors, then itself). Tree attention
gives every node exactly the output it would get as the last query of that sequence:

* MoBA (``top_k`` blocks): the gate scores the node's query against the mean key of every
  complete block *of its path sequence*. Blocks inside the cache are shared by all nodes
  (means from the cache's ``BlockMeanState``); a block the tree reaches into mixes cached
  keys with the node's ancestors, so its mean is per node. The gate is
  ``moba.ops.gate.select_from_means`` with one "sequence" per node, hence the same selection
  rule as prefill and ``moba_decode``.
* Full attention: every block selected (``top_k`` >= the number of blocks).

Then the node attends to the cached tokens of its selected blocks and to the tree nodes
that are its ancestors (or itself) and fall in a selected block. The tree's keys and values
are never written to the cache: after verification the cache still holds ``L`` tokens, and
the accepted tokens are fed again as ordinary tokens in the next step.

Batch size 1. ``ancestor_mask`` / ``tree_depths`` turn a parent list into what the kernels use.
"""

from __future__ import annotations

import torch

from .._core.checks import check_cache_qkv, check_positive_int, check_qkv, resolve_softmax_scale
from .._core.layout import build_layout
from ..ops.gate import select_from_means
from .kv_cache import BlockMeanState

__all__ = ["ancestor_mask", "check_parents", "moba_tree_attention", "tree_depths"]


def check_parents(parents) -> list[int]:
    """Validate a parent list: ints, ``-1`` for roots, every parent before its child."""
    out = []
    for i, p in enumerate(parents):
        if isinstance(p, bool) or not isinstance(p, int) or not -1 <= p < i:
            raise ValueError(f"tree parents must be ints with -1 <= parents[i] < i (parents before "
                             f"children), got parents[{i}] = {p!r}")
        out.append(p)
    return out


def tree_depths(parents: list[int]) -> list[int]:
    depth: list[int] = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def ancestor_mask(parents: list[int], device=None) -> torch.Tensor:
    """(n, n) bool: ``mask[i, m]`` is True when node ``m`` is node ``i`` or one of its ancestors."""
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask.to(device)


def moba_tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    parents: list[int],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    state: BlockMeanState,
    block_size: int,
    top_k: int,
    softmax_scale: float,
) -> torch.Tensor:
    """Causal MoBA attention of the nodes of a draft tree over a cache and their own paths.

    Args:
        q: (n, Hq, D) the tree nodes' queries; k, v: (n, Hkv, D) their keys and values (rotary
            already applied at positions ``L + depth``).
        parents: n ints, ``-1`` for roots, parents before children (``check_parents``).
        k_cache, v_cache: (1, L, Hkv, D), L >= 1, any strides.
        state: the layer's ``BlockMeanState``, brought up to the cache here (a no-op when
            ``moba_decode`` just ran on it).
        block_size, top_k: the MoBA settings (``top_k`` >= the number of blocks: full attention).

    Returns:
        (n, Hq, D) in q's dtype.
    """
    parents = check_parents(parents)
    check_qkv(q, k, v, varlen=True)
    if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 and (k_cache.shape[0] != 1 or k_cache.shape[1] < 1):
        raise ValueError(f"k_cache: tree attention needs a cache of one non-empty sequence, got {tuple(k_cache.shape)}")
    check_cache_qkv(q[None, :0], k_cache, v_cache, ("q", "k_cache", "v_cache"))  # dtypes, devices, heads
    n, hq, d = q.shape
    lk, hkv = k_cache.shape[1], k_cache.shape[2]
    if len(parents) != n or k.shape[1] != hkv:
        raise ValueError(f"tree tensors disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"{len(parents)} parents, cache heads {hkv}")
    if not isinstance(state, BlockMeanState):
        raise TypeError(f"state must be a moba.BlockMeanState, got {type(state).__name__}")
    block_size = check_positive_int("block_size", block_size)
    top_k = check_positive_int("top_k", top_k)
    softmax_scale = resolve_softmax_scale(softmax_scale, d)
    if n == 0:
        return q.clone()
    dev = q.device
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    anc = ancestor_mask(parents, dev)  # (n, n)
    pos = lk + torch.tensor(tree_depths(parents), device=dev)  # (n,) position of each node
    # One "sequence" per node: its path (cache + ancestors + itself) ends at its position.
    layout = build_layout(list(range(n + 1)), [0] + (pos + 1).cumsum(0).tolist(), block_size, dev)
    bs = layout.block_size  # min(block_size, longest path): the same blocks, O(path) buffers
    node_block = pos // bs
    nb = int(node_block.max()) + 1

    # Block means of every node's path sequence: cached sums + the sums of its ancestors. The
    # ancestors are picked with where() and summed with index_add_ (never a 0/1 product): a
    # non-finite key on one branch must not reach another branch's gate.
    state.update(k_cache, [0], 0)
    nb_cache = -(-lk // bs)
    sums = torch.zeros(nb, hkv, d, dtype=torch.float32, device=dev)
    sums[:nb_cache] = state.sums[0, :nb_cache]
    counts = torch.zeros(nb, dtype=torch.float32, device=dev)
    counts[:nb_cache] = state.block_counts(nb_cache)[0].float()
    path_keys = torch.where(anc[:, :, None, None], k.float()[None], 0.0)  # (n, n, Hkv, D)
    path_sums = torch.zeros(n, nb, hkv, d, dtype=torch.float32, device=dev).index_add_(1, node_block, path_keys)
    path_in_block = torch.zeros(n, nb, dtype=torch.float32, device=dev).index_add_(1, node_block, anc.float())
    means = (sums[None] + path_sums) / (counts[None] + path_in_block).clamp(min=1)[..., None, None]
    idx = select_from_means(q, means, layout, top_k, causal=True).long()  # (n, Hq, W)

    # Keys: the cached tokens of the selected blocks, then every tree node (masked).
    width = idx.shape[-1]
    token = idx[..., None] * bs + torch.arange(bs, device=dev)  # (n, Hq, W, bs)
    cached = ((idx[..., None] >= 0) & (token < lk)).flatten(2)  # (n, Hq, W * bs)
    token = token.clamp(0, lk - 1).flatten(2)
    head_kv = torch.arange(hq, device=dev) // (hq // hkv)  # (Hq,)
    # Masked slots point at some cached token: replace their values (0 * NaN is NaN).
    keys = k_cache[0, token, head_kv[None, :, None]].to(dtype)  # (n, Hq, W * bs, D)
    vals = torch.where(cached[..., None], v_cache[0, token, head_kv[None, :, None]].to(dtype), 0.0)
    selected = (idx[:, :, :, None] == node_block[None, None, None, :]).any(2)  # (n, Hq, n): node m's block chosen
    tree_ok = selected & anc[:, None, :]  # (n, Hq, n)
    # Node values per (node, head, other node): a node on another branch is replaced, not
    # weighted by probability 0.
    tree_vals = torch.where(tree_ok[..., None], v.to(dtype)[:, head_kv].transpose(0, 1)[None], 0.0)  # (n, Hq, n, D)
    qf = q.to(dtype)
    s_cache = torch.einsum("nhd,nhkd->nhk", qf, keys).masked_fill(~cached, float("-inf"))
    s_tree = torch.einsum("nhd,mhd->nhm", qf, k.to(dtype)[:, head_kv]).masked_fill(~tree_ok, float("-inf"))
    p = torch.cat([s_cache, s_tree], -1).mul(softmax_scale).softmax(-1)
    out = torch.einsum("nhk,nhkd->nhd", p[..., : width * bs], vals)
    out = out + torch.einsum("nhm,nhmd->nhd", p[..., width * bs :], tree_vals)
    return out.to(q.dtype)
