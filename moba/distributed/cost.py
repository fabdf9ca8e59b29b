"""Communication model of context-parallel attention: bytes one rank sends per layer call.

Used by ``method="auto"`` (Ulysses' volume is known from shapes alone; the sparse method's is
counted exactly after the gate) and by ``bench/context_parallel.py`` (which models ring,
Ulysses and the sparse method at sizes no test can run; its numbers are labelled modelled).

Notation: ``S`` tokens on ``P`` ranks, batch ``B``, ``Hq`` / ``Hkv`` heads of dim ``D``,
``e`` bytes per element of q/k/v (2 for bf16), forward + backward unless ``backward=False``.

* ring attention (Megatron-LM context parallelism, zigzag layout): every rank's K/V shard
  visits every other rank: forward ``(P - 1) * B * S/P * 2 * Hkv * D * e``; the backward sends
  K/V around again and dK/dV (accumulated in float32 in common implementations; counted at
  ``grad_bytes``) back around the ring.
* Ulysses (DeepSpeed): all-to-all of q, k, v to head shards, all-to-all of the output back;
  each rank keeps ``1/P`` of what it has. Backward: dO out, dq/dk/dv back: the same volume.
  KV heads are split when ``Hkv % P == 0``, each rank gets one KV head when ``P % Hkv == 0``,
  otherwise KV is replicated to one head per query head (``ulysses_kv_heads``).
* sparse (this package): all-gather the partial block-key sums (float32, ``(P - 1)`` pieces of
  ``B * 2 * m * Hkv * D * 4`` bytes, ``m`` the blocks one chunk touches), a small exchange of
  row indices, then only the remote K/V rows the local queries' selected blocks need; the
  backward returns dK/dV for exactly those rows.
"""

from __future__ import annotations


def ulysses_kv_heads(hq: int, hkv: int, world: int) -> list[list[int]]:
    """The KV heads rank p needs for its query heads ``p * Hq/P ... (p+1) * Hq/P - 1`` (Hq % P == 0).

    Equal counts per rank, and local query head ``i`` reads local KV head
    ``i // (Hq/P // len(heads))``: split when ``Hkv % P == 0``, one head per rank when
    ``P % Hkv == 0``, otherwise one KV head per query head (replicated)."""
    hq_p, group = hq // world, hq // hkv
    if hkv % world == 0:
        n = hkv // world
        return [list(range(p * n, (p + 1) * n)) for p in range(world)]
    if world % hkv == 0:
        return [[(p * hq_p) // group] for p in range(world)]
    return [[(p * hq_p + i) // group for i in range(hq_p)] for p in range(world)]


def ring_bytes(seqlen: int, world: int, batch: int, hkv: int, head_dim: int, elem: int = 2,
               backward: bool = True, grad_bytes: int = 4) -> float:
    """Bytes one rank sends in ring attention (the K/V shard passed P - 1 times; backward: K/V and dK/dV)."""
    shard_kv = batch * seqlen / world * 2 * hkv * head_dim
    fwd = (world - 1) * shard_kv * elem
    return fwd + ((world - 1) * shard_kv * (elem + grad_bytes) if backward else 0.0)


def ulysses_bytes(seqlen: int, world: int, batch: int, hq: int, hkv: int, head_dim: int, elem: int = 2,
                  backward: bool = True) -> float:
    """Bytes one rank sends with Ulysses (q, k, v out and the output back; the backward mirrors it)."""
    kv_heads = world * len(ulysses_kv_heads(hq, hkv, world)[0])  # KV heads sent by a rank, all destinations
    per_token = (2 * hq + 2 * kv_heads) * head_dim * elem
    fwd = (world - 1) / world * batch * seqlen / world * per_token
    return fwd * (2 if backward else 1)


def blocks_per_chunk(chunk: int, block_size: int, n_blocks: int) -> int:
    """Upper bound on the blocks one chunk of ``chunk`` tokens touches (two partial ends)."""
    return min(n_blocks, (chunk - 1) // block_size + 2)


def sparse_bytes(seqlen: int, world: int, batch: int, hkv: int, head_dim: int, block_size: int,
                 remote_rows: float, elem: int = 2, backward: bool = True) -> float:
    """Bytes one rank sends with the sparse method.

    ``remote_rows``: key tokens (per sequence of the batch) this rank fetches from other ranks,
    i.e. the distinct remote tokens of the blocks its queries selected; the rank *sends* as many
    on average (the model is symmetric)."""
    chunk = seqlen // (2 * world)
    n_blocks = -(-seqlen // block_size)
    means = (world - 1) * batch * 2 * blocks_per_chunk(chunk, block_size, n_blocks) * hkv * head_dim * 4
    index = 8 * batch * remote_rows + 8 * (world - 1)
    rows = batch * remote_rows * 2 * hkv * head_dim * elem
    return means + index + rows * (2 if backward else 1)


def remote_rows_from_selection(block_indices, world: int, block_size: int, causal: bool = True) -> list[int]:
    """Key rows each rank's sparse method fetches from other ranks, from a whole-sequence selection.

    block_indices: (B, S, Hq, W) from ``moba.select_blocks`` (``PAD_INDEX`` = -1 unused) on
    the whole sequence. Per rank: the distinct remote key tokens of the blocks its two chunks'
    queries selected (causally cut at each chunk's end), summed over the batch: what
    ``moba_attn_func_cp(method="sparse")`` moves for this selection (the same rule as its plan).
    """
    import torch

    from .layout import local_positions, rank_chunks

    batch, seqlen = block_indices.shape[:2]
    chunk = seqlen // (2 * world)
    bs = max(1, min(int(block_size), seqlen))
    n_blocks = -(-seqlen // bs)
    rows = []
    for rank in range(world):
        mine = torch.zeros(seqlen, dtype=torch.bool)
        mine[local_positions(rank, world, chunk)] = True
        total = 0
        for b in range(batch):
            wanted = torch.zeros(seqlen, dtype=torch.bool)
            for c in rank_chunks(rank, world):
                sel = block_indices[b, c * chunk:(c + 1) * chunk].reshape(-1).long()
                need = torch.zeros(n_blocks + 1, dtype=torch.bool)
                need[torch.where(sel < 0, n_blocks, sel)] = True
                tok = torch.arange(seqlen)
                hit = need[:n_blocks][tok // bs]
                if causal:
                    hit &= tok < (c + 1) * chunk
                wanted |= hit
            total += int((wanted & ~mine).sum())
        rows.append(total)
    return rows


def sparse_query_bytes(seqlen: int, world: int, batch: int, hq: int, head_dim: int, top_k: int,
                       remote_share: float = 1.0, elem: int = 2) -> float:
    """MODEL ONLY (not implemented): the sparse variant that sends queries to the owners of their
    selected remote blocks and merges partial outputs by log-sum-exp. Per (query, head, remote
    selected block): forward q out, partial output + lse back; backward dO out, dq back. Upper bound
    (no deduplication of a query sent to one owner for two blocks). ``remote_share``: fraction of
    the ``top_k - 1`` gate picks that live on another rank."""
    picks = batch * seqlen / world * hq * max(0, top_k - 1) * remote_share
    return picks * (4 * head_dim * elem + 4)
