"""MoBA as a Hugging Face transformers attention implementation.

    import transformers
    from moba.integrations.transformers import register_moba

    register_moba(block_size=512, top_k=3, full_attention_layers=(-1, -2, -3))   # name "moba"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="moba")
    out = model.generate(**inputs)      # prefill: MoBA; every decoding step: sparse MoBA on the KV cache
    model.set_attn_implementation("sdpa")   # e.g. switch to full attention at a chosen training step

Tested with transformers 4.56 to 5.24 (Llama, Qwen2, Qwen3, Mistral, built from configs; see
``TESTED_TRANSFORMERS_VERSIONS``). Registering on a release outside that range warns once. The
integration reads what it needs from transformers' own signatures rather than from one release's
internals: the KV cache is the attention module's ``forward`` parameter annotated ``Cache``
(``past_key_values`` up to 5.23, ``cache`` from 5.24), and the mask function takes every argument
by keyword (``cache_position`` before 5.4, ``q_length``/``q_offset`` after). It uses
transformers' own registration API: ``AttentionInterface.register(name, fn)`` for the attention
and ``AttentionMaskInterface.register(name, mask_fn)`` so the model builds no (S, S) mask: the
mask function returns the 2D padding mask (B, kv_len) when there is padding and ``None``
otherwise (as for flash-attention).

What the attention function does (query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D)):

* hybrid: layers in ``full_attention_layers`` (``module.layer_idx``; negative indices count
  from ``config.num_hidden_layers``) run dense attention through ``moba.ops.full``
  (flash-attn or SDPA; ``moba.last_full_attn_implementation()`` says which);
* prefill (``Lq == Lk``): ``moba.moba_attn_varlen_func`` over the real tokens (padding removed,
  sequences packed; packed sequences in one row, detected from ``position_ids`` restarts as
  transformers does, become separate sequences); autograd works, so the model trains;
* decoding (``Lq < Lk``: one token, or a chunk as in speculative decoding): ``moba.decode``.
  The gate reads block means kept incrementally per layer in a ``BlockMeanState``, stored
  per cache object (weakly, so it dies with the cache). The cache is found through a forward
  pre-hook that this module adds to each attention module on its first call (the attention
  function itself is not given the cache); on that first call, every step recomputes the
  means from the keys (correct, not incremental), and the query positions are checked against
  the key length so that a fixed-size cache is refused even before its hook sees it. Only
  growing caches (``DynamicCache``) are accepted: static, quantized or unknown cache objects
  raise a ``ValueError`` naming the cache class. ``crop`` (rejected speculative tokens) is
  detected from the lengths and the affected blocks are recomputed; ``reorder_cache`` /
  ``batch_select_indices`` / ``batch_repeat_interleave`` (beam search) are followed;
  ``reset`` or a new prompt restarts from a prefill.

GQA (Hkv < Hq) is handled natively (no KV repeat), ``scaling`` is respected. Rejected with a
clear error: dropout > 0, sliding-window layers once a sequence is longer than the window
(shorter sequences are exact: Mistral's default 4096 window works up to 4096 tokens), logit soft-capping, attention sinks,
position biases, custom 4D masks, ``output_attentions``, non-causal decoding, static or
unrecognised caches, and keyword arguments the integration does not know (named in the error).
Left-padded (and right-padded prefill) batches are unpadded; padding inside a row (a hole) is
skipped and the row's real tokens stay one sequence, in prefill as in decoding; a decoding batch
whose padding is not a left prefix of each row falls back to a from-scratch sparse path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import warnings
import weakref
from dataclasses import dataclass

import torch

from .._core.layout import build_layout
from ..config import MoBAConfig, resolve_config
from ..decode.kv_cache import BlockMeanState, moba_decode
from ..nn import hybrid
from ..ops.api import moba_attn_func, moba_attn_varlen_func
from ..ops.full import full_attn_with_kvcache
from ..ops.gate import select_packed
from ..ops.registry import resolve_backend

#: The transformers releases the test suite runs on (``make test`` pins the newest one in
#: constraints.txt; ``make test-oldest`` / ``make test-latest`` run the ends of the range).
TESTED_TRANSFORMERS_VERSIONS = ("4.56.0", "5.24.0")

#: Attention keyword arguments this module reads (each changes what attention computes).
_HANDLED_KWARGS = frozenset({
    "position_ids", "is_causal", "sliding_window", "softcap", "s_aux", "position_bias", "output_attentions",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
})
#: Keyword arguments transformers passes along that do not change attention's output.
_IGNORED_KWARGS = frozenset({
    "use_cache", "cache_position", "output_hidden_states", "output_router_logits", "num_items_in_batch",
    "seq_idx", "return_dict", "token_type_ids", "layer_idx",
})
#: Names of the attention module's cache parameter in releases whose annotations do not say ``Cache``.
_CACHE_PARAMETER_NAMES = ("cache", "past_key_values", "past_key_value")

# cache object -> {layer_idx: BlockMeanState}; entries die with their cache.
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class MoBASettings:
    """What one ``register_moba`` call registered: the ``MoBAConfig`` (the canonical settings,
    ``moba.config``) plus the integration's own ``full_attention_layers``."""

    config: MoBAConfig
    full_attention_layers: tuple[int, ...]

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def backend(self) -> str:
        return self.config.backend


