"""Context-parallel MoBA: one sequence sharded over the ranks of a process group.

Each rank holds q/k/v for chunks ``r`` and ``2P - 1 - r`` of the sequence (``moba.distributed.
layout``) and gets the output for the same tokens, equal to ``moba_attn_func`` on the whole
sequence (docs/design.md section 1: context parallelism changes where work runs, never the
result). Two methods:

* ``"ulysses"`` (DeepSpeed-Ulysses): an all-to-all turns sequence shards into head shards,
  each rank runs the single-process op over the whole sequence for ``Hq / P`` query heads
  (any backend), and an all-to-all turns the output back. Needs ``Hq % P == 0``; KV heads are
  split, or replicated when ``P`` does not divide ``Hkv`` (``cost.ulysses_kv_heads``).
* ``"sparse"``: the sequence stays sharded. The gate needs only block means: every rank sums
  its keys per block (blocks may straddle chunks and ranks), one all-gather of these partial
  sums gives every rank every block mean, and each rank gates its own queries with
  ``moba.ops.gate.select_from_means``. Then each rank fetches only the remote key/value rows
  of the blocks its queries selected (deduplicated over its queries and heads) and runs the
  single-process op with those blocks as explicit ``block_indices`` over a compacted key
  sequence (below). The backward of the fetch returns dK/dV to the owners.
* ``"auto"`` runs the sparse method's gate, counts the rows it would fetch (largest over the
  ranks) and runs whichever of the two moves fewer bytes (``moba.distributed.cost``).

Compacted keys (sparse): for the queries of one chunk, the needed blocks are kept in ascending
order, each a whole block, so block ``j`` of the compact sequence is the ``j``-th needed block.
Causally the chunk's own blocks are the last needed ones and are contiguous (every query's own
block is selected, and the chunk's queries own a contiguous range of blocks); cutting the
compact sequence at the chunk's end makes the chunk's queries its *last* tokens, so the
single-process op's bottom-right alignment puts every query at its true offset in its block,
and the causal mask inside the own block is the true one.

Not supported yet: packed variable-length batches (``moba_attn_varlen_func``), queries shorter
than keys (a KV cache), and the "send the queries to the blocks' owners" variant of the sparse
method (the model in ``bench/context_parallel.py`` estimates it).
"""

from __future__ import annotations

import struct

import torch

from .._core.checks import check_qkv, resolve_softmax_scale
from .._core.layout import BlockLayout, effective_block_size
from ..config import MoBAConfig, resolve_config
from ..ops.api import moba_attn_func, moba_attn_varlen_func
from ..ops.gate import select_from_means
from .comm import (
    CommStats,
    agree,
    all_gather_cat,
    all_to_all_rows,
    comm_device,
    dtype_code,
    exchange_counts,
    resolve_group,
)
from .cost import ulysses_bytes, ulysses_kv_heads
from .layout import chunk_owner, local_positions, rank_chunks

METHODS = ("auto", "ulysses", "sparse")
_META_NAMES = ("batch", "local seqlen", "query heads", "head dim", "KV heads", "dtype", "block_size",
               "top_k", "causal", "method", "return_lse", "needs gradients", "softmax_scale")


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _describe(table: torch.Tensor) -> str | None:
    for col, name in enumerate(_META_NAMES):
        values = [int(v) for v in table[:, col]]
        if len(set(values)) > 1:
            if name == "softmax_scale":
                values = [struct.unpack("<d", struct.pack("<q", v))[0] for v in values]
            return f"{name} differs across ranks: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
    return None


def _validate(q, k, v, block_size, top_k, causal, method, return_lse, config, softmax_scale, backend):
    if config is None and block_size is None:
        raise TypeError("moba_attn_func_cp() needs block_size (or config=moba.MoBAConfig(...))")
    if config is None and top_k is None:
        raise TypeError("moba_attn_func_cp() needs top_k (or config=moba.MoBAConfig(...))")
    cfg = resolve_config(config, block_size=block_size, top_k=top_k, causal=causal,
                         softmax_scale=softmax_scale, backend=backend)
    check_qkv(q, k, v, varlen=False, same_length=True)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if q.shape[1] % 2:
        raise ValueError(f"q/k/v hold this rank's two equal chunks of the sequence (shard_sequence), so their "
                         f"length (dimension 1) must be even, got {q.shape[1]}")
    if q.shape[1] == 0:
        raise ValueError("q/k/v hold no tokens (dimension 1 is 0)")
    return cfg, resolve_softmax_scale(cfg.softmax_scale, q.shape[-1])


