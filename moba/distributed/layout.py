"""The sequence layout of context parallelism: which tokens each rank holds.

A sequence of length ``S`` on ``P`` ranks is cut into ``2P`` equal chunks of ``C = S / (2P)``
tokens; rank ``r`` holds chunk ``r`` and chunk ``2P - 1 - r``, in that order. With causal
attention a late chunk has more past to attend to than an early one; pairing the ``r``-th
earliest with the ``r``-th latest gives every rank the same amount of attention work (the
load balance of Megatron-LM's context parallelism and of ring-flash-attention's "zigzag").

``shard_sequence`` is a local slice (no communication); ``gather_sequence`` all-gathers the
shards and restores the natural order (differentiable: the gradient of the gathered tensor is
summed over ranks and each rank keeps its shard's part).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import CommStats, agree, all_gather_cat, dtype_code, resolve_group


def chunk_owner(chunk: int, world: int) -> tuple[int, int]:
    """(rank, slot) holding chunk ``chunk`` of ``2 * world``: slot 0 is the rank's first half."""
    return (chunk, 0) if chunk < world else (2 * world - 1 - chunk, 1)


def rank_chunks(rank: int, world: int) -> tuple[int, int]:
    """The two chunks rank ``rank`` holds, in its storage order."""
    return rank, 2 * world - 1 - rank


def local_positions(rank: int, world: int, chunk: int, device=None) -> torch.Tensor:
    """(2 * chunk,) int64 sequence positions of a rank's tokens, in its storage order."""
    a, b = rank_chunks(rank, world)
    return torch.cat([torch.arange(a * chunk, (a + 1) * chunk, device=device),
                      torch.arange(b * chunk, (b + 1) * chunk, device=device)])


def shard_positions(local_len: int, group=None, device=None) -> torch.Tensor:
    """(local_len,) int64 positions in the whole sequence of this rank's ``local_len`` tokens
    (``local_len = S / P``): e.g. rotary embedding positions of a sharded sequence."""
    _, rank, world = resolve_group(group, "shard_positions")
    if local_len % 2:
        raise ValueError(f"shard_positions(): a shard holds two equal chunks, so local_len must be even, got {local_len}")
    return local_positions(rank, world, local_len // 2, device)


def _check_dim(x: torch.Tensor, dim: int, fn: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}(): x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{fn}(): dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, got {dim!r}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's shard of a whole sequence tensor (the same ``x`` on every rank).

    Args:
        x: any tensor whose dimension ``dim`` is the sequence, e.g. q (B, S, H, D) with dim=1.
        group: the process group the sequence is split over (default: the default group).
        dim: the sequence dimension.

    Returns:
        (..., S / P, ...): chunks ``r`` and ``2P - 1 - r`` of ``2P`` equal chunks, concatenated
        (a copy). ``S`` must be a multiple of ``2P``. No communication.

    Example:
        >>> q_local = shard_sequence(q)          # (B, S, H, D) -> (B, S / P, H, D)
    """
    group, rank, world = resolve_group(group, "shard_sequence")
    dim = _check_dim(x, dim, "shard_sequence")
    length = x.shape[dim]
    if length % (2 * world):
        raise ValueError(f"shard_sequence(): the sequence length (dimension {dim}) must be a multiple of "
                         f"2 * group size = {2 * world}, got {length}")
    chunk = length // (2 * world)
    a, b = rank_chunks(rank, world)
    return torch.cat([x.narrow(dim, a * chunk, chunk), x.narrow(dim, b * chunk, chunk)], dim=dim)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, dim, group, stats):
        world = dist.get_world_size(group)
        ctx.meta = (dim, group, stats)
        parts = all_gather_cat(x_local.movedim(dim, 0), group, stats, "gather_sequence")  # (P, 2C, ...)
        chunk = x_local.shape[dim] // 2
        halves = parts.reshape(world, 2, chunk, *parts.shape[2:])
        order = [halves[chunk_owner(c, world)] for c in range(2 * world)]
        return torch.cat(order, dim=0).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        dim, group, stats = ctx.meta
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)  # each rank's loss used its copy of the whole tensor
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if stats is not None:  # what a ring all-reduce moves each way
            nbytes = 2 * (world - 1) * grad.numel() * grad.element_size() // world
            stats.add("backward:gather_sequence", nbytes, nbytes)
        chunk = grad.shape[dim] // (2 * world)
        a, b = rank_chunks(rank, world)
        local = torch.cat([grad.narrow(dim, a * chunk, chunk), grad.narrow(dim, b * chunk, chunk)], dim=dim)
        return local, None, None, None


def gather_sequence(x_local: torch.Tensor, group=None, dim: int = 1, stats: CommStats | None = None) -> torch.Tensor:
    """The whole sequence from every rank's shard: the inverse of ``shard_sequence``.

    Args:
        x_local: this rank's shard, (..., S / P, ...) along ``dim``; every rank's shard must
            have the same shape and dtype (checked on every rank before any data moves).
        group, dim: as in ``shard_sequence``.
        stats: optional ``CommStats`` that receives the bytes moved.

    Returns:
        (..., S, ...) in natural order, the same on every rank. Differentiable.
    """
    group, rank, world = resolve_group(group, "gather_sequence")
    error, meta = None, []
    try:
        dim = _check_dim(x_local, dim, "gather_sequence")
        if x_local.shape[dim] % 2:
            raise ValueError(f"gather_sequence(): a shard holds two equal chunks, so its length along dim {dim} "
                             f"must be even, got {x_local.shape[dim]}")
        if x_local.dim() > 16:
            raise ValueError("gather_sequence(): at most 16 dimensions")
        meta = [dim, dtype_code(x_local.dtype), x_local.dim(), *x_local.shape]
    except (TypeError, ValueError) as e:
        error = e

    def describe(table):
        if bool((table == table[0]).all()):
            return None
        return "shards differ in shape, dtype or dim: " + "; ".join(
            f"rank {r}: dim {int(t[0])}, shape {tuple(int(s) for s in t[3:3 + int(t[2])])}" for r, t in enumerate(table))

    agree("gather_sequence", error, meta, describe, group, stats)
    return _Gather.apply(x_local, dim, group, stats)
