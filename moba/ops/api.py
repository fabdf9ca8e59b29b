"""Public MoBA attention functions (fixed length and varlen), with flash-attn's conventions.

* Layouts and argument names follow flash-attn: ``q (B, Sq, Hq, D)`` / packed ``q (Tq, Hq, D)``,
  ``cu_seqlens_q / cu_seqlens_k / max_seqlen_q / max_seqlen_k``; queries may be fewer than keys
  (chunked prefill, decoding with a cache): they are the *last* tokens of their key sequence
  (bottom-right aligned causal mask), so query ``i`` of ``Lq`` sits at key position ``Lk - Lq + i``.
* ``return_lse=True`` also returns the log-sum-exp of the scaled scores over the attended keys,
  in flash-attn's layout: ``(B, Hq, Sq)`` fixed length, ``(Hq, Tq)`` varlen; float32 (float64
  for float64 inputs); not differentiable (as in flash-attn). With it, a MoBA output can be
  merged with other attention over other keys (ring attention, cascades):
  ``lse = logaddexp(lse1, lse2)``, ``out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse)``.
* Settings come from explicit arguments or from ``config=MoBAConfig(...)`` (see
  ``moba.config`` for the rule when both are given: they must agree).

``deterministic=True`` asks for bitwise-reproducible results, forward and backward:

====================  ============================================================================
backend               deterministic
====================  ============================================================================
``"reference"``       always (dense matmuls)
``"torch"``           CPU: always. CUDA: only under ``torch.use_deterministic_algorithms(True)``
                      (dK/dV use ``index_add_``, atomic otherwise); a call that needs gradients
                      raises ``NotImplementedError`` without it.
``"triton"``          always: no kernel uses atomics (per-slot partials merged in slot order)
====================  ============================================================================
"""

from __future__ import annotations

import torch

from .._core.checks import (
    bind_varlen_args,
    check_block_indices,
    check_bool,
    check_cu_seqlens,
    check_qkv,
    resolve_softmax_scale,
)
from .._core.layout import build_layout, check_query_key_lengths
from ..config import MoBAConfig, resolve_config
from .full import _sdpa
from .gate import check_index_values
from .registry import resolve_backend


def _settings(fn: str, config, block_indices, **given) -> MoBAConfig:
    """Merge config and arguments; block_size (and top_k unless indices are given) are required."""
    if config is None:
        if given.get("block_size") is None and given.get("moba_chunk_size") is None:
            raise TypeError(f"{fn}() needs block_size (or config=moba.MoBAConfig(...))")
        if given.get("top_k") is None and given.get("moba_topk") is None and block_indices is None:
            raise TypeError(f"{fn}() needs top_k (or config=moba.MoBAConfig(...), or block_indices=...)")
    return resolve_config(config, **given)


def _moba_packed(q, k, v, cu_q: list[int], cu_k: list[int], cfg: MoBAConfig, block_indices, return_lse: bool):
    """q (Tq, Hq, D), k/v (Tk, Hkv, D) packed -> out (Tq, Hq, D) [, lse (Tq, Hq)]."""
    scale = resolve_softmax_scale(cfg.softmax_scale, q.shape[-1])
    # before any shortcut (the dense one of the torch path included): every backend refuses alike
    check_query_key_lengths(cu_q, cu_k)
    # The CPU SDPA kernels read the head dim as if its stride were 1: a view with another
    # last-dim stride (x[..., ::2], an einops split of a fused qkv) is copied first.
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in (q, k, v))
    impl = resolve_backend(cfg.backend, q.device, q)
    if cfg.deterministic and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        reason = impl.nondeterministic_reason(q.device)
        if reason is not None:
            raise NotImplementedError(f"deterministic=True: backend {impl.name!r} is not deterministic on {q.device}: {reason}")
    if q.shape[0] == 0:
        # No queries: SDPA's empty output keeps q, k and v in the autograd graph, so all three
        # get zero-sized gradients, as with dense attention.
        out = _sdpa(q, k, v, cfg.causal, scale)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (out, q.new_zeros(0, q.shape[1], dtype=lse_dtype)) if return_lse else out
    if block_indices is None and not return_lse and impl.gated_attention is not None:
        # gate + attention in one custom op (torch.compile traces it with dynamic lengths)
        return impl.gated_attention(q, k, v, cu_q, cu_k, cfg.block_size, cfg.top_k, cfg.causal, scale)
    layout = build_layout(cu_q, cu_k, cfg.block_size, q.device)
    if block_indices is None:
        with torch.no_grad():
            block_indices = impl.select(q, k, layout, cfg.top_k, cfg.causal)
    else:
        check_block_indices(block_indices, tuple(q.shape[:2]))
        block_indices = check_index_values(block_indices.to(q.device), layout, cfg.causal)
    if not return_lse:
        return impl.attention(q, k, v, layout, block_indices, cfg.causal, scale)
    if impl.attention_lse is None:
        raise NotImplementedError(f"backend {impl.name!r} cannot return the log-sum-exp (return_lse=True)")
    out, lse = impl.attention_lse(q, k, v, layout, block_indices, cfg.causal, scale)
    return out, lse.detach().to(torch.float64 if q.dtype == torch.float64 else torch.float32)