# -- the cache of the current forward --------------------------------------------------------
class _UnknownCache:
    """Marker: this module's cache has not been seen yet (its first call, before the hook)."""


_UNKNOWN = _UnknownCache()


def _cache_parameter(module) -> tuple[str, int | None]:
    """The attention module's forward parameter that carries the KV cache, from its signature:
    (name, positional index or None). ``inspect.signature`` follows ``functools.wraps``, so
    transformers' ``deprecate_kwarg`` wrappers show the real parameters."""
    params = list(inspect.signature(module.forward).parameters.values())
    for i, p in enumerate(params):
        annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", repr(p.annotation))
        if "Cache" in str(annotation) or p.name in _CACHE_PARAMETER_NAMES:
            positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            return p.name, (i if positional else None)
    return None, None  # a module that takes no cache: every step recomputes the block means


def _install_cache_hook(module) -> None:
    module._moba_tracks_cache = True
    name, position = _cache_parameter(module)
    if name is None:
        return

    def capture(mod, args, kwargs):
        cache = kwargs.get(name)
        if cache is None and position is not None and len(args) > position:
            cache = args[position]
        if cache is not None:
            try:
                _check_cache(cache)  # before the model writes into a cache we cannot follow
            except ValueError:
                _release_refused_cache(cache)
                raise
        try:
            mod._moba_cache_ref = weakref.ref(cache) if cache is not None else None
        except TypeError:  # not weakly referenceable: decode without a stored state
            mod._moba_cache_ref = None

    module.register_forward_pre_hook(capture, with_kwargs=True)


def _release_refused_cache(cache) -> None:
    """Leave a refused fixed-size cache unusable for any batch size.

    ``generate`` keeps the static cache it built (``model._cache``) and reuses it when its
    ``max_batch_size`` matches the next call. Releases whose static layers initialize lazily
    (4.56) then read ``max_batch_size`` of layers the refused forward never reached, and fail
    deep inside transformers. With every layer's ``max_batch_size`` set to -1, the next
    ``generate`` builds a new cache instead, and gets this module's clear refusal again.
    """
    for layer in getattr(cache, "layers", None) or []:
        with contextlib.suppress(AttributeError, TypeError):  # e.g. a read-only property
            layer.max_batch_size = -1


def _cache_of_caller(module):
    """The cache the attention module's forward was called with, read from its frame (a
    module's first call, before its cache hook exists); None when not found."""
    name, _ = _cache_parameter(module)
    frame = sys._getframe(1)
    for _ in range(8):  # moba_attention <- (transformers wrappers) <- the module's forward
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_locals.get("self") is module and name in frame.f_locals:
            return frame.f_locals[name]
    return None