def moba_attn_func_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int | None = None,
    top_k: int | None = None,
    group=None,
    causal: bool | None = None,
    method: str = "auto",
    return_lse: bool = False,
    config: MoBAConfig | None = None,
    *,
    softmax_scale: float | None = None,
    backend: str | None = None,
    stats: CommStats | None = None,
):
    """MoBA attention over a sequence sharded across the ranks of ``group`` (context parallelism).

    Every rank of ``group`` calls this with its own shard; the call is collective.

    Args:
        q: (B, S/P, Hq, D) this rank's queries: chunks ``r`` and ``2P - 1 - r`` of ``2P`` equal
            chunks of the sequence (``shard_sequence(q_full)``).
        k, v: (B, S/P, Hkv, D) keys and values in the same layout, ``Hq % Hkv == 0``.
        block_size, top_k, causal, softmax_scale, backend, config: as in ``moba_attn_func``
            (blocks are cut over the whole sequence of length ``S``; the backend runs locally).
        group: the process group holding the sequence (default: the default group); >= 2 ranks.
        method: "ulysses", "sparse" or "auto" (module docstring; ``moba.distributed.cost``).
        return_lse: also return the log-sum-exp, (B, Hq, S/P), float32 (float64 for float64 inputs).
        stats: optional ``CommStats``; the bytes this rank sends and receives are added to it,
            forward and backward, and ``stats.method`` is set to the method that ran.

    Returns:
        out (B, S/P, Hq, D): this rank's shard of ``moba_attn_func(q_full, k_full, v_full, ...)``;
        ``(out, lse)`` with ``return_lse=True``. Differentiable with respect to q, k and v (every
        rank must run the backward, as with any collective).

    Bad input (a length that does not split into two chunks, shapes or settings that differ
    across ranks) raises ``ValueError`` / ``TypeError`` on every rank: the ranks exchange a
    small description of their input before moving any data, so none waits forever.

    Example:
        >>> q_l, k_l, v_l = (shard_sequence(t) for t in (q, k, v))   # (B, S/P, H, D)
        >>> out_l = moba_attn_func_cp(q_l, k_l, v_l, block_size=512, top_k=3)
        >>> out = gather_sequence(out_l)                              # == moba_attn_func(q, k, v, 512, 3)
    """
    group, rank, world = resolve_group(group, "moba_attn_func_cp")
    if world < 2:
        raise ValueError("moba_attn_func_cp(): the group has 1 rank; context parallelism needs at least 2 "
                         "(on one rank call moba_attn_func on the whole sequence)")
    error, meta, cfg, scale = None, [], None, None
    try:
        cfg, scale = _validate(q, k, v, block_size, top_k, causal, method, return_lse, config, softmax_scale, backend)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        meta = [*q.shape, k.shape[2], dtype_code(q.dtype), min(cfg.block_size, 1 << 62), min(cfg.top_k, 1 << 62),
                int(cfg.causal), METHODS.index(method), int(return_lse), int(grad), _float_bits(scale)]
    except (TypeError, ValueError) as e:
        error = e
    agree("moba_attn_func_cp", error, meta, _describe, group, stats)

    batch, local_len, hq, head_dim = q.shape
    hkv = k.shape[2]
    grad = bool(meta[11])
    if method == "ulysses" and hq % world:
        raise ValueError(f"method='ulysses' needs the query heads ({hq}) to be a multiple of the group size "
                         f"({world}); use method='sparse'")
    if stats is not None:
        stats.method = None
    if method == "ulysses":
        result = _ulysses(q, k, v, cfg, scale, group, rank, world, stats, return_lse)
        chosen = "ulysses"
    else:
        plan = _SparsePlan(q, k, cfg, group, rank, world, stats)
        chosen = "sparse"
        if method == "auto" and hq % world == 0:
            elem = q.element_size()
            fetch = plan.remote_rows * (2 * hkv * head_dim * elem * (2 if grad else 1) + 8)
            mine = torch.tensor([fetch], dtype=torch.float64, device=comm_device(group))
            worst = float(all_gather_cat(mine, group, stats, "auto").max())
            uly = ulysses_bytes(local_len * world, world, batch, hq, hkv, head_dim, elem, backward=grad)
            if uly < worst:
                chosen = "ulysses"
        if chosen == "sparse":
            result = plan.attention(q, k, v, scale, return_lse)
        else:
            result = _ulysses(q, k, v, cfg, scale, group, rank, world, stats, return_lse)
    if stats is not None:
        stats.method = chosen
    return result


# -- Ulysses ---------------------------------------------------------------------------------


def _to_heads(x: torch.Tensor, world: int, group, stats, phase) -> torch.Tensor:
    """(P, B, S/P, h, D) pieces by destination rank, in the sharded layout -> (B, S, h, D) natural order."""
    _, batch, local_len, h, d = x.shape
    chunk = local_len // 2
    got = all_to_all_rows(x.reshape(world * batch * local_len, h, d), [batch * local_len] * world,
                          [batch * local_len] * world, group, stats, phase)
    got = got.reshape(world, batch, 2, chunk, h, d)  # (source rank, B, slot, C, h, D)
    parts = [got[src, :, slot] for src, slot in (chunk_owner(c, world) for c in range(2 * world))]
    return torch.cat(parts, dim=1)


