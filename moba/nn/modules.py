"""``nn.Module``s: the MoBA attention core, a self-attention layer, and mode switching.

* ``MoBAAttention``: q, k, v in, output out (flash layout); ``mode`` is "moba" or "full".
* ``MoBASelfAttention``: projections, optional rotary embeddings, GQA, around ``MoBAAttention``.
* KV-cache decoding: pass a ``moba.decode.LayerKVCache`` (one per layer, from a
  ``moba.decode.KVCache``) as ``cache=``; the first call prefills it, later calls feed only
  new tokens, and MoBA layers then read only their selected blocks (``moba_decode``).
* ``set_attention_mode(model, mode, layers=None)``: switch every (or some) attention core of
  a model between MoBA and full attention, e.g. the last N layers full (hybrid) or the whole
  model full from a chosen training step (the paper's MoBA/full recipe).
* Context parallelism: ``cp_group=`` (a process group, e.g. ``mesh.get_group("cp")``) on
  ``MoBAAttention`` / ``MoBASelfAttention``, or ``set_context_parallel(model, group)``: inputs
  are then this rank's shard of every sequence (``moba.distributed.shard_sequence``), attention
  runs through ``moba.distributed.moba_attn_func_cp`` and rotary positions are the shard's
  true positions. Full-attention layers run as one block covering the sequence (exactly dense).
* ``HybridSchedule``: the one call for both, from a training loop::

      schedule = HybridSchedule(full_last_n=3, switch_to_full_at_step=9000)
      for step in range(n_steps):
          schedule.apply(model, step)      # sets every layer's mode for this step
          loss = model(batch).loss; ...
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .._core.checks import check_bool, check_positive_float, check_positive_int, resolve_softmax_scale
from ..config import MoBAConfig, resolve_config
from ..decode.kv_cache import BlockMeanState, LayerKVCache, moba_decode
from ..decode.tree import check_parents, moba_tree_attention, tree_depths
from ..distributed import METHODS as CP_METHODS
from ..distributed import moba_attn_func_cp, shard_positions
from ..ops.api import moba_attn_func, moba_attn_varlen_func
from ..ops.full import full_attn_func, full_attn_varlen_func, full_attn_with_kvcache
from . import hybrid

MODES = ("moba", "full")


def _check_cp_method(method) -> str:
    if not isinstance(method, str) or method not in CP_METHODS:
        raise ValueError(f"cp_method must be one of {CP_METHODS}, got {method!r}")
    return str(method)


def _check_mode(mode) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return str(mode)  # a numpy str_ becomes a plain str (JSON, pickling)


class MoBAAttention(nn.Module):
    """Attention core with no parameters: MoBA or full attention over given q, k, v.

    Args:
        block_size, top_k, causal, backend: as in ``moba.moba_attn_func`` (defaults 512, 3,
            True, "auto").
        mode: "moba" or "full" (dense attention through ``moba.full_attn_func``); can be
            changed at any time (``module.mode = "full"`` or ``set_attention_mode``).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        config: a ``moba.MoBAConfig`` holding the settings above (an explicit argument next
            to it must agree with it); ``module.config`` gives the current settings back.
        deterministic: as in ``moba.moba_attn_func``.
        cp_group: a process group: q/k/v are this rank's shards ``(B, S/P, H, D)`` of sequences
            sharded over the group (context parallelism, ``moba.distributed``); None: no sharding.
        cp_method: "auto", "ulysses" or "sparse" (``moba.distributed.moba_attn_func_cp``).

    Shapes: ``forward(q (B, S, Hq, D), k/v (B, S, Hkv, D)) -> (B, S, Hq, D)``, or packed
    ``forward(q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens, max_seqlen) -> (T, Hq, D)``.
    With ``cache=LayerKVCache``: q, k, v are the newest S tokens; k, v are appended to the
    cache and the queries attend causally over everything cached (see ``_forward_cached``).
    """

    def __init__(
        self,
        block_size: int | None = None,
        top_k: int | None = None,
        causal: bool | None = None,
        mode: str = "moba",
        backend: str | None = None,
        softmax_scale: float | None = None,
        *,
        config: MoBAConfig | None = None,
        deterministic: bool | None = None,
        cp_group=None,
        cp_method: str = "auto",
    ):
        super().__init__()
        cfg = resolve_config(config, block_size=block_size, top_k=top_k, causal=causal, backend=backend,
                             softmax_scale=softmax_scale, deterministic=deterministic)
        self.cp_group, self.cp_method = cp_group, _check_cp_method(cp_method)
        # Plain attributes, not the config: training code may change them between steps.
        self.block_size, self.top_k, self.causal = cfg.block_size, cfg.top_k, cfg.causal
        self.backend, self.softmax_scale, self.deterministic = cfg.backend, cfg.softmax_scale, cfg.deterministic
        self.mode = _check_mode(mode)

    @property
    def config(self) -> MoBAConfig:
        """The current settings as a ``MoBAConfig`` (validated)."""
        return MoBAConfig(self.block_size, self.top_k, self.causal, self.backend, self.softmax_scale,
                          self.deterministic)

    def forward(self, q, k, v, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                cache: LayerKVCache | None = None, tree: list[int] | None = None):
        mode = _check_mode(self.mode)
        if self.cp_group is not None:
            if tree is not None or cache is not None or cu_seqlens is not None:
                raise NotImplementedError("context parallelism (cp_group) takes fixed-length shards (B, S/P, H, D): "
                                          "no KV cache, tree or packed sequences (cu_seqlens)")
            # Full attention is MoBA with one block covering the sequence (exactly dense).
            block_size, top_k = (self.block_size, self.top_k) if mode == "moba" else (1 << 62, 1)
            return moba_attn_func_cp(q, k, v, block_size, top_k, self.cp_group, self.causal, _check_cp_method(self.cp_method),
                                     softmax_scale=self.softmax_scale, backend=self.backend)
        if tree is not None:
            return self._forward_tree(q, k, v, cache, tree, mode)
        if cache is not None:
            return self._forward_cached(q, k, v, cu_seqlens, cache, mode)
        if cu_seqlens is None:
            if mode == "full":
                return full_attn_func(q, k, v, softmax_scale=self.softmax_scale, causal=self.causal)
            return moba_attn_func(
                q, k, v, self.block_size, self.top_k, self.causal, self.softmax_scale, self.backend,
                deterministic=self.deterministic,
            )
        if mode == "full":
            return full_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, causal=self.causal,
                                         softmax_scale=self.softmax_scale)
        return moba_attn_varlen_func(
            q, k, v, cu_seqlens, max_seqlen, self.block_size, self.top_k, self.causal, self.softmax_scale,
            self.backend, deterministic=self.deterministic,
        )

    def _forward_cached(self, q, k, v, cu_seqlens, cache: LayerKVCache, mode: str):
        """Append k, v to the cache; the queries (the newest tokens) attend over the cache.

        An empty cache is a prefill: the ordinary forward over the prompt. Afterwards MoBA
        layers decode with ``moba_decode`` (block means kept incrementally in
        ``cache.state``; a crop is picked up on the next step) and full layers with
        ``full_attn_with_kvcache``. Both equal the prefill forward over the whole sequence.
        """
        if not isinstance(cache, LayerKVCache):
            raise TypeError(f"cache must be a moba.decode.LayerKVCache, got {type(cache).__name__}")
        if cu_seqlens is not None:
            raise ValueError("a KV cache takes (B, S, H, D) inputs, not packed sequences (cu_seqlens)")
        if not self.causal:
            raise ValueError("KV-cache decoding needs causal attention (causal=True)")
        past = cache.length
        keys, values = cache.append(k, v)
        if past == 0:
            return self.forward(q, k, v)
        if mode == "full":
            return full_attn_with_kvcache(q, keys, values, True, self.softmax_scale)
        return moba_decode(q, keys, values, self._block_means(cache), self.block_size, self.top_k,
                           self.softmax_scale, backend=self.backend)

    def _block_means(self, cache: LayerKVCache) -> BlockMeanState:
        """The cache's block-mean state for this layer's block size (rebuilt from the keys when new)."""
        if cache.state is None or cache.state.block_size != self.block_size:
            cache.state = BlockMeanState(self.block_size)
        return cache.state

    def _forward_tree(self, q, k, v, cache: LayerKVCache | None, tree: list[int], mode: str):
        """The last ``len(tree)`` tokens are a draft tree (``tree`` = their parents, see
        ``moba.decode.tree``); the tokens before them are ordinary new tokens, appended to the cache
        first. The tree's keys and values are not cached."""
        if cache is None or q.shape[0] != 1:
            raise ValueError("tree attention needs a KV cache (cache=...) and batch size 1")
        n = len(tree)
        p = q.shape[1] - n
        if p < 0:
            raise ValueError(f"tree has {n} nodes but only {q.shape[1]} tokens were given")
        parts = [self._forward_cached(q[:, :p], k[:, :p], v[:, :p], None, cache, mode)] if p else []
        if cache.length == 0:
            raise ValueError("tree attention needs at least one cached or preceding token")
        top_k = self.top_k if mode == "moba" else cache.length + n  # every block: full attention
        scale = resolve_softmax_scale(self.softmax_scale, q.shape[-1])
        out = moba_tree_attention(q[0, p:], k[0, p:], v[0, p:], tree, cache.keys, cache.values,
                                  self._block_means(cache), self.block_size, top_k, scale)
        return torch.cat(parts + [out[None]], dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, block_size={self.block_size}, top_k={self.top_k}, causal={self.causal}"


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention, as in Llama) for (..., S, H, D) tensors."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        head_dim = check_positive_int("head_dim", head_dim)
        theta = check_positive_float("rope_theta", theta)
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, S, H, D) or (T, H, D); positions (B, S) or (S,) / (T,) integer positions."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., S, D/2)
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[..., None, :].to(x.dtype)
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[..., None, :].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class MoBASelfAttention(nn.Module):
    """Self-attention layer (q/k/v/o projections, optional rotary, GQA) with a MoBA core.

    Args:
        hidden_size: model width; num_heads: query heads; num_kv_heads: key/value heads
            (default num_heads; must divide num_heads); head_dim: default hidden_size // num_heads.
        block_size, top_k, causal, mode, backend, config: passed to ``MoBAAttention`` (defaults
            512, 3, True, "moba", "auto"; ``config=MoBAConfig(...)`` sets them in one object).
        rotary: apply rotary embeddings to q and k (theta ``rope_theta``).
        cp_group, cp_method: context parallelism, passed to ``MoBAAttention`` (x is then this
            rank's shard (B, S/P, hidden_size); rotary uses the shard's true positions).

    Shapes: ``forward(x (B, S, hidden_size)) -> (B, S, hidden_size)``; packed sequences:
    ``forward(x (T, hidden_size), cu_seqlens=..., max_seqlen=...)``. Decoding:
    ``forward(x (B, S_new, hidden_size), cache=LayerKVCache)``: x holds the tokens after the
    cached ones (rotary positions continue from the cache length). Tree verification (batch
    1): ``tree=parents`` marks the last ``len(parents)`` tokens as a draft tree (``moba.decode.tree``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        block_size: int | None = None,
        top_k: int | None = None,
        causal: bool | None = None,
        mode: str = "moba",
        backend: str | None = None,
        rotary: bool = True,
        rope_theta: float = 10000.0,
        bias: bool = False,
        *,
        config: MoBAConfig | None = None,
        cp_group=None,
        cp_method: str = "auto",
    ):
        super().__init__()
        hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.num_kv_heads = check_positive_int("num_kv_heads", self.num_heads if num_kv_heads is None else num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None and hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_heads ({self.num_heads}) when head_dim is "
                f"not given (head_dim = hidden_size // num_heads would drop {hidden_size % self.num_heads} "
                "channels); pass head_dim= explicitly for another width"
            )
        self.head_dim = check_positive_int("head_dim", hidden_size // self.num_heads if head_dim is None else head_dim)
        rotary, bias = check_bool("rotary", rotary), check_bool("bias", bias)
        rope_theta = check_positive_float("rope_theta", rope_theta)  # checked even without rotary
        self.q_proj = nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim, rope_theta) if rotary else None
        self.attn = MoBAAttention(block_size, top_k, causal, mode, backend, config=config, cp_group=cp_group,
                                  cp_method=cp_method)

    def forward(self, x, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                cache: LayerKVCache | None = None, tree: list[int] | None = None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        hidden = self.q_proj.in_features
        if x.dim() not in (2, 3) or x.shape[-1] != hidden:
            raise ValueError(f"x must be (batch, seqlen, hidden_size) or packed (total_tokens, hidden_size) with "
                             f"hidden_size = {hidden}, got shape {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, LayerKVCache):
            raise TypeError(f"cache must be a moba.LayerKVCache or None, got {type(cache).__name__} {cache!r}")
        lead = x.shape[:-1]
        if cache is not None and cu_seqlens is not None:
            raise ValueError("a KV cache takes (batch, new_tokens, hidden_size) inputs, not packed sequences (cu_seqlens)")
        if cache is not None and x.dim() != 3:
            raise ValueError(f"with a KV cache x must be (batch, new_tokens, hidden_size), got {tuple(x.shape)}")
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            if self.attn.cp_group is not None and cu_seqlens is None and cache is None and tree is None:
                positions = shard_positions(x.shape[-2], self.attn.cp_group, x.device)  # true positions of the shard
            elif cu_seqlens is None:
                past = cache.length if cache is not None else 0
                positions = torch.arange(past, past + x.shape[-2], device=x.device)
                if tree is not None:  # tree nodes sit at (first tree position) + depth
                    depth = torch.tensor(tree_depths(check_parents(tree)), device=x.device)
                    first = past + x.shape[-2] - len(tree)
                    positions = torch.cat([positions[:first - past], first + depth])
            else:  # positions restart at every sequence
                starts = cu_seqlens.to(x.device).long()
                seq = torch.searchsorted(starts[1:], torch.arange(x.shape[0], device=x.device), right=True)
                positions = torch.arange(x.shape[0], device=x.device) - starts[seq]
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        out = self.attn(q, k, v, cu_seqlens, max_seqlen, cache=cache, tree=tree)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


def set_context_parallel(model: nn.Module, group, method: str = "auto") -> int:
    """Shard sequences over ``group`` in every ``MoBAAttention`` of ``model`` (None: stop
    sharding). Returns the number of attention cores changed. The model's inputs must then be
    each rank's shard of the sequences (``moba.distributed.shard_sequence``)."""
    method = _check_cp_method(method)
    cores = attention_modules(model)
    for core in cores:
        core.cp_group, core.cp_method = group, method
    return len(cores)