# Positional parameters after (q, k, v, cu_seqlens_q): flash-attn's order, and the original
# self-attention order (one cu_seqlens / max_seqlen), told apart by the second one's type.
_FLASH_ORDER = ("cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "block_size", "top_k", "causal",
                "softmax_scale", "backend")
_SELF_ORDER = ("max_seqlen", "block_size", "top_k", "causal", "softmax_scale", "backend")


def moba_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *args,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    block_size: int | None = None,
    top_k: int | None = None,
    causal: bool | None = None,
    softmax_scale: float | None = None,
    backend: str | None = None,
    config: MoBAConfig | None = None,
    block_indices: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    moba_chunk_size: int | None = None,
    moba_topk: int | None = None,
):
    """MoBA attention over packed variable-length sequences (flash-attn varlen layout).

    Two call forms, positional or by keyword:

    * flash-attn's: ``moba_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, block_size, top_k, causal=True, softmax_scale=None, backend="auto")``;
    * self-attention: ``moba_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, block_size, top_k,
      causal=True, softmax_scale=None, backend="auto")`` (= ``cu_seqlens_q = cu_seqlens_k``).

    Args:
        q: (Tq, Hq, D) queries of all sequences, concatenated.
        k, v: (Tk, Hkv, D), ``Hq % Hkv == 0`` (query head h reads KV head h // (Hq // Hkv)).
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32; sequence n owns queries
            ``cu_seqlens_q[n]:cu_seqlens_q[n+1]`` and keys ``cu_seqlens_k[n]:cu_seqlens_k[n+1]``,
            with ``Lq <= Lk`` per sequence: its queries are its last ``Lq`` key positions
            (bottom-right aligned causal). Empty sequences are allowed. Blocks start at each
            sequence's first key. ``cu_seqlens_k`` defaults to ``cu_seqlens_q``.
        max_seqlen_q, max_seqlen_k: longest query / key sequence (upper bounds are fine);
            ``max_seqlen`` sets both.
        block_size: tokens per key block (>= 1, any integer).
        top_k: blocks per query, own block included (>= 1); >= n_blocks is dense attention.
        causal: causal (default) or bidirectional attention.
        softmax_scale: defaults to ``D ** -0.5``.
        backend: "auto" (default), "torch", "triton" or "reference".
        config: a ``moba.MoBAConfig`` instead of (or agreeing with) the settings above.
        block_indices: optional (Tq, Hq, n_slots) local block indices (e.g. from
            ``select_blocks_varlen``) to use instead of running the gate; ``top_k`` is then unused.
        return_lse: also return the log-sum-exp, (Hq, Tq) float32 (flash-attn's varlen layout).
        deterministic: require reproducible results (see the table at the top of ``moba.ops``).
        moba_chunk_size, moba_topk: the official MoBA package's names for block_size, top_k.

    Returns:
        out (Tq, Hq, D), same dtype as q; ``(out, lse)`` with ``return_lse=True``.

    Example:
        >>> cu = torch.tensor([0, 1000, 3000], dtype=torch.int32)
        >>> out = moba_attn_varlen_func(q, k, v, cu, 2000, block_size=256, top_k=3)
        >>> cu_k = torch.tensor([0, 1500, 5000], dtype=torch.int32)   # 500 + 1500 cached keys
        >>> out, lse = moba_attn_varlen_func(q, k2, v2, cu, cu_k, 2000, 3500, 256, 3, return_lse=True)
    """
    named = dict(cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                 block_size=block_size, top_k=top_k, causal=causal, softmax_scale=softmax_scale,
                 backend=backend, max_seqlen=max_seqlen)
    if args and isinstance(args[0], (list, tuple)):  # neither max_seqlen (an int) nor a cu_seqlens tensor
        raise TypeError(f"moba_attn_varlen_func(): the argument after cu_seqlens_q is cu_seqlens_k (a 1-d int32 "
                        f"tensor) or max_seqlen (an int), got {type(args[0]).__name__} {args[0]!r}; pass "
                        f"cu_seqlens_k as torch.tensor(..., dtype=torch.int32)")
    cu_q_t, cu_k_t, max_q, max_k, flash_form = bind_varlen_args(
        "moba_attn_varlen_func", args, named, cu_seqlens_q, cu_seqlens, _FLASH_ORDER, _SELF_ORDER, n_leading=4)

    cfg = _settings("moba_attn_varlen_func", config, block_indices, block_size=named["block_size"],
                    top_k=named["top_k"], causal=named["causal"], softmax_scale=named["softmax_scale"],
                    backend=named["backend"], deterministic=deterministic, moba_chunk_size=moba_chunk_size,
                    moba_topk=moba_topk)
    check_bool("return_lse", return_lse)
    check_qkv(q, k, v, varlen=True, same_length=not flash_form)
    names = ("cu_seqlens_q", "cu_seqlens_k") if flash_form else ("cu_seqlens", "cu_seqlens")
    cu_q = check_cu_seqlens(cu_q_t, max_q, q.shape[0], names[0])
    cu_k = check_cu_seqlens(cu_k_t, max_k, k.shape[0], names[1])
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {len(cu_q) - 1} and {len(cu_k) - 1}")
    result = _moba_packed(q, k, v, cu_q, cu_k, cfg, block_indices, return_lse)
    if return_lse:
        out, lse = result
        return out, lse.transpose(0, 1).contiguous()  # (Hq, Tq), as flash_attn_varlen_func
    return result