def _from_heads(x: torch.Tensor, world: int, group, stats, phase) -> torch.Tensor:
    """(B, S, h, D) natural order -> (B, S/P, P * h, D): this rank's tokens, heads of rank 0 first."""
    batch, seqlen, h, d = x.shape
    chunk = seqlen // (2 * world)
    pieces = torch.stack([torch.cat([x[:, a * chunk:(a + 1) * chunk], x[:, b * chunk:(b + 1) * chunk]], dim=1)
                          for a, b in (rank_chunks(p, world) for p in range(world))])  # (P, B, 2C, h, D)
    got = all_to_all_rows(pieces.reshape(-1, h, d), [batch * 2 * chunk] * world, [batch * 2 * chunk] * world,
                          group, stats, phase)
    return got.reshape(world, batch, 2 * chunk, h, d).permute(1, 2, 0, 3, 4).reshape(batch, 2 * chunk, world * h, d)


def _ulysses(q, k, v, cfg, scale, group, rank, world, stats, return_lse):
    batch, local_len, hq, d = q.shape
    hkv = k.shape[2]
    hq_p = hq // world
    heads = torch.tensor(ulysses_kv_heads(hq, hkv, world), device=q.device)  # (P, nkv)
    nkv = heads.shape[1]
    qs = q.reshape(batch, local_len, world, hq_p, d).permute(2, 0, 1, 3, 4)
    kv = torch.cat([k[:, :, heads.reshape(-1)], v[:, :, heads.reshape(-1)]], dim=2)  # (B, S/P, 2 * P * nkv, D)
    kv = kv.reshape(batch, local_len, 2, world, nkv, d).permute(3, 0, 1, 2, 4, 5).reshape(world, batch, local_len, 2 * nkv, d)
    q_full = _to_heads(qs, world, group, stats, "ulysses:q")
    kv_full = _to_heads(kv, world, group, stats, "ulysses:kv")
    k_full, v_full = kv_full[:, :, :nkv], kv_full[:, :, nkv:]
    res = moba_attn_func(q_full, k_full, v_full, block_size=cfg.block_size, top_k=cfg.top_k, causal=cfg.causal,
                         softmax_scale=scale, backend=cfg.backend, return_lse=return_lse)
    out_full, lse_full = res if return_lse else (res, None)
    out = _from_heads(out_full, world, group, stats, "ulysses:out")
    if not return_lse:
        return out
    lse = _from_heads(lse_full.transpose(1, 2)[..., None].contiguous(), world, group, stats, "ulysses:lse")
    return out, lse[..., 0].transpose(1, 2).contiguous()


# -- sparse ----------------------------------------------------------------------------------


