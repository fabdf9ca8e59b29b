"""Full (dense) attention with the same layouts and arguments as the MoBA functions.

``implementation="auto"`` uses flash-attn (``flash_attn_func`` / ``flash_attn_varlen_func``)
when it is installed and the tensors are on CUDA in float16/bfloat16, otherwise torch SDPA
(whose CUDA backends are flash and cuDNN attention). ``last_full_attn_implementation()``
reports what ran last; ``full_attn_implementation(q)`` what ``"auto"`` would pick.

``full_attn_func`` / ``full_attn_varlen_func`` take flash-attn's arguments, positions and defaults
(``dropout_p`` 4th, ``causal=False``; fewer queries than keys are the last key positions, causal
bottom-right aligned); docs/api_compat.md lists where they differ from flash-attn.

``full_attn_with_kvcache`` covers decoding: queries shorter than keys (aligned to the end,
as in flash-attn) and an optional key padding mask (left-padded batches).
"""

from __future__ import annotations

import importlib.util
import numbers

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


def check_dropout_p(dropout_p) -> float:
    """flash-attn's ``dropout_p``: a float in [0, 1). A bool here is almost always ``causal`` passed
    positionally in the old order (flash-attn's 4th positional argument is ``dropout_p``)."""
    if isinstance(dropout_p, bool):
        raise TypeError(
            f"dropout_p must be a float in [0, 1), got {dropout_p!r}: the 4th positional argument is "
            "dropout_p, as in flash-attn; pass causal by keyword (causal=True)"
        )
    if not isinstance(dropout_p, numbers.Real) or not 0 <= float(dropout_p) < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _sdpa(q, k, v, causal, scale, dropout_p: float = 0.0):
    """(..., Sq, Hq, D) x (..., Sk, Hkv, D) in our layout, through torch SDPA with native GQA.

    ``Sq < Sk`` with ``causal``: the queries are the last ``Sq`` key positions (bottom-right
    aligned mask, as flash-attn); SDPA's own ``is_causal`` is top-left aligned, so an explicit
    mask is built then.

    A key or value a query cannot see never reaches it, even when it is not finite: SDPA
    multiplies a masked value by probability 0 (``0 * NaN`` is NaN), so causal inputs holding
    a non-finite key or value are cut at each such position (``_causal_segments``).
    """
    if causal and k.shape[-3] and not torch.compiler.is_compiling():
        bad = ~(torch.isfinite(k).flatten(-2).all(-1) & torch.isfinite(v).flatten(-2).all(-1))  # (..., Sk)
        if bool(bad.any()):
            if k.dim() == 3:
                return _causal_segments(q, k, v, bad.nonzero().squeeze(1).tolist(), scale, dropout_p)
            # A batch: the other rows run exactly as without the non-finite ones (whose k, v are
            # zeroed there), then each non-finite row is cut at its own positions.
            rows = bad.any(dim=-1)  # (B,)
            keep = rows[:, None, None, None]
            out = _sdpa_call(q, k.masked_fill(keep, 0), v.masked_fill(keep, 0), causal, scale, dropout_p)
            for r in rows.nonzero().squeeze(1).tolist():
                part = _causal_segments(q[r], k[r], v[r], bad[r].nonzero().squeeze(1).tolist(), scale, dropout_p)
                out = out.index_copy(0, torch.tensor([r], device=q.device), part[None])
            return out
    return _sdpa_call(q, k, v, causal, scale, dropout_p)


def _causal_segments(q, k, v, cuts: list[int], scale, dropout_p):
    """Causal attention with the keys cut at every position in ``cuts`` (sorted key positions
    holding a non-finite key or value): the queries at key positions [c_i, c_i+1) attend over
    keys [0, c_i+1) only, so no query's input includes a key after it. Exact, one SDPA call per
    segment."""
    sq, sk = q.shape[-3], k.shape[-3]
    offset = sk - sq  # query i sits at key position offset + i
    bounds = [0, *cuts, sk]
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        a, b = max(start - offset, 0), end - offset
        if b > a:
            parts.append(_sdpa_call(q[..., a:b, :, :], k[..., :end, :, :], v[..., :end, :, :], True, scale, dropout_p))
    return torch.cat(parts, dim=-3)


def _sdpa_call(q, k, v, causal, scale, dropout_p):
    sq, sk = q.shape[-3], k.shape[-3]
    mask = None
    if causal and sq != sk:
        pos = torch.arange(sk, device=q.device)
        mask = pos[None, :] <= pos[sk - sq :, None]  # (Sq, Sk), query i at key position Sk - Sq + i
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(-3, -2),
        k.transpose(-3, -2),
        v.transpose(-3, -2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[-2] != k.shape[-2],
    )
    return out.transpose(-3, -2)


def full_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    implementation: str = "auto",
) -> torch.Tensor:
    """Dense attention with ``flash_attn.flash_attn_func``'s arguments and defaults.

    Args:
        q: (B, Sq, Hq, D) queries.
        k, v: (B, Sk, Hkv, D), ``Hq % Hkv == 0`` (GQA/MQA), ``Sq <= Sk``. With ``Sq < Sk`` and
            ``causal`` the queries are the last ``Sq`` key positions (bottom-right aligned mask,
            as flash-attn).
        dropout_p: attention dropout probability (flash-attn's 4th positional argument).
        softmax_scale: defaults to ``D ** -0.5``.
        causal: default False, as in flash-attn (``moba_attn_func`` defaults to True).
        implementation: keyword only: "auto", "flash_attn" or "sdpa".

    Returns:
        (B, Sq, Hq, D) in q's dtype.
    """
    check_qkv(q, k, v, varlen=False, same_length=False)
    dropout_p = check_dropout_p(dropout_p)
    check_bool("causal", causal)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    impl = full_attn_implementation(q, implementation)
    _record(impl)
    if impl == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, dropout_p, softmax_scale=scale, causal=causal)
    return _sdpa(q, k, v, causal, scale, dropout_p)