def moba_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int | None = None,
    top_k: int | None = None,
    causal: bool | None = None,
    softmax_scale: float | None = None,
    backend: str | None = None,
    *,
    config: MoBAConfig | None = None,
    block_indices: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool | None = None,
    moba_chunk_size: int | None = None,
    moba_topk: int | None = None,
):
    """MoBA attention for a fixed-length batch (flash-attn layout).

    Args:
        q: (B, Sq, Hq, D) queries.
        k, v: (B, Sk, Hkv, D) keys and values, ``Sq <= Sk``, ``Hq % Hkv == 0`` (GQA / MQA).
            With ``Sq < Sk`` the queries are the last ``Sq`` positions (bottom-right aligned
            causal, as flash-attn): chunked prefill, or decoding against a cache.
        block_size: tokens per key block (>= 1, any integer; the last block may be shorter).
        top_k: blocks per query, own block included (>= 1). ``top_k=1`` is block-diagonal
            local attention; ``top_k >= ceil(Sk / block_size)`` is dense attention.
        causal: causal (default True) or bidirectional attention.
        softmax_scale: defaults to ``D ** -0.5``.
        backend: "auto" (default: Triton on CUDA when available, else PyTorch), "torch",
            "triton" or "reference" (dense mask, small sizes only).
        config: a ``moba.MoBAConfig`` instead of (or agreeing with) the settings above.
        block_indices: optional (B, Sq, Hq, n_slots) block indices from ``select_blocks`` to
            use instead of running the gate; ``top_k`` is then unused.
        return_lse: also return the log-sum-exp, (B, Hq, Sq) float32 (flash-attn's layout).
        deterministic: require reproducible results (see the table at the top of ``moba.ops``).
        moba_chunk_size, moba_topk: the official MoBA package's names for block_size, top_k.

    Returns:
        out (B, Sq, Hq, D), same dtype as q; ``(out, lse)`` with ``return_lse=True``.

    Example:
        >>> q = torch.randn(1, 4096, 8, 64); k = v = torch.randn(1, 4096, 2, 64)
        >>> out = moba_attn_func(q, k, v, block_size=512, top_k=3)   # (1, 4096, 8, 64)
        >>> out, lse = moba_attn_func(q, k, v, config=MoBAConfig(512, 3), return_lse=True)
    """
    cfg = _settings("moba_attn_func", config, block_indices, block_size=block_size, top_k=top_k,
                    causal=causal, softmax_scale=softmax_scale, backend=backend,
                    deterministic=deterministic, moba_chunk_size=moba_chunk_size, moba_topk=moba_topk)
    check_bool("return_lse", return_lse)
    check_qkv(q, k, v, varlen=False, same_length=False)
    b, sq = q.shape[:2]
    sk = k.shape[1]
    if block_indices is not None:
        check_block_indices(block_indices, tuple(q.shape[:3]))
        block_indices = block_indices.reshape(b * sq, *block_indices.shape[2:])
    result = _moba_packed(
        q.reshape(b * sq, *q.shape[2:]),
        k.reshape(b * sk, *k.shape[2:]),
        v.reshape(b * sk, *v.shape[2:]),
        [i * sq for i in range(b + 1)],
        [i * sk for i in range(b + 1)],
        cfg,
        block_indices,
        return_lse,
    )
    if return_lse:
        out, lse = result
        return out.reshape(q.shape), lse.reshape(b, sq, q.shape[2]).transpose(1, 2).contiguous()  # (B, Hq, Sq)
    return result.reshape(q.shape)


# -- the official MoonshotAI/MoBA package's function names (drop-in; our semantics) -----------
def moba_attn_varlen(q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, **kwargs):
    """The official package's ``moba_attn_varlen``: ``moba_attn_varlen_func`` under its name.

    Same arguments (q, k, v (T, H, D), cu_seqlens, max_seqlen, moba_chunk_size, moba_topk), causal.
    Our semantics: ``moba_topk`` counts the own block and ``moba_topk=1`` is local block
    attention (the official code falls back to dense causal attention there); GQA works; keyword
    arguments of ``moba_attn_varlen_func`` (backend, return_lse, ...) are accepted too.
    """
    return moba_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, **kwargs)


def moba_attn_varlen_naive(q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, **kwargs):
    """The official package's ``moba_attn_varlen_naive``: the dense-mask reference backend."""
    return moba_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk,
                                 backend="reference", **kwargs)