def _current_cache(module):
    """The cache of this forward, ``None`` when there is none, ``_UNKNOWN`` on a module's first call."""
    if not getattr(module, "_moba_tracks_cache", False):
        _install_cache_hook(module)
        return _UNKNOWN  # this call started before the hook existed
    ref = getattr(module, "_moba_cache_ref", None)
    return ref() if ref is not None else None


def _follow_batch_edits(cache, states: dict) -> None:
    """Make the cache's batch edits (beam search and friends) also apply to our states."""

    def rows(index):
        index = torch.as_tensor(index)
        return index.nonzero().squeeze(1) if index.dtype == torch.bool else index

    edits = {
        "reorder_cache": lambda st, idx: st.select_rows(rows(idx)),
        "batch_select_indices": lambda st, idx: st.select_rows(rows(idx)),
        "batch_repeat_interleave": lambda st, r: st.repeat_rows(int(r)),
    }
    for name, edit in edits.items():
        original = getattr(cache, name, None)
        if original is None:
            continue

        def wrapped(arg, *a, _original=original, _edit=edit, **kw):
            result = _original(arg, *a, **kw)
            for st in states.values():
                _edit(st, arg)
            return result

        setattr(cache, name, wrapped)


def _check_cache(cache) -> None:
    """Accept only caches whose keys grow by appending (``DynamicCache`` and its layers): the block
    means are kept incrementally and would silently go wrong on fixed-size or quantized storage."""
    from transformers import cache_utils

    dynamic_cache = getattr(cache_utils, "DynamicCache", None)
    dynamic_layer = getattr(cache_utils, "DynamicLayer", None)
    quantized_layer = getattr(cache_utils, "QuantizedLayer", ())
    layers = getattr(cache, "layers", None)
    ok = dynamic_cache is not None and isinstance(cache, dynamic_cache)
    if ok and layers is not None and dynamic_layer is not None:
        ok = all(isinstance(layer, dynamic_layer) and not isinstance(layer, quantized_layer) for layer in layers)
    if not ok:
        kinds = sorted({type(layer).__name__ for layer in layers or []})
        raise ValueError(
            f"attn_implementation='moba' needs a growing cache (DynamicCache); got {type(cache).__name__}"
            + (f" with {', '.join(kinds)} layers" if kinds else "")
            + ": static, quantized and unknown caches are not supported (use the default cache, or "
            "cache_implementation='dynamic')"
        )


def _state_for(module, cache, block_size: int) -> BlockMeanState | None:
    if cache is None or cache is _UNKNOWN:
        return None
    try:
        states = _STATES.get(cache)
        if states is None:
            states = {}
            _STATES[cache] = states
            _follow_batch_edits(cache, states)
    except TypeError:  # a cache that cannot be weakly referenced / hashed
        return None
    layer = getattr(module, "layer_idx", 0)
    state = states.get(layer)
    if state is None or state.block_size != block_size:
        state = states[layer] = BlockMeanState(block_size)
    return state


# -- checks ---------------------------------------------------------------------------------
def _check_known_kwargs(kwargs) -> None:
    """Refuse keyword arguments we do not understand (unless they carry nothing: None / False)."""
    unknown = sorted(
        name for name, value in kwargs.items()
        if name not in _HANDLED_KWARGS and name not in _IGNORED_KWARGS and value is not None and value is not False
    )
    if unknown:
        raise ValueError(
            f"attn_implementation='moba' does not understand the attention argument(s) {', '.join(unknown)} "
            "passed by this model; it supports the Llama, Qwen2, Qwen3 and Mistral families "
            f"(transformers {' to '.join(TESTED_TRANSFORMERS_VERSIONS)})"
        )


