"""Block layout of packed sequences, shared by the gate, the PyTorch path and decoding.

Sequences are packed (varlen): sequence ``n`` owns query tokens ``cu_q[n]:cu_q[n+1]`` and
key tokens ``cu_k[n]:cu_k[n+1]``. Queries are aligned to the *end* of their key sequence
(as in flash-attn): with ``Lq <= Lk`` the i-th query of a sequence sits at position
``Lk - Lq + i``. Self-attention is the case ``cu_q == cu_k``; decoding one token with a
cache is ``Lq == 1``.

Key blocks are numbered globally: the blocks of sequence 0 first, then sequence 1, ...
Block ``j`` of sequence ``n`` has global id ``block_offset[n] + j``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

#: No tensor holds this many tokens (sizes are int64), so a larger block size means the same
#: thing: one block per sequence.
MAX_TOKENS = 1 << 62


def effective_block_size(block_size: int, longest: int = MAX_TOKENS) -> int:
    """The block size the kernels use: ``min(block_size, longest)`` (at least 1).

    ``longest`` is the longest key sequence the blocks will cover. Any ``block_size`` is
    legal (docs/design.md section 1), but every sequence of at most ``block_size`` tokens is one
    block, so a block size above the longest sequence selects the same blocks as
    ``block_size = longest``. Clamping here, once, keeps every per-block buffer (token
    indices, tail masks, tiles, kernel tile counts, int32 kernel arguments) at
    O(min(block_size, seqlen)): a huge block size costs what dense attention costs, and
    2**62 never reaches a tensor size.
    """
    return max(1, min(int(block_size), int(longest)))


@dataclass
class BlockLayout:
    block_size: int
    cu_q: list[int]
    cu_k: list[int]
    # per query token (Tq,), int64
    q_seq: torch.Tensor  # sequence id
    q_pos: torch.Tensor  # position inside its key sequence
    q_key_token: torch.Tensor  # global key-token index of the query's own position
    # per sequence (N,), int64
    seq_len_k: torch.Tensor
    seq_n_blocks: torch.Tensor
    block_offset: torch.Tensor
    # per global block (G,), int64
    block_start: torch.Tensor  # first key token (global index)
    block_len: torch.Tensor  # number of tokens (< block_size only for a tail block)

    @property
    def n_blocks(self) -> int:
        return int(self.block_start.numel())

    @property
    def max_blocks_per_seq(self) -> int:
        """Blocks of the longest key sequence, from the host boundaries (no device read)."""
        return max_blocks(self.cu_k, self.block_size)

    def block_token_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, block_size) key-token index of every slot of every block, and its validity mask."""
        offs = torch.arange(self.block_size, device=self.block_start.device)
        valid = offs[None, :] < self.block_len[:, None]
        index = (self.block_start[:, None] + offs[None, :]).masked_fill(~valid, 0)
        return index, valid


def max_blocks(cu_k: list[int], block_size: int):
    """Blocks of the longest key sequence. SymInt-safe (``torch.sym_max``), so compiled callers
    with dynamic lengths do not guard on them."""
    n_blocks = [(b - a + block_size - 1) // block_size for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)]
    return functools.reduce(torch.sym_max, n_blocks, 0)


def gate_width(n_blocks_max, top_k: int):
    """Slots of a gate result: ``max(1, min(top_k, n_blocks_max))`` (one slot even with no keys,
    so the tensor shape never has a zero width). SymInt-safe."""
    return torch.sym_max(1, torch.sym_min(top_k, n_blocks_max))


def check_query_key_lengths(cu_q: list[int], cu_k: list[int]) -> None:
    """Every sequence needs ``Lq <= Lk`` (its queries are its last key positions)."""
    for n in range(len(cu_q) - 1):
        a, b = cu_q[n + 1] - cu_q[n], cu_k[n + 1] - cu_k[n]
        if a > b:
            raise ValueError(f"sequence {n} has more queries ({a}) than keys ({b}): cu_seqlens_q / cu_seqlens_k "
                             "need Lq <= Lk per sequence (queries are the last tokens of their keys)")


def build_layout(cu_q: list[int], cu_k: list[int], block_size: int, device) -> BlockLayout:
    """Build the block layout from host lists of sequence boundaries.

    ``layout.block_size`` is ``effective_block_size(block_size, longest key sequence)``:
    the same blocks, and no buffer larger than the sequences need.
    """
    lq = [b - a for a, b in zip(cu_q[:-1], cu_q[1:], strict=True)]
    lk = [b - a for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)]
    block_size = effective_block_size(block_size, max(lk, default=1))
    check_query_key_lengths(cu_q, cu_k)
    n_blocks = [(length + block_size - 1) // block_size for length in lk]

    long = dict(dtype=torch.int64, device=device)
    n_seq = len(lq)
    # The per-sequence values in one host-to-device copy (pinned and non-blocking on CUDA: a
    # pageable copy waits for the stream); sizes from the host lists, so no op reads a device
    # value back (repeat_interleave gets its output size).
    host = torch.tensor(lq + lk + n_blocks + list(cu_q[:-1]) + list(cu_k[:-1]), dtype=torch.int64)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    seq_len_q, seq_len_k, seq_n_blocks, q_start, k_start = host.to(device, non_blocking=True).split([n_seq] * 5)
    block_offset = torch.cumsum(seq_n_blocks, 0) - seq_n_blocks

    q_seq = torch.repeat_interleave(torch.arange(n_seq, **long), seq_len_q, output_size=cu_q[-1])
    q_pos = torch.arange(cu_q[-1], **long) - q_start[q_seq] + (seq_len_k - seq_len_q)[q_seq]
    q_key_token = k_start[q_seq] + q_pos

    block_seq = torch.repeat_interleave(torch.arange(n_seq, **long), seq_n_blocks, output_size=sum(n_blocks))
    block_local = torch.arange(sum(n_blocks), **long) - block_offset[block_seq]
    block_start = k_start[block_seq] + block_local * block_size
    block_len = torch.clamp(seq_len_k[block_seq] - block_local * block_size, max=block_size)
    return BlockLayout(
        block_size=block_size,
        cu_q=list(cu_q),
        cu_k=list(cu_k),
        q_seq=q_seq,
        q_pos=q_pos,
        q_key_token=q_key_token,
        seq_len_k=seq_len_k,
        seq_n_blocks=seq_n_blocks,
        block_offset=block_offset,
        block_start=block_start,
        block_len=block_len,
    )


def fixed_cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    """cu_seqlens of a fixed-length batch packed as varlen."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