# Positional parameters after (q, k, v, cu_seqlens_q): flash-attn's order, or the self-attention
# short form (one cu_seqlens, one max_seqlen), told apart by the type of the first one.
_FLASH_VARLEN_ORDER = ("cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p", "softmax_scale", "causal")


def full_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *args,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float | None = None,
    softmax_scale: float | None = None,
    causal: bool | None = None,
    implementation: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Dense attention over packed sequences, with ``flash_attn.flash_attn_varlen_func``'s arguments.

    Two call forms:

    * flash-attn's: ``full_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False)`` (positional or keyword);
    * self-attention short form: ``full_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, *,
      causal=False, ...)`` (= ``cu_seqlens_q = cu_seqlens_k``); further arguments by keyword.

    Args:
        q: (Tq, Hq, D); k, v: (Tk, Hkv, D), ``Hq % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32 boundaries; causal needs ``Lq <= Lk`` per
            sequence (the queries are the last ``Lq`` key positions: bottom-right aligned).
        max_seqlen_q, max_seqlen_k: longest query / key sequence (upper bounds are fine).
        dropout_p: attention dropout probability (default 0.0).
        softmax_scale: defaults to ``D ** -0.5``.
        causal: default False, as in flash-attn.
        implementation: "auto", "flash_attn" or "sdpa".

    Returns:
        (Tq, Hq, D) in q's dtype.
    """
    named = dict(cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                 dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)
    flash_form = bool(args) and isinstance(args[0], torch.Tensor)
    if args and not flash_form:
        if len(args) > 1:
            raise TypeError(
                "full_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen) takes its other arguments by keyword "
                f"(causal=..., softmax_scale=...), got {len(args) - 1} more positional; flash-attn's positional "
                "form is (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, "
                "softmax_scale, causal)"
            )
        if max_seqlen is not None:
            raise TypeError("full_attn_varlen_func() got multiple values for argument 'max_seqlen'")
        max_seqlen = args[0]
    elif flash_form:
        if len(args) > len(_FLASH_VARLEN_ORDER):
            raise TypeError(f"full_attn_varlen_func() takes at most {4 + len(_FLASH_VARLEN_ORDER)} positional "
                            f"arguments, got {4 + len(args)}")
        for name, value in zip(_FLASH_VARLEN_ORDER, args, strict=False):
            if named[name] is not None:
                raise TypeError(f"full_attn_varlen_func() got multiple values for argument {name!r}")
            named[name] = value
    if cu_seqlens is not None and cu_seqlens_q is not None:
        raise TypeError("pass cu_seqlens_q or cu_seqlens, not both")
    cu_q_t = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens
    if cu_q_t is None:
        raise TypeError("full_attn_varlen_func() needs cu_seqlens_q (or cu_seqlens)")
    cu_k_t = named["cu_seqlens_k"] if named["cu_seqlens_k"] is not None else cu_q_t
    two = named["cu_seqlens_k"] is not None
    max_q = named["max_seqlen_q"] if named["max_seqlen_q"] is not None else max_seqlen
    max_k = named["max_seqlen_k"] if named["max_seqlen_k"] is not None else max_seqlen
    max_k = max_q if max_k is None and not two else max_k
    if max_q is None or max_k is None:
        raise TypeError("full_attn_varlen_func() needs max_seqlen_q and max_seqlen_k (or max_seqlen)")
    causal = False if named["causal"] is None else named["causal"]
    drop = check_dropout_p(0.0 if named["dropout_p"] is None else named["dropout_p"])

    check_qkv(q, k, v, varlen=True, same_length=not two)
    check_bool("causal", causal)
    names = ("cu_seqlens_q", "cu_seqlens_k") if two else ("cu_seqlens", "cu_seqlens")
    bq = check_cu_seqlens(cu_q_t, max_q, q.shape[0], names[0])
    bk = check_cu_seqlens(cu_k_t, max_k, k.shape[0], names[1])
    if len(bq) != len(bk):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {len(bq) - 1} and {len(bk) - 1}")
    if causal:
        for n, (a, b, c, d) in enumerate(zip(bq[:-1], bq[1:], bk[:-1], bk[1:], strict=True)):
            if b - a > d - c:
                raise ValueError(
                    f"causal: sequence {n} has more queries ({b - a}) than keys ({d - c}); the queries are the "
                    "last tokens of their key sequence (bottom-right aligned), so each needs Lq <= Lk"
                )
    scale = resolve_softmax_scale(named["softmax_scale"], q.shape[-1])
    impl = full_attn_implementation(q, implementation)
    _record(impl)
    if impl == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        cu_q, cu_k = cu_q_t.to(q.device), cu_k_t.to(q.device)
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, drop, softmax_scale=scale, causal=causal)
    parts = [
        _sdpa(q[a:b], k[c:d], v[c:d], causal, scale, drop)
        for a, b, c, d in zip(bq[:-1], bq[1:], bk[:-1], bk[1:], strict=True)
        if b > a
    ]
    # No queries at all: one empty SDPA call, so that q, k and v all get (empty) gradients.
    return torch.cat(parts, dim=0) if parts else _sdpa(q, k, v, False, scale)


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
        return full_attn_func(q, k, v, softmax_scale=scale, causal=causal, implementation=implementation)
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