def _check_keys_end_at_queries(query_length, key_length, valid, kwargs) -> None:
    """Before a module's cache is known: the queries must be the last real keys (a growing cache).
    A fixed-size cache has unused slots after them, which MoBA would silently attend to."""
    cache_position = kwargs.get("cache_position")
    position_ids = kwargs.get("position_ids")
    if cache_position is not None:
        ends = torch.as_tensor(cache_position).reshape(-1)[-1:] + 1
        expected = torch.full_like(ends, key_length)
    elif position_ids is not None:
        ends = position_ids[..., -1].reshape(-1) + 1
        expected = torch.full_like(ends, key_length) if valid is None else valid.sum(1).to(ends)
        expected = expected.expand_as(ends) if expected.numel() != ends.numel() else expected
        if ends.numel() != expected.numel():
            return
    else:
        return  # nothing to check against; the cache hook checks the cache from the next call on
    if query_length < key_length and not bool((ends == expected).all()):
        raise ValueError(
            f"attn_implementation='moba' needs a growing cache (DynamicCache): the {query_length} queries end at "
            f"position {int(ends.max())} but there are {key_length} keys (a static cache's unused slots?)"
        )


def _check_supported(module, attention_mask, dropout, key_length, kwargs) -> None:
    if dropout and dropout > 0:
        raise ValueError(
            f"attn_implementation='moba' does not support attention dropout (got {dropout}); "
            "set config.attention_dropout = 0"
        )
    window = kwargs.get("sliding_window")
    if window is not None:
        # A window longer than every position seen so far changes nothing (and a sliding cache has
        # not dropped anything yet); beyond it, MoBA cannot honour the window: refuse.
        position_ids = kwargs.get("position_ids")
        longest = max(key_length, int(position_ids.max()) + 1) if position_ids is not None else None
        if longest is None or longest > window:
            raise ValueError(
                f"attn_implementation='moba' does not support sliding-window attention beyond the window "
                f"(layer {getattr(module, 'layer_idx', '?')}, sliding_window={window}, "
                f"sequence length {longest if longest is not None else 'unknown'}); set config.sliding_window=None "
                "(or use_sliding_window=False) to run MoBA on these layers"
            )
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='moba' does not support {name}")
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='moba' cannot return attention weights (output_attentions=True)")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        raise ValueError(
            "attn_implementation='moba' takes no custom attention masks: expected None or a 2D padding mask "
            f"(batch, kv_len), got {type(attention_mask).__name__} "
            f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else ''}"
        )


def _is_full_layer(module, settings: MoBASettings) -> bool:
    if not settings.full_attention_layers:
        return False
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError("full_attention_layers needs attention modules with a layer_idx")
    n_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    if n_layers is None:
        if any(i < 0 for i in settings.full_attention_layers):
            raise ValueError("negative full_attention_layers need config.num_hidden_layers")
        return layer in settings.full_attention_layers
    return layer in hybrid.full_layers(n_layers, settings.full_attention_layers, what="full_attention_layers")


