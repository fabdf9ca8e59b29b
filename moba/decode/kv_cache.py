"""Sparse MoBA decoding with a KV cache: incremental block means, gate, sparse attention.

When the queries are the newest ``Lq`` tokens of sequences whose keys sit in a cache
(``Lq = 1``: token-by-token decoding; ``Lq > 1``: a chunk, e.g. speculative decoding), MoBA
needs, per sequence, the mean key of every complete past block (the gate's candidates) and
the own block (always attended). ``BlockMeanState`` keeps per-block running key *sums* and the
number of tokens folded in, per sequence; each step folds in only the new tokens (O(new
tokens), never a pass over the whole cache). ``moba_decode`` updates the state, runs the gate
against the state's means (``moba.ops.gate.select_from_means``) and attends to the selected
blocks only, reading the cache in place:

* on CUDA with Triton: ``moba.triton_kernels.decode`` (flash-decoding style: the key work of
  one (query, head) is split across programs when batch x heads is too small to fill the GPU,
  then merged);
* elsewhere: a PyTorch path that gathers the selected blocks only.

The result equals a full prefill MoBA forward over the whole sequence (docs/design.md section 1:
the gate only ever reads complete past blocks plus the own block), up to float rounding.

Cache edits: ``BlockMeanState.update`` is told the cache's current shape and how many of its
newest tokens are new; if the state holds more tokens than the cache had before this step
(the cache was cropped, e.g. rejected speculative tokens), the blocks at and after the crop
point are recomputed from the cached keys; if it holds fewer (tokens it never saw), the row
is rebuilt. ``select_rows`` / ``repeat_rows`` follow beam-search reordering.

Example (one sequence, token-by-token)::

    state = BlockMeanState(block_size=64)
    for step in range(n_steps):
        k_cache, v_cache = ...          # (B, L, Hkv, D), the new token already appended
        out = moba_decode(q, k_cache, v_cache, state, block_size=64, top_k=3)   # q (B, 1, Hq, D)
"""

from __future__ import annotations

import numbers

import torch

from .._core.checks import (
    SUPPORTED_DTYPES,
    check_cache_qkv,
    check_nonnegative_int,
    check_positive_int,
    resolve_softmax_scale,
)
from .._core.layout import build_layout, effective_block_size
from ..ops.gate import select_from_means
from ..ops.registry import resolve_decode_backend, triton_interpreter_enabled

# Upper bound on the elements of one chunk of gathered keys in the PyTorch decode path.
_GATHER_CHUNK_ELEMENTS = 1 << 24