def attention_modules(model: nn.Module) -> list[MoBAAttention]:
    """The ``MoBAAttention`` cores of a model, in module order (= layer order for usual models)."""
    return [m for m in model.modules() if isinstance(m, MoBAAttention)]


def set_attention_mode(model: nn.Module, mode: str, layers: Iterable[int] | None = None) -> list[int]:
    """Set the mode ("moba" or "full") of a model's attention cores; returns the layers changed.

    ``layers`` indexes ``attention_modules(model)`` (negative indices count from the end);
    None means every layer. Examples:

    >>> set_attention_mode(model, "full", layers=[-1, -2, -3])   # hybrid: last 3 layers full
    >>> set_attention_mode(model, "full")                          # switch everything to full
    """
    _check_mode(mode)
    cores = attention_modules(model)
    chosen = range(len(cores)) if layers is None else hybrid.full_layers(len(cores), layers, what="layer index")
    for i in chosen:
        cores[i].mode = mode
    return sorted(set(chosen))


@dataclass(frozen=True)
class HybridSchedule:
    """Which layers run MoBA and which run full attention, as a function of the training step.

    Args:
        full_layers: layers (indices into ``attention_modules(model)``; negative indices
            count from the end) that always run full attention.
        full_last_n: shorthand for the last ``full_last_n`` layers (the paper's 1M-context
            Llama keeps its last 3 layers full).
        switch_to_full_at_step: from this training step on, every layer runs full attention
            (the paper's "MoBA, then full attention" recipe); ``None`` never switches.

    ``apply(model, step)`` sets every ``MoBAAttention`` core's mode and returns the modes,
    layer by layer; call it at the top of each training step (it only sets attributes).

    >>> schedule = HybridSchedule(full_last_n=2, switch_to_full_at_step=1000)
    >>> schedule.modes(n_layers=4, step=0)
    ['moba', 'moba', 'full', 'full']
    >>> schedule.modes(n_layers=4, step=1000)
    ['full', 'full', 'full', 'full']
    """

    full_layers: tuple[int, ...] = ()
    full_last_n: int = 0
    switch_to_full_at_step: int | None = None

    def __post_init__(self):
        layers = self.full_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"full_layers must be a sequence of ints, got {type(layers).__name__}")
        layers = tuple(layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
        if bad:
            raise TypeError(f"full_layers must hold ints, got {bad[0]!r}")
        # numpy integers become Python ints: the schedule goes into JSON run records.
        object.__setattr__(self, "full_layers", tuple(int(i) for i in layers))
        n = self.full_last_n
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"full_last_n must be an int >= 0, got {n!r}")
        object.__setattr__(self, "full_last_n", int(n))
        step = self.switch_to_full_at_step
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"switch_to_full_at_step must be None or an int >= 0, got {step!r}")
            object.__setattr__(self, "switch_to_full_at_step", int(step))

    def full_layer_set(self, n_layers: int) -> set[int]:
        """Layers that run full attention before the switch step (``moba.nn.hybrid``'s rule)."""
        return hybrid.full_layers(n_layers, self.full_layers, self.full_last_n)

    def modes(self, n_layers: int, step: int) -> list[str]:
        """The mode of every layer at ``step``."""
        if self.switch_to_full_at_step is not None and step >= self.switch_to_full_at_step:
            return ["full"] * n_layers
        return hybrid.layer_modes(n_layers, self.full_layers, self.full_last_n)

    def apply(self, model: nn.Module, step: int) -> list[str]:
        """Set the mode of every attention core of ``model`` for training step ``step``."""
        cores = attention_modules(model)
        if not cores:
            raise ValueError("the model has no MoBAAttention modules")
        modes = self.modes(len(cores), step)
        for core, mode in zip(cores, modes, strict=True):
            core.mode = mode
        return modes