# -- the paths ------------------------------------------------------------------------------
def _packed_boundaries(valid: torch.Tensor, position_ids) -> tuple[torch.Tensor, list[int]]:
    """Flat indices (into B * L) of the real tokens and the cu_seqlens of their sequences.

    A row's real tokens are one sequence, padding holes included (as in dense attention with the
    same 2D mask, and as decoding reads them); ``position_ids`` restarts cut it further."""
    b, length = valid.shape
    starts = valid & (valid.cumsum(dim=1) == 1)  # the first real token of each row
    if position_ids is not None:
        pos = position_ids.to(valid.device).expand(b, length)
        starts[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    flat_valid = valid.reshape(-1)
    tokens = flat_valid.nonzero().squeeze(1)
    first = starts.reshape(-1)[tokens].nonzero().squeeze(1).tolist()
    return tokens, first + [int(tokens.numel())]


def _positions_from_cu_seq_lens(kwargs, batch: int, length: int, device):
    """Padding-free batches (transformers' flash-attention collators) pass ``cu_seq_lens_q/k``:
    the positions that restart at each boundary, so that ``_prefill`` packs the same sequences."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None or not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise ValueError("attn_implementation='moba' needs cu_seq_lens_q == cu_seq_lens_k (self-attention prefill)")
    cu = cu_q.to(device=device, dtype=torch.long).reshape(-1)
    if batch != 1 or int(cu[0]) != 0 or int(cu[-1]) != length:
        raise ValueError(
            f"cu_seq_lens_q must start at 0 and end at the row length {length} of a batch of 1, "
            f"got {cu.tolist()} for batch {batch}"
        )
    tokens = torch.arange(length, device=device)
    segment = torch.bucketize(tokens, cu[1:], right=True)
    return (tokens - cu[segment])[None]


def _restarts(position_ids, valid) -> bool:
    """True when positions restart inside a row: several sequences packed in one row."""
    if position_ids is None or valid is not None or position_ids.shape[-1] < 2:
        return False
    return bool((position_ids[..., 1:] != position_ids[..., :-1] + 1).any())


def _prefill(q, k, v, valid, packed_positions, causal, scale, settings: MoBASettings):
    b, s, hq, d = q.shape
    if valid is None and packed_positions is None:
        return moba_attn_func(q, k, v, settings.block_size, settings.top_k, causal, scale, settings.backend)
    if valid is None:
        valid = torch.ones(b, s, dtype=torch.bool, device=q.device)
    tokens, cu = _packed_boundaries(valid, packed_positions)
    out = q.new_zeros(b * s, hq, d)
    if tokens.numel():
        cu_t = torch.tensor(cu, dtype=torch.int32)
        longest = max(e - a for a, e in zip(cu[:-1], cu[1:], strict=True))
        flat = lambda x: x.reshape(b * s, *x.shape[2:])[tokens]  # noqa: E731
        out[tokens] = moba_attn_varlen_func(
            flat(q), flat(k), flat(v), cu_t, longest, settings.block_size, settings.top_k, causal, scale,
            settings.backend,
        )
    return out.reshape(b, s, hq, d)


def _left_padding_starts(valid) -> list[int] | None:
    """Per row, the first real position when the padding of every row is a prefix; else None."""
    if valid is None:
        return None
    lk = valid.shape[1]
    n_real = valid.sum(dim=1)
    expected = torch.arange(lk, device=valid.device)[None, :] >= (lk - n_real)[:, None]
    if not bool((expected == valid).all()):
        return None
    return (lk - n_real).tolist()


def _decode_from_scratch(q, k, v, valid, scale, settings: MoBASettings):
    """Any padding pattern: unpad queries and keys, gate from all keys, packed sparse attention."""
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    if valid is None:
        valid = torch.ones(b, lk, dtype=torch.bool, device=q.device)
    q_valid = valid[:, lk - lq :]
    cu_q, cu_k = [0], [0]
    for nq, nk in zip(q_valid.sum(1).tolist(), valid.sum(1).tolist(), strict=True):
        cu_q.append(cu_q[-1] + nq)
        cu_k.append(cu_k[-1] + nk)
    layout = build_layout(cu_q, cu_k, settings.block_size, q.device)
    qp, kp, vp = q[q_valid], k[valid], v[valid]
    backend = "reference" if settings.backend == "reference" else "torch"  # cu_q != cu_k paths
    impl = resolve_backend(backend, q.device, q)
    with torch.no_grad():
        idx = select_packed(qp, kp, layout, settings.top_k, True)
    out = q.new_zeros(b, lq, hq, d)
    out[q_valid] = impl.attention(qp, kp, vp, layout, idx.long(), True, scale)
    return out


def _decode(module, cache, q, k, v, valid, scale, settings: MoBASettings):
    starts = [0] * q.shape[0] if valid is None else _left_padding_starts(valid)
    if starts is None or settings.backend == "reference":
        return _decode_from_scratch(q, k, v, valid, scale, settings)
    state = _state_for(module, cache, settings.block_size) or BlockMeanState(settings.block_size)
    return moba_decode(q, k, v, state, settings.block_size, settings.top_k, scale, starts, settings.backend)


def make_attention_function(settings: MoBASettings):
    """The function registered with ``transformers.AttentionInterface``."""

    def moba_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        _check_known_kwargs(kwargs)
        _check_supported(module, attention_mask, dropout, key.shape[2], kwargs)
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, L, H, D)
        lq, lk = q.shape[1], k.shape[1]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
        if not getattr(getattr(module, "config", None), "is_causal", True):
            causal = False
        cache = _current_cache(module)
        valid = None
        try:
            if attention_mask is not None:
                if attention_mask.shape[-1] < lk:
                    raise ValueError(
                        f"attention mask covers {attention_mask.shape[-1]} keys but there are {lk}: "
                        "attn_implementation='moba' needs a growing cache (DynamicCache), not a static one"
                    )
                valid = attention_mask[:, -lk:].to(device=q.device, dtype=torch.bool)
                if bool(valid.all()):
                    valid = None
            if cache is _UNKNOWN:
                _check_keys_end_at_queries(lq, lk, valid, kwargs)
        except ValueError:  # a fixed-size cache, refused: leave nothing half-built for the next call
            refused = _cache_of_caller(module) if cache is _UNKNOWN else cache
            if refused is not None:
                _release_refused_cache(refused)
            raise
        if _is_full_layer(module, settings):
            return full_attn_with_kvcache(q, k, v, causal, scale, key_padding_mask=valid), None
        if lq == lk:
            position_ids = _positions_from_cu_seq_lens(kwargs, q.shape[0], lq, q.device)
            if position_ids is None:
                position_ids = kwargs.get("position_ids")
            packed = position_ids if _restarts(position_ids, valid) else None
            out = _prefill(q, k, v, valid, packed, causal, scale, settings)
            state = _state_for(module, cache, settings.block_size)
            if state is not None:  # a generation starts: keep the prompt's block sums for decoding
                state.clear()
                starts = [0] * q.shape[0] if valid is None else _left_padding_starts(valid)
                if starts is not None and causal and packed is None:
                    state.update(k, starts, lk)
            return out, None
        if kwargs.get("cu_seq_lens_q") is not None:
            raise ValueError("attn_implementation='moba' takes cu_seq_lens_q/k only for prefill (queries == keys)")
        if not causal:
            raise ValueError("attn_implementation='moba' decodes causally only (is_causal=False with a KV cache)")
        return _decode(module, cache, q, k, v, valid, scale, settings), None

    moba_attention.moba_settings = settings
    return moba_attention


def padding_mask_function(batch_size=None, *args, kv_length=None, attention_mask=None, **kwargs):
    """Mask builder registered with ``AttentionMaskInterface``: the 2D (B, kv_len) padding mask
    when some token is padding, else ``None``. Never an (S, S) mask.

    Only ``kv_length`` and ``attention_mask`` are read, by keyword, so the releases that pass
    ``cache_position`` (before 5.4) and those that pass ``q_length``/``q_offset`` both work."""
    if attention_mask is None:
        return None
    if kv_length is None:
        kv_length = attention_mask.shape[-1]
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


_warned_versions: set[str] = set()


def _warn_if_untested(version: str) -> None:
    """Warn once per version when transformers is outside the tested range (compared by minor release)."""
    from packaging.version import Version  # a dependency of transformers

    def minor(v: str) -> tuple[int, ...]:
        return Version(v).release[:2]

    low, high = minor(TESTED_TRANSFORMERS_VERSIONS[0]), minor(TESTED_TRANSFORMERS_VERSIONS[-1])
    if low <= minor(version) <= high or version in _warned_versions:
        return
    _warned_versions.add(version)
    warnings.warn(
        f"moba's transformers integration is tested with transformers {TESTED_TRANSFORMERS_VERSIONS[0]} to "
        f"{TESTED_TRANSFORMERS_VERSIONS[-1]}; found {version}. Unsupported model arguments and caches raise "
        "errors, but please report anything that breaks.",
        stacklevel=3,
    )


def register_moba(
    block_size: int | MoBAConfig | None = None,
    top_k: int | None = None,
    full_attention_layers=(),
    name: str = "moba",
    backend: str | None = None,
    *,
    config: MoBAConfig | None = None,
) -> str:
    """Register MoBA with transformers as ``attn_implementation=name``; returns ``name``.

    Args:
        block_size, top_k: as in ``moba.moba_attn_func`` (defaults 512 and 3).
        config: a ``moba.MoBAConfig`` instead of block_size / top_k / backend (explicit ones must
            agree with it); it may also be the first argument: ``register_moba(MoBAConfig(...))``,
            the official MoBA package's call. Its ``causal`` must be True and ``softmax_scale``
            None (the model passes its own scaling).
        full_attention_layers: layer indices that run dense attention instead (hybrid; negative
            indices count from the last layer, e.g. ``(-1, -2, -3)`` = last three).
        name: the implementation name to pass as ``attn_implementation``; registering several
            names with different settings is fine. With the default "moba", "moba_naive" is
            registered too (same settings, the "reference" backend), as the official package does.
            Names of transformers' own implementations ("sdpa", "eager", "flash_attention_2", ...)
            are refused with a ``ValueError``.
        backend: "auto", "torch", "triton" or "reference" (prefill; decoding uses the Triton
            decode kernel on CUDA unless "torch", and the dense reference with "reference").

    Example:
        >>> register_moba(block_size=64, top_k=3)
        'moba'
        >>> model = AutoModelForCausalLM.from_config(config, attn_implementation="moba")
    """
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:
        raise ImportError(
            "register_moba needs Hugging Face transformers (>= 4.56): pip install 'moba-attn[hf]' "
            f"(or pip install transformers); import failed with: {err}"
        ) from err

    _warn_if_untested(transformers.__version__)
    if isinstance(block_size, MoBAConfig):  # register_moba(cfg), as in the official package
        if config is not None:
            raise TypeError("register_moba() got a MoBAConfig both positionally and as config=")
        block_size, config = None, block_size
    cfg = resolve_config(config, block_size=block_size, top_k=top_k, backend=backend)
    if not cfg.causal or cfg.softmax_scale is not None or cfg.deterministic:
        raise ValueError("register_moba needs a config with causal=True, softmax_scale=None (the model "
                         f"passes its own scaling) and deterministic=False, got {cfg}")
    block_size, top_k, backend = cfg.block_size, cfg.top_k, cfg.backend
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    _check_name_is_ours(name, AttentionInterface, AttentionMaskInterface)
    if backend not in ("auto", "torch", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'torch', 'triton' or 'reference', got {backend!r}")
    if isinstance(full_attention_layers, (str, bytes)) or not hasattr(full_attention_layers, "__iter__"):
        raise TypeError(f"full_attention_layers must be a sequence of layer indices, e.g. (-1,) or [5], got "
                        f"{type(full_attention_layers).__name__} {full_attention_layers!r}")
    layers = tuple(full_attention_layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"full_attention_layers must hold ints, got {i!r}")
    settings = MoBASettings(cfg, layers)
    registrations = [(name, settings)]
    if name == "moba":  # as the official package: "moba_naive" too, the dense-mask reference
        naive = dataclasses.replace(cfg, backend="reference")
        _check_name_is_ours(NAIVE_NAME, AttentionInterface, AttentionMaskInterface)
        registrations.append((NAIVE_NAME, MoBASettings(naive, layers)))
    for n, s in registrations:
        AttentionInterface.register(n, make_attention_function(s))
        AttentionMaskInterface.register(n, padding_mask_function)
    return name


#: Registered beside the default name "moba", as the official package's ``register_moba`` does.
NAIVE_NAME = "moba_naive"


def _check_name_is_ours(name: str, attention_interface, mask_interface) -> None:
    """Refuse a name that transformers (or another library) already uses for its own attention:
    registering over "sdpa" would silently run MoBA wherever the process asks for SDPA."""
    if name == "eager" or "|" in name or "/" in name:
        raise ValueError(f"name {name!r} is reserved by transformers (eager attention, 'paged|...' and hub "
                         "kernel names); pick another name, e.g. 'moba'")
    for interface in (attention_interface, mask_interface):
        existing = getattr(interface, "_global_mapping", {}).get(name)
        if existing is not None and getattr(existing, "moba_settings", None) is None and existing is not padding_mask_function:
            raise ValueError(
                f"name {name!r} is one of transformers' own attention implementations; register_moba refuses to "
                "replace it (every model in the process would run MoBA for it). Pick another name, e.g. 'moba'"
            )
