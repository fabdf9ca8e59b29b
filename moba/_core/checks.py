"""Input validation shared by every public entry point.

Each check raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind,
wrong value) whose message names the argument and what was expected, so that bad
input never reaches a kernel.
"""

from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Value that marks an unused slot in a block-index tensor returned by ``select_blocks``.
PAD_INDEX = -1

#: Largest integer a size setting needs: no int64-indexed sequence is longer, so a block size
#: (or top_k) above it means exactly what this value means.
MAX_INT = 2**63 - 1

# softmax_scale must stay a finite, non-zero number in float32 (the compute dtype of every
# low-precision path): 1e300 is finite in Python and infinite in float32.
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_TINY = 1.1754943508222875e-38


def _short(value) -> str:
    """repr of a value for an error message, cut short (a 5000-digit int stays readable)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"an int of {len(str(abs(value)))} digits"
    return text if len(text) <= 80 else text[:77] + "..."


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {_short(value)}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_softmax_scale(softmax_scale) -> float | None:
    """None, or a positive float that is finite and non-zero in float32."""
    if softmax_scale is None:
        return None
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__} "
                        f"{_short(softmax_scale)}")
    try:
        value = float(softmax_scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"softmax_scale must be a finite positive number, got {_short(softmax_scale)}")
    if not _FLOAT32_TINY <= value <= _FLOAT32_MAX:
        raise ValueError(f"softmax_scale must be a float32 number (between {_FLOAT32_TINY:.3g} and "
                         f"{_FLOAT32_MAX:.3g}), got {value}: it would be 0 or inf in float32")
    return value


def resolve_softmax_scale(softmax_scale, head_dim: int) -> float:
    """``head_dim ** -0.5`` for None, else the given scale (``check_softmax_scale``), as a float."""
    if softmax_scale is None:
        return head_dim**-0.5
    return check_softmax_scale(softmax_scale)


def bind_varlen_args(func: str, args: tuple, named: dict, cu_seqlens_q, cu_seqlens, flash_order: tuple,
                     self_order: tuple, n_leading: int):
    """Bind the positional arguments after ``cu_seqlens_q`` of a varlen entry point, in either form.

    Two call forms share one signature: flash-attn's ``(..., cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, ...)`` (picked when the next positional argument is a 1-d tensor) and the short
    one ``(..., cu_seqlens, max_seqlen, ...)``. ``named`` holds the keyword values (None = not
    given) and is filled in place from ``args`` in the form's ``flash_order`` / ``self_order``.
    ``n_leading``: the positional arguments before ``args`` (for the count in the error).

    Returns ``(cu_q, cu_k, max_q, max_k, separate_k)``: the query and key boundaries (the same
    tensor unless ``cu_seqlens_k`` was given, then ``separate_k`` is True) and their max lengths.
    """
    positional_cu_k = bool(args) and isinstance(args[0], torch.Tensor) and args[0].dim() == 1
    order = flash_order if positional_cu_k else self_order
    if len(args) > len(order):
        raise TypeError(f"{func}() takes at most {n_leading + len(order)} positional arguments in this form, "
                        f"got {n_leading + len(args)}")
    for name, value in zip(order, args, strict=False):
        if named[name] is not None:
            raise TypeError(f"{func}() got multiple values for argument {name!r}")
        named[name] = value
    if cu_seqlens is not None and cu_seqlens_q is not None:
        raise TypeError("pass cu_seqlens_q or cu_seqlens, not both")
    cu_q = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens
    if cu_q is None:
        raise TypeError(f"{func}() needs cu_seqlens_q (or cu_seqlens)")
    separate_k = named["cu_seqlens_k"] is not None
    cu_k = named["cu_seqlens_k"] if separate_k else cu_q
    max_q = named["max_seqlen_q"] if named["max_seqlen_q"] is not None else named["max_seqlen"]
    max_k = named["max_seqlen_k"] if named["max_seqlen_k"] is not None else named["max_seqlen"]
    max_k = max_q if max_k is None and not separate_k else max_k
    if max_q is None or max_k is None:
        raise TypeError(f"{func}() needs max_seqlen_q and max_seqlen_k (or max_seqlen)")
    return cu_q, cu_k, max_q, max_k, separate_k


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_attention_tensors(q, k, v, names: tuple[str, str, str], rank: int, layout: str) -> None:
    """What every attention entry point needs of its q, k, v: tensors of ``rank`` dimensions,
    one floating dtype, one device, k and v of one shape, >= 1 head and head dim,
    ``Hq % Hkv == 0``. Leading dimensions are checked by the callers."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v), strict=True):
        _check_tensor(name, t)
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dimensions {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape, got {nk} {tuple(k.shape)} and {nv} {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{nq}, {nk} and {nv} must share one dtype, got {nq} {q.dtype}, {nk} {k.dtype}, {nv} {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"{nq}, {nk} and {nv} must be on one device, got {nq} {q.device}, {nk} {k.device}, {nv} {v.device}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{nq} and {nk} must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError(f"{nq}, {nk} and {nv} must have head_dim >= 1, got shape {nq} {tuple(q.shape)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hq == 0 or hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads ({hq}) must be a positive multiple of the number of key/value heads "
            f"({hkv}): {nq} {tuple(q.shape)}, {nk} {tuple(k.shape)}"
        )


def check_qkv(q, k, v, *, varlen: bool, same_length: bool = True) -> None:
    """Check ranks, shapes, dtypes and devices of q, k, v.

    fixed length: q (B, S, Hq, D), k/v (B, S, Hkv, D); varlen: q (T, Hq, D), k/v (T, Hkv, D).
    ``same_length=False``: q may have fewer tokens than k/v (Sq <= Sk; varlen: any totals,
    the sequence boundaries are checked by the caller).
    """
    rank = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    _check_attention_tensors(q, k, v, ("q", "k", "v"), rank, layout)
    lead = 1 if varlen else 2
    if same_length and q.shape[:lead] != k.shape[:lead]:
        what = "total tokens" if varlen else "batch and seqlen"
        raise ValueError(
            f"q and k must agree on {what}: q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if not same_length and not varlen:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must agree on batch: q {tuple(q.shape)}, k {tuple(k.shape)}")
        if q.shape[1] > k.shape[1]:
            raise ValueError(
                f"q has more tokens ({q.shape[1]}) than k ({k.shape[1]}); queries are the last "
                f"tokens of the key sequence (bottom-right aligned), so seqlen_q <= seqlen_k"
            )


def check_cache_qkv(q, k, v, names: tuple[str, str, str] = ("q", "k", "v")) -> None:
    """Queries over a KV cache: q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D), ``Lq <= Lk``."""
    _check_attention_tensors(q, k, v, names, 4, "(batch, seqlen, heads, head_dim)")
    nq, nk, _ = names
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{nq} and {nk} must have the same batch size, got {nq} {tuple(q.shape)}, {nk} {tuple(k.shape)}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(
            f"{nq} has more queries ({q.shape[1]}) than {nk} has keys ({k.shape[1]}); need Lq <= Lk "
            "(the queries are the newest cached tokens)"
        )


def check_key_padding_mask(mask, batch: int, seqlen: int, device, name: str = "key_padding_mask") -> torch.Tensor:
    """A (batch, seqlen) bool mask, True for real tokens; returned on ``device``."""
    _check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True for real tokens), got {mask.dtype}")
    if tuple(mask.shape) != (batch, seqlen):
        raise ValueError(f"{name} must have shape (batch, seqlen_k) = {(batch, seqlen)}, got {tuple(mask.shape)}")
    if mask.device != torch.device(device):
        raise ValueError(f"{name} must be on the device of the keys ({device}), got {mask.device}")
    return mask


def check_nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__} {_short(value)}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def check_positive_float(name: str, value) -> float:
    """A finite number > 0 (numpy scalars are converted to a Python float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_cu_seqlens(cu_seqlens, max_seqlen, total_tokens: int, name: str = "cu_seqlens") -> list[int]:
    """Validate packed-sequence boundaries and return them as a host list."""
    _check_tensor(name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have shape (num_seqs + 1,), got {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {bounds}")
    if bounds[-1] != total_tokens:
        raise ValueError(f"{name}[-1] must equal the total number of tokens {total_tokens}, got {bounds[-1]}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        hint = (" (sequence boundaries here are probably cu_seqlens_k passed positionally as a list: give "
                "cu_seqlens_k as a 1-d int32 tensor)") if isinstance(max_seqlen, (list, tuple, torch.Tensor)) else ""
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}{hint}")
    if max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({max(lengths)})")
    return bounds


def check_block_indices(block_indices, expected_lead: tuple[int, ...], name: str = "block_indices") -> None:
    """Shape and dtype of user-given block indices; values are checked by ``validate_index_values``."""
    _check_tensor(name, block_indices)
    if block_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {block_indices.dtype}")
    if tuple(block_indices.shape[:-1]) != tuple(expected_lead) or block_indices.dim() != len(expected_lead) + 1:
        raise ValueError(
            f"{name} must have shape {tuple(expected_lead) + ('n_slots',)}, got {tuple(block_indices.shape)}"
        )
    if block_indices.shape[-1] < 1:
        raise ValueError(f"{name} needs at least one slot per query")