class BlockMeanState:
    """Running per-block key sums of a batch of cached sequences (one attention layer).

    A state belongs to one cache (one layer of one cache): it only remembers sums, so used with
    another cache it would silently give wrong means. ``update`` therefore keeps the raw bytes of
    the first key and of the last key of every block it folded in (one key per block: the
    same order of work as the gate, which reads one mean per block) and raises ``ValueError``
    when a cache whose keys it would reuse differs at any of them (``clear()`` makes a state
    reusable). A cache that equals the folded keys at every block's last key and at the first
    key but differs elsewhere cannot be told apart without re-reading the whole cache: use one
    state per layer of each cache.

    Attributes:
        block_size: tokens per key block.
        sums: (B, capacity, Hkv, D) float32 key sums per block (blocks past a row's end are 0).
        lengths: host list, tokens folded in per row.
    """

    def __init__(self, block_size: int):
        self.block_size = check_positive_int("block_size", block_size)
        # Sums are indexed by token // _bs: a block size above any possible length is one
        # block per row, and the clamp keeps the int64 arithmetic in range (see _layout).
        self._bs = effective_block_size(self.block_size)
        self.sums: torch.Tensor | None = None
        self.lengths: list[int] | None = None
        # keys at row positions 0 and min((j + 1) * block, length) - 1 for every block j: (B, m, Hkv, D),
        # and those positions (B, m), -1 where a row has fewer blocks
        self._marks: torch.Tensor | None = None
        self._mark_pos: torch.Tensor | None = None

    # -- bookkeeping -------------------------------------------------------------------
    def clear(self) -> None:
        """Forget everything (the next ``update`` rebuilds from the cache)."""
        self.sums, self.lengths, self._marks, self._mark_pos = None, None, None, None

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep / reorder rows (beam search ``reorder_cache``, ``batch_select_indices``)."""
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
            what = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
            raise TypeError(f"index must be a 1-d int32/int64 tensor of row numbers, got {what}")
        if self.sums is None:
            return
        n_rows = self.sums.shape[0]
        if index.numel() and not bool(((index >= 0) & (index < n_rows)).all()):
            raise ValueError(f"index holds a row outside [0, {n_rows}): {index.tolist()}")
        index = index.to(self.sums.device).long()
        self.sums = self.sums.index_select(0, index)
        self.lengths = [self.lengths[i] for i in index.tolist()]
        if self._marks is not None:
            self._marks = self._marks.index_select(0, index.to(self._marks.device))
            self._mark_pos = self._mark_pos.index_select(0, index.to(self._mark_pos.device))

    def repeat_rows(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (``batch_repeat_interleave``)."""
        repeats = check_positive_int("repeats", repeats)
        if self.sums is None:
            return
        self.sums = self.sums.repeat_interleave(repeats, dim=0)
        self.lengths = [n for n in self.lengths for _ in range(repeats)]
        if self._marks is not None:
            self._marks = self._marks.repeat_interleave(repeats, dim=0)
            self._mark_pos = self._mark_pos.repeat_interleave(repeats, dim=0)

    def _ensure(self, batch: int, n_blocks: int, hkv: int, d: int, device) -> None:
        shape_ok = (
            self.sums is not None
            and self.sums.shape[0] == batch
            and self.sums.shape[2:] == (hkv, d)
            and self.sums.device == torch.device(device)
        )
        if not shape_ok:
            self.sums = torch.zeros(batch, max(1, n_blocks), hkv, d, dtype=torch.float32, device=device)
            self.lengths = [0] * batch
        elif self.sums.shape[1] < n_blocks:  # grow geometrically: amortised O(1) per block
            grown = self.sums.new_zeros(batch, max(n_blocks, 2 * self.sums.shape[1]), hkv, d)
            grown[:, : self.sums.shape[1]] = self.sums
            self.sums = grown

    # -- the update --------------------------------------------------------------------
    @torch.no_grad()  # block means feed a discrete choice: no gradient, and no graph kept alive
    def update(self, k_cache: torch.Tensor, starts: list[int], n_new: int) -> list[int]:
        """Bring the state to the cache's content; returns the new per-row lengths.

        k_cache: (B, Lk, Hkv, D), any strides; row ``b``'s tokens are positions
        ``starts[b]:Lk`` (``starts`` > 0 for left padding). The last ``n_new`` tokens of every
        row (or all of a shorter row) are new since the previous call; the state keeps what it
        has of the rest.
        """
        if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
            shape = tuple(k_cache.shape) if isinstance(k_cache, torch.Tensor) else type(k_cache).__name__
            raise ValueError(f"k_cache must be a 4-d tensor (batch, seqlen, kv_heads, head_dim), got {shape}")
        if k_cache.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"k_cache must be float16, bfloat16, float32 or float64, got {k_cache.dtype}")
        batch, lk, hkv, d = k_cache.shape
        starts = _check_starts(starts, batch, lk)
        n_new = check_nonnegative_int("n_new", n_new)
        bs = self._bs
        target = [lk - s for s in starts]
        self._ensure(batch, -(-max(target, default=0) // bs), hkv, d, k_cache.device)
        rows, begins = [], []
        for b in range(batch):
            prev = max(0, target[b] - n_new)
            have = self.lengths[b]
            if have == prev:  # the usual step: fold in the new tokens only
                begin = prev
            elif have > prev:  # cropped: recompute from the last block boundary <= prev
                begin = (prev // bs) * bs
            else:  # tokens we never saw: rebuild the row
                begin = 0
            if begin < have:
                self.sums[b, begin // bs :].zero_()
            rows.append(b)
            begins.append(begin)
        self._check_same_cache(k_cache, starts, begins)
        self._fold(k_cache, starts, rows, begins, target)
        self.lengths = target
        self._mark_pos = self._mark_positions(target, k_cache.device)
        self._marks = self._keys_at(k_cache, self._in_cache(self._mark_pos, starts))
        return target

    def _mark_positions(self, lengths: list[int], device) -> torch.Tensor:
        """(B, 1 + n_blocks) row positions of the keys the reuse check compares: 0, then the
        last folded key of every block; -1 where a row has fewer blocks (or no tokens)."""
        bs = self._bs
        nb = -(-max(lengths, default=0) // bs)
        n = torch.tensor(lengths, dtype=torch.long, device=device)[:, None]  # dtype: an empty batch
        j = torch.arange(nb, dtype=torch.long, device=device)[None, :]
        ends = torch.where(j * bs < n, torch.minimum((j + 1) * bs, n) - 1, -1)
        first = torch.where(n > 0, 0, -1)
        return torch.cat([first, ends], 1)

    @staticmethod
    def _in_cache(pos: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """Row positions (B, m) -> cache positions (padding rows of -1 read position start)."""
        return torch.tensor(starts, dtype=torch.long, device=pos.device)[:, None] + pos.clamp(min=0)

    @staticmethod
    def _keys_at(k_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, m) cache positions -> (B, m, Hkv, D) keys, clamped into the cache."""
        rows = torch.arange(k_cache.shape[0], device=k_cache.device)[:, None]
        return k_cache[rows, pos.clamp(0, max(k_cache.shape[1] - 1, 0))].clone()

    def _check_same_cache(self, k_cache, starts: list[int], begins: list[int]) -> None:
        """Raise if keys this state would reuse (positions < begin) differ from what it folded in."""
        marks = self._marks
        if (marks is None or marks.shape[0] != k_cache.shape[0] or marks.shape[2:] != k_cache.shape[2:]
                or marks.dtype != k_cache.dtype or marks.device != k_cache.device or k_cache.shape[1] == 0):
            return
        if not any(b > 0 for b in begins):  # nothing reused
            return
        pos = self._mark_pos
        begin_t = torch.tensor(begins, dtype=torch.long, device=pos.device)[:, None]
        check = (pos >= 0) & (pos < begin_t)  # (B, m): which marks are keys this update reuses
        now = self._keys_at(k_cache, self._in_cache(pos, starts))
        # Compare raw bytes: a NaN key in the cache is still "the same key".
        same = (now.view(torch.uint8) == marks.view(torch.uint8)).flatten(2).all(-1)
        if bool((check & ~same).any()):
            raise ValueError(
                "this BlockMeanState was filled from another cache (or layer): its keys differ from this "
                "cache's. Use one BlockMeanState per layer of each cache, or call state.clear() to reuse it"
            )

    def _fold(self, k_cache, starts, rows, begins, ends) -> None:
        """Add the keys of positions ``begins[i]:ends[i]`` of row ``rows[i]`` to their block sums."""
        counts = [e - s for s, e in zip(begins, ends, strict=True)]
        if sum(counts) == 0:
            return
        dev = k_cache.device
        count_t = torch.tensor(counts, device=dev)
        row_t = torch.repeat_interleave(torch.tensor(rows, device=dev), count_t)
        first = torch.repeat_interleave(torch.tensor(begins, device=dev) - (torch.cumsum(count_t, 0) - count_t), count_t)
        token = torch.arange(int(count_t.sum()), device=dev) + first  # position inside the row
        pos = torch.tensor(starts, device=dev)[row_t] + token  # position in the cache
        keys = k_cache[row_t, pos].float()  # (n, Hkv, D)
        cap = self.sums.shape[1]
        flat = self.sums.view(-1, *self.sums.shape[2:])
        flat.index_add_(0, row_t * cap + token // self._bs, keys)

    # -- reading -------------------------------------------------------------------------
    def block_counts(self, n_blocks: int) -> torch.Tensor:
        """(B, n_blocks) tokens per block (0 past a row's end)."""
        lengths = torch.tensor(self.lengths, device=self.sums.device)
        first = torch.arange(n_blocks, device=self.sums.device) * self._bs
        return (lengths[:, None] - first[None, :]).clamp(min=0, max=self._bs)

    def padded_means(self) -> torch.Tensor:
        """(B, nb_max, Hkv, D) float32 block means, zero past each row's last block.

        The same as ``moba.ops.gate.pad_block_means(moba.ops.gate.block_means(k, layout), layout)``
        recomputed from the keys (up to float summation order); a tail block is averaged over
        the tokens it has.
        """
        nb_max = max(1, -(-max(self.lengths, default=0) // self._bs))
        counts = self.block_counts(nb_max)
        return self.sums[:, :nb_max] / counts.clamp(min=1)[:, :, None, None].to(torch.float32)


def _check_starts(starts, batch: int, lk: int) -> list[int]:
    """``starts``: one int per row, ``0 <= starts[b] <= Lk`` (tokens before it are left padding)."""
    if isinstance(starts, torch.Tensor):
        if starts.dim() != 1 or starts.dtype.is_floating_point or starts.dtype.is_complex or starts.dtype == torch.bool:
            raise TypeError(f"starts must be a list of ints or a 1-d integer tensor, got {starts.dtype} {tuple(starts.shape)}")
        starts = starts.tolist()
    if isinstance(starts, (str, bytes)) or not hasattr(starts, "__len__"):
        raise TypeError(f"starts must be a list of ints, got {type(starts).__name__}")
    bad = [s for s in starts if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
    if bad:
        raise TypeError(f"starts must hold ints, got {bad[0]!r}")
    if len(starts) != batch:
        raise ValueError(f"starts must have one entry per row ({batch}), got {len(starts)}")
    out = [int(s) for s in starts]
    wrong = [s for s in out if not 0 <= s <= lk]
    if wrong:
        raise ValueError(f"starts must lie in [0, Lk = {lk}] (first real cache position of each row), got {wrong[0]}")
    return out


def decode_attention_torch(q, k_cache, v_cache, block_indices, starts, lengths, block_size, scale):
    """Attention of the newest queries over their selected cached blocks (PyTorch, any device).

    q: (B, Lq, Hq, D); k_cache, v_cache: (B, Lk, Hkv, D) any strides; block_indices:
    (B, Lq, Hq, W) local block ids (-1 = unused); starts, lengths: (B,) int64 first cache
    position and token count of every row; block_size: ``layout.block_size`` of the rows
    (``moba._core.layout.effective_block_size``: at most the longest row, which bounds the
    (B, Lq, Hq, W, block_size) gather). Returns (B, Lq, Hq, D) in q's dtype.
    Only the selected blocks are read (gathered), never the whole cache.
    """
    b, lq, hq, d = q.shape
    lk, hkv = k_cache.shape[1], k_cache.shape[2]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    offs = torch.arange(block_size, device=dev)
    out = torch.empty(b, lq, hq, d, dtype=q.dtype, device=dev)
    width = block_indices.shape[-1]
    per_query = hq * width * block_size * d
    step = max(1, _GATHER_CHUNK_ELEMENTS // max(1, per_query))
    head_kv = (torch.arange(hq, device=dev) // (hq // hkv))[None, None, :, None]  # (1, 1, Hq, 1)
    for i0 in range(0, lq, step):
        i1 = min(lq, i0 + step)
        idx = block_indices[:, i0:i1].long()  # (B, l, Hq, W)
        q_pos = lengths[:, None] - lq + torch.arange(i0, i1, device=dev)[None, :]  # (B, l)
        token = idx[..., None] * block_size + offs  # (B, l, Hq, W, bs) position inside the row
        valid = (idx[..., None] >= 0) & (token <= q_pos[:, :, None, None, None])
        pos = (starts[:, None, None, None, None] + token).clamp(0, lk - 1)
        valid = valid.flatten(3)  # (B, l, Hq, W * bs)
        pos = pos.flatten(3).masked_fill(~valid, 0)  # (B, l, Hq, W * bs)
        row = torch.arange(b, device=dev)[:, None, None, None]  # (B, 1, 1, 1)
        keys = k_cache[row, pos, head_kv].to(dtype)  # (B, l, Hq, W * bs, D)
        # Masked slots read cache position 0 (left padding of a padded row, maybe NaN): their
        # scores are replaced below, their values here, since probability 0 * NaN is NaN.
        vals = torch.where(valid[..., None], v_cache[row, pos, head_kv].to(dtype), 0.0)
        s = torch.einsum("blhd,blhnd->blhn", q[:, i0:i1].to(dtype), keys) * scale
        s = s.masked_fill(~valid, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, i0:i1] = torch.einsum("blhn,blhnd->blhd", p, vals).to(q.dtype)
    return out


def moba_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    state: BlockMeanState,
    block_size: int,
    top_k: int,
    softmax_scale: float | None = None,
    starts: list[int] | None = None,
    backend: str = "auto",
    *,
    return_block_indices: bool = False,
):
    """Causal MoBA attention of the newest ``Lq`` tokens of each row over a KV cache.

    Args:
        q: (B, Lq, Hq, D) queries of the newest ``Lq`` tokens of every row; their keys and
            values are already the last ``Lq`` entries of the cache.
        k_cache, v_cache: (B, Lk, Hkv, D) cached keys/values, any strides (a transformers
            cache tensor (B, Hkv, Lk, D) can be passed as ``.transpose(1, 2)``).
        state: the layer's ``BlockMeanState``; updated in place (the last ``Lq`` tokens are
            folded in; a cropped or unknown cache is handled, see the module docstring).
        block_size, top_k: as in ``moba.moba_attn_func``.
        softmax_scale: defaults to ``D ** -0.5``.
        starts: first real cache position of each row (left padding), ints with
            ``0 <= starts[b] <= Lk - Lq``; default all 0. The padding is never read.
        backend: "auto" (Triton on CUDA, else PyTorch), "torch" or "triton"
            (``moba.ops.registry.resolve_decode_backend``; "reference" decodes with PyTorch).

    Returns:
        (B, Lq, Hq, D) in q's dtype (and the (B, Lq, Hq, W) block indices if asked).
    """
    check_cache_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    if q.shape[1] == 0:
        raise ValueError(f"q must hold at least one query token per row (Lq >= 1), got shape {tuple(q.shape)}")
    block_size = check_positive_int("block_size", block_size)
    top_k = check_positive_int("top_k", top_k)
    if not isinstance(state, BlockMeanState):
        raise TypeError(f"state must be a moba.BlockMeanState (one per layer), got {type(state).__name__}")
    if state.block_size != block_size:
        raise ValueError(f"state.block_size ({state.block_size}) != block_size ({block_size})")
    b, lq, hq, d = q.shape
    scale = resolve_softmax_scale(softmax_scale, d)
    starts = _check_starts([0] * b if starts is None else starts, b, k_cache.shape[1])
    if min((k_cache.shape[1] - s for s in starts), default=lq) < lq:
        raise ValueError(f"every row needs at least Lq = {lq} real cache tokens after its start, got starts={starts} "
                         f"for Lk = {k_cache.shape[1]}")
    path = resolve_decode_backend(backend, q.device, q)  # an unknown backend fails before the state changes
    if path == "triton" and q.dtype == torch.bfloat16 and q.device.type == "cpu" and triton_interpreter_enabled():
        raise NotImplementedError('backend="triton" with bfloat16 q on CPU: the Triton interpreter has no bfloat16 '
                                  'tl.dot; use float16 / float32 on CPU, CUDA tensors, or backend="torch"')
    lengths = state.update(k_cache, starts, lq)

    cu_q = [i * lq for i in range(b + 1)]
    cu_k = [0]
    for n in lengths:
        cu_k.append(cu_k[-1] + n)
    layout = build_layout(cu_q, cu_k, block_size, q.device)
    with torch.no_grad():
        idx = select_from_means(q.reshape(b * lq, hq, d), state.padded_means(), layout, top_k, causal=True)
    idx = idx.reshape(b, lq, hq, idx.shape[-1])
    starts_t = torch.tensor(starts, dtype=torch.int64, device=q.device)
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=q.device)
    if b > 0 and path == "triton":  # no rows: nothing to launch
        from ..triton_kernels.decode import moba_decode_triton

        out = moba_decode_triton(q, k_cache, v_cache, idx, starts_t, lengths_t, layout.block_size, scale)
    else:
        out = decode_attention_torch(q, k_cache, v_cache, idx, starts_t, lengths_t, layout.block_size, scale)
    return (out, idx) if return_block_indices else out


class LayerKVCache:
    """Keys and values of one attention layer for a batch of sequences, plus its block means.

    Storage grows geometrically by 12.5% (amortised O(1) per token, without doubling the
    memory of a long prompt's cache); ``keys`` / ``values`` are
    (B, length, Hkv, D) views of it. ``state`` is the layer's ``BlockMeanState`` (created on
    the first MoBA step). All rows share one length (no padding).
    """

    def __init__(self):
        self._k: torch.Tensor | None = None  # (B, capacity, Hkv, D)
        self._v: torch.Tensor | None = None
        self.length = 0
        self.state: BlockMeanState | None = None

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, : self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, : self.length]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v (B, n, Hkv, D) after the cached tokens; returns all keys and values so far."""
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must be equal (B, n, Hkv, D) tensors, got {tuple(k.shape)}, {tuple(v.shape)}")
        if self._k is not None and (k.shape[0] != self._k.shape[0] or k.shape[2:] != self._k.shape[2:]
                                    or k.dtype != self._k.dtype or k.device != self._k.device):
            raise ValueError(f"new keys {tuple(k.shape)} {k.dtype} do not match the cache "
                             f"{tuple(self._k.shape)} {self._k.dtype} (batch, heads, head_dim, dtype)")
        need = self.length + k.shape[1]
        if self._k is None or need > self._k.shape[1]:
            capacity = max(need + need // 8, 64)  # 12.5% headroom: amortised O(1), small overshoot
            new_k = k.new_empty(k.shape[0], capacity, *k.shape[2:])
            new_v = v.new_empty(v.shape[0], capacity, *v.shape[2:])
            if self.length:
                new_k[:, : self.length] = self._k[:, : self.length]
                new_v[:, : self.length] = self._v[:, : self.length]
            self._k, self._v = new_k, new_v
        self._k[:, self.length : need] = k
        self._v[:, self.length : need] = v
        self.length = need
        return self.keys, self.values

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (the block means follow on the next MoBA step)."""
        self.length = max(0, min(self.length, length))


class KVCache:
    """A model's KV cache for ``moba.nn.MoBASelfAttention`` layers (sparse MoBA decoding).

    Pass the same object to every step; layer ``i`` uses ``cache.layer(i)``. MoBA layers
    decode with ``moba_decode`` (only ``top_k`` blocks of the cache are read per query), full
    layers with ``full_attn_with_kvcache``. ``crop`` rolls back, e.g. rejected speculative
    tokens; it has ``transformers.DynamicCache.crop``'s meaning, so ``moba.generate`` drives
    models that use it.

    >>> cache = KVCache()
    >>> logits = model(prompt, cache=cache)            # prefill: (B, L) tokens
    >>> logits = model(next_tokens, cache=cache)       # then (B, n) new tokens per step
    """

    def __init__(self):
        self.layers: list[LayerKVCache] = []

    def layer(self, index: int) -> LayerKVCache:
        while len(self.layers) <= index:
            self.layers.append(LayerKVCache())
        return self.layers[index]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value removes that many from the end."""
        keep = self.get_seq_length() + max_length if max_length < 0 else max_length
        for layer in self.layers:
            layer.crop(keep)