class _SparsePlan:
    """Block means, the gate and the fetch plan of the sparse method (no K/V moved yet)."""

    def __init__(self, q, k, cfg: MoBAConfig, group, rank: int, world: int, stats):
        self.group, self.rank, self.world, self.stats, self.cfg = group, rank, world, stats, cfg
        batch, local_len, hq, d = q.shape
        hkv = k.shape[2]
        chunk = local_len // 2
        seqlen = local_len * world
        bs = effective_block_size(cfg.block_size, seqlen)
        n_blocks = -(-seqlen // bs)
        dev = q.device
        pos = local_positions(rank, world, chunk, dev)  # (2C,)
        self.batch, self.chunk, self.seqlen, self.bs, self.n_blocks = batch, chunk, seqlen, bs, n_blocks

        with torch.no_grad():
            # Partial block sums of this rank's keys; one chunk touches at most m blocks.
            m = (chunk - 1) // bs + 2
            first = [(c * chunk) // bs for c in rank_chunks(rank, world)]
            slot = torch.cat([pos[:chunk] // bs - first[0], pos[chunk:] // bs - first[1] + m])
            partial = k.new_zeros(batch, 2 * m, hkv, d, dtype=torch.float32).index_add_(1, slot, k.float())
            gathered = all_gather_cat(partial, group, stats, "block_sums")  # (P, B, 2m, Hkv, D)
            sums = k.new_zeros(batch, n_blocks + 2 * m, hkv, d, dtype=torch.float32)
            for src in range(world):
                base = torch.cat([torch.arange(m, device=dev) + (c * chunk) // bs for c in rank_chunks(src, world)])
                sums.index_add_(1, base, gathered[src])
            lengths = (seqlen - torch.arange(n_blocks, device=dev) * bs).clamp(max=bs)
            means = sums[:, :n_blocks] / lengths[None, :, None, None].to(torch.float32)

            # The gate of this rank's queries (positions pos in every sequence of the batch).
            q_seq = torch.arange(batch, device=dev).repeat_interleave(local_len)
            layout = BlockLayout(
                block_size=bs, cu_q=[b * local_len for b in range(batch + 1)],
                cu_k=[b * seqlen for b in range(batch + 1)], q_seq=q_seq, q_pos=pos.repeat(batch),
                q_key_token=q_seq * seqlen + pos.repeat(batch), seq_len_k=torch.full((batch,), seqlen, device=dev),
                seq_n_blocks=torch.full((batch,), n_blocks, device=dev),
                block_offset=torch.arange(batch, device=dev) * n_blocks,
                block_start=(torch.arange(batch * n_blocks, device=dev) % n_blocks) * bs
                + torch.arange(batch, device=dev).repeat_interleave(n_blocks) * seqlen,
                block_len=lengths.repeat(batch))
            idx = select_from_means(q.detach().reshape(batch * local_len, hq, d), means, layout, cfg.top_k, cfg.causal)
            idx = idx.long().reshape(batch, 2, chunk, hq, -1)

            # Needed blocks of each (sequence, chunk), and their compact numbering.
            flat = idx.reshape(batch, 2, -1)
            need = torch.zeros(batch, 2, n_blocks + 1, dtype=torch.bool, device=dev)
            need.scatter_(2, torch.where(flat < 0, n_blocks, flat), True)
            need = need[..., :n_blocks]
            compact = need.long().cumsum(-1) - 1  # (B, 2, nb)
            remap = torch.where(idx < 0, idx, compact.gather(2, idx.clamp(min=0).reshape(batch, 2, -1)).reshape(idx.shape))
            self.block_indices = remap.reshape(batch * local_len, hq, -1)

            # Key tokens of each compact sequence, as global rows b * S + position.
            offs = torch.arange(bs, device=dev)
            rows, lens = [], []
            for b in range(batch):
                for i, c in enumerate(rank_chunks(rank, world)):
                    blocks = need[b, i].nonzero().squeeze(1)
                    tok = blocks[:, None] * bs + offs[None, :]
                    end = torch.full_like(blocks, seqlen)
                    if cfg.causal:
                        end = end.clamp(max=(c + 1) * chunk)
                    tok = tok[tok < torch.minimum((blocks + 1) * bs, end)[:, None]]
                    rows.append(tok + b * seqlen)
                    lens.append(int(tok.numel()))
            self.lens = lens
            wanted = torch.cat(rows)
            uniq, inverse = torch.unique(wanted, return_inverse=True)
            b_of, p_of = uniq // seqlen, uniq % seqlen
            c_of = p_of // chunk
            owner = torch.where(c_of < world, c_of, 2 * world - 1 - c_of)
            slot_of = torch.where(c_of < world, 0, chunk) + p_of % chunk
            owner_row = b_of * local_len + slot_of
            order = torch.argsort(owner * (batch * local_len) + owner_row)
            where = torch.empty_like(order)
            where[order] = torch.arange(order.numel(), device=dev)
            self.compact_rows = where[inverse]  # compact key token -> row of the fetched buffer
            self.request = owner_row[order]  # rows to ask for, grouped by owner
            self.request_counts = torch.bincount(owner, minlength=world).tolist()
            self.remote_rows = sum(self.request_counts) - self.request_counts[rank]  # rows fetched, whole batch

    def attention(self, q, k, v, scale: float, return_lse: bool):
        group, stats = self.group, self.stats
        batch, local_len, hq, d = q.shape
        hkv = k.shape[2]
        send_counts = exchange_counts(self.request_counts, group, stats, "sparse:counts")
        asked = all_to_all_rows(self.request, self.request_counts, send_counts, group, stats, "sparse:index")
        kv_local = torch.cat([k, v], dim=2).reshape(batch * local_len, 2 * hkv, d)
        fetched = all_to_all_rows(kv_local[asked], send_counts, self.request_counts, group, stats, "sparse:kv")
        kv = fetched[self.compact_rows]
        cu_k = torch.tensor([0, *torch.tensor(self.lens).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
        cu_q = torch.arange(2 * batch + 1, dtype=torch.int32, device=q.device) * self.chunk
        res = moba_attn_varlen_func(
            q.reshape(batch * local_len, hq, d), kv[:, :hkv], kv[:, hkv:], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=self.chunk, max_seqlen_k=max(self.lens), block_size=self.bs, causal=self.cfg.causal,
            softmax_scale=scale, backend=self.cfg.backend, block_indices=self.block_indices, return_lse=return_lse)
        if not return_lse:
            return res.reshape(q.shape)
        out, lse = res  # lse (Hq, B * S/P)
        return out.reshape(q.shape), lse.reshape(hq, batch, local_len).transpose(0, 1).contiguous()
