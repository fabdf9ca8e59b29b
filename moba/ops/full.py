"""Full (dense) attention with the same layouts and arguments as the MoBA functions.

``implementation="auto"`` uses flash-attn (``flash_attn_func`` / ``flash_attn_varlen_func``)
when it is installed and the tensors are on CUDA in float16/bfloat16, otherwise torch SDPA
(whose CUDA backends are flash and cuDNN attention). ``last_full_attn_implementation()``
reports what ran last; ``full_attn_implementation(q)`` what ``"auto"`` would pick.

``full_attn_with_kvcache`` covers decoding: queries shorter than keys (aligned to the end,
as in flash-attn) and an optional key padding mask (left-padded batches).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .._core.checks import (
    check_bool,
    check_cache_qkv,
    check_cu_seqlens,
    check_key_padding_mask,
    check_qkv,
    resolve_softmax_scale,
)

IMPLEMENTATIONS = ("auto", "flash_attn", "sdpa")
_last_implementation: str | None = None


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def full_attn_implementation(q: torch.Tensor, implementation: str = "auto") -> str:
    """The implementation ``full_attn_func`` would run for ``q``: "flash_attn" or "sdpa"."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    flash_ok = flash_attn_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if implementation == "flash_attn":
        if not flash_ok:
            raise RuntimeError(
                "implementation='flash_attn' needs the flash-attn package and CUDA float16/bfloat16 tensors"
            )
        return "flash_attn"
    if implementation == "auto" and flash_ok:
        return "flash_attn"
    return "sdpa"


def last_full_attn_implementation() -> str | None:
    """Which implementation the most recent full-attention call ran ("flash_attn" or "sdpa")."""
    return _last_implementation


def _record(name: str) -> None:
    global _last_implementation
    _last_implementation = name


def _sdpa(q, k, v, causal, scale):
    """(S, Hq, D) x (S, Hkv, D) in our layout, through torch SDPA with native GQA."""
    out = F.scaled_dot_product_attention(
        q.transpose(-3, -2),
        k.transpose(-3, -2),
        v.transpose(-3, -2),
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[-2] != k.shape[-2],
    )
    return out.transpose(-3, -2)


def full_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Dense attention. q (B, S, Hq, D), k/v (B, S, Hkv, D) -> (B, S, Hq, D)."""
    check_qkv(q, k, v, varlen=False)
    check_bool("causal", causal)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    impl = full_attn_implementation(q, implementation)
    _record(impl)
    if impl == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, causal=causal, softmax_scale=scale)
    return _sdpa(q, k, v, causal, scale)


def full_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Dense attention over packed sequences. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    check_qkv(q, k, v, varlen=True)
    check_bool("causal", causal)
    bounds = check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    impl = full_attn_implementation(q, implementation)
    _record(impl)
    if impl == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        cu = cu_seqlens.to(q.device)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal, softmax_scale=scale)
    parts = [
        _sdpa(q[a:b], k[a:b], v[a:b], causal, scale) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a
    ]
    # No tokens at all: one empty SDPA call, so that q, k and v all get (empty) gradients.
    return torch.cat(parts, dim=0) if parts else _sdpa(q, k, v, causal, scale)


def full_attn_with_kvcache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Dense attention of the newest queries over a (possibly padded) KV cache.

    Args:
        q: (B, Lq, Hq, D) queries; they are the last ``Lq`` positions of the keys
            (``Lq <= Lk``; query ``i`` sits at key position ``Lk - Lq + i``, as in flash-attn).
        k, v: (B, Lk, Hkv, D), ``Hq % Hkv == 0``.
        causal: mask keys after each query's position.
        key_padding_mask: optional (B, Lk) bool on q's device, True for real tokens. Outputs
            of queries at padding positions are 0; the padding's q, k, v are never read (NaN
            there stays there). With a mask, "auto" runs SDPA.
        implementation: "auto", "flash_attn" (no key_padding_mask) or "sdpa".

    Returns:
        (B, Lq, Hq, D) in q's dtype.
    """
    check_cache_qkv(q, k, v)
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    check_bool("causal", causal)
    scale = resolve_softmax_scale(softmax_scale, d)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if key_padding_mask is not None:
        key_padding_mask = check_key_padding_mask(key_padding_mask, b, lk, q.device)
        if bool(key_padding_mask.all()):
            key_padding_mask = None
    if key_padding_mask is None and lq == lk:
        return full_attn_func(q, k, v, causal, scale, implementation)
    if key_padding_mask is not None and implementation == "flash_attn":
        raise ValueError("implementation='flash_attn' does not take a key_padding_mask here; use 'auto' or 'sdpa'")
    impl = full_attn_implementation(q, implementation)
    if key_padding_mask is not None:
        impl = "sdpa"
    _record(impl)
    if impl == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, causal=causal, softmax_scale=scale)  # bottom-right aligned
    key_pos = torch.arange(lk, device=q.device)
    q_pos = key_pos[lk - lq :]
    allowed = torch.ones(b, lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & (key_pos[None, None, :] <= q_pos[None, :, None])
    q_valid = None
    if key_padding_mask is not None:
        kpm = key_padding_mask
        allowed = allowed & kpm[:, None, :]
        q_valid = kpm[:, lk - lq :]  # (B, Lq)
        allowed = allowed | ~q_valid[:, :, None]  # padding queries attend anywhere (no NaN), zeroed below
        # Replace the padding tokens' values: SDPA multiplies a masked key's value by probability
        # 0, and 0 * NaN is NaN. Padding queries become 0, so their (discarded) rows stay finite
        # and their backward adds nothing to the real tokens' gradients.
        k = torch.where(kpm[:, :, None, None], k, 0.0)
        v = torch.where(kpm[:, :, None, None], v, 0.0)
        q = torch.where(q_valid[:, :, None, None], q, 0.0)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed[:, None],
        scale=scale, enable_gqa=hq != k.shape[2],
    ).transpose(1, 2)
    if q_valid is not None:
        out = torch.where(q_valid[:, :, None, None], out, 0.0)
    return out
