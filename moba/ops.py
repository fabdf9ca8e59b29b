"""Public MoBA attention functions (fixed length and varlen)."""

from __future__ import annotations

import torch

from ._checks import (
    check_block_indices,
    check_bool,
    check_cu_seqlens,
    check_positive_int,
    check_qkv,
    resolve_softmax_scale,
)
from ._layout import build_layout
from .backends import resolve_backend
from .gate import check_index_values


def _moba_packed(q, k, v, cu, block_size, top_k, causal, softmax_scale, backend, block_indices):
    block_size = check_positive_int("block_size", block_size)
    top_k = check_positive_int("top_k", top_k)
    check_bool("causal", causal)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    impl = resolve_backend(backend, q.device, q)
    if block_indices is None and impl.gated_attention is not None:
        return impl.gated_attention(q, k, v, cu, cu, block_size, top_k, causal, scale)
    layout = build_layout(cu, cu, block_size, q.device)
    if block_indices is None:
        with torch.no_grad():
            block_indices = impl.select(q, k, layout, top_k, causal)
    else:
        check_block_indices(block_indices, tuple(q.shape[:2]))
        block_indices = check_index_values(block_indices.to(q.device), layout, causal)
    return impl.attention(q, k, v, layout, block_indices, causal, scale)


def moba_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    block_size: int,
    top_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    *,
    block_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoBA attention over packed variable-length sequences.

    Args:
        q: (T, Hq, D) queries of all sequences, concatenated.
        k, v: (T, Hkv, D), ``Hq % Hkv == 0`` (query head h reads KV head h // (Hq // Hkv)).
        cu_seqlens: (N + 1,) int32, sequence n is tokens ``cu_seqlens[n]:cu_seqlens[n+1]``;
            empty sequences are allowed. Blocks start at each sequence's first token.
        max_seqlen: length of the longest sequence (an upper bound is fine).
        block_size: tokens per key block (>= 1, any integer).
        top_k: blocks per query, own block included (>= 1); >= n_blocks is dense attention.
        causal: causal (default) or bidirectional attention.
        softmax_scale: defaults to ``D ** -0.5``.
        backend: "auto", "torch", "triton" or "reference".
        block_indices: optional (T, Hq, n_slots) local block indices (e.g. from
            ``select_blocks_varlen``) to use instead of running the gate; ``top_k`` is then unused.

    Returns:
        (T, Hq, D), same dtype as q.

    Example:
        >>> cu = torch.tensor([0, 1000, 3000], dtype=torch.int32)
        >>> out = moba_attn_varlen_func(q, k, v, cu, 2000, block_size=256, top_k=3)
    """
    check_qkv(q, k, v, varlen=True)
    cu = check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    return _moba_packed(q, k, v, cu, block_size, top_k, causal, softmax_scale, backend, block_indices)


def moba_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    *,
    block_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoBA attention for a fixed-length batch (flash-attn layout).

    Args:
        q: (B, S, Hq, D) queries.
        k, v: (B, S, Hkv, D) keys and values, ``Hq % Hkv == 0`` (GQA / MQA).
        block_size: tokens per key block (>= 1, any integer; the last block may be shorter).
        top_k: blocks per query, own block included (>= 1). ``top_k=1`` is block-diagonal
            local attention; ``top_k >= ceil(S / block_size)`` is dense attention.
        causal: causal (default) or bidirectional attention.
        softmax_scale: defaults to ``D ** -0.5``.
        backend: "auto" (Triton on CUDA when available, else PyTorch), "torch", "triton" or
            "reference" (dense mask, small sizes only).
        block_indices: optional (B, S, Hq, n_slots) block indices from ``select_blocks`` to
            use instead of running the gate; ``top_k`` is then unused.

    Returns:
        (B, S, Hq, D), same dtype as q.

    Example:
        >>> q = torch.randn(1, 4096, 8, 64); k = v = torch.randn(1, 4096, 2, 64)
        >>> out = moba_attn_func(q, k, v, block_size=512, top_k=3)   # (1, 4096, 8, 64)
    """
    check_qkv(q, k, v, varlen=False)
    b, s = q.shape[:2]
    if block_indices is not None:
        check_block_indices(block_indices, tuple(q.shape[:3]))
        block_indices = block_indices.reshape(b * s, *block_indices.shape[2:])
    out = _moba_packed(
        q.reshape(b * s, *q.shape[2:]),
        k.reshape(b * s, *k.shape[2:]),
        v.reshape(b * s, *v.shape[2:]),
        [i * s for i in range(b + 1)],  # host ints (SymInts under torch.compile): no tensor round trip
        block_size,
        top_k,
        causal,
        softmax_scale,
        backend,
        block_indices,
    )
    return out.reshape(q.shape)
