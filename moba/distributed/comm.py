"""Collectives for context parallelism: byte counting, a differentiable all-to-all, input guards.

Every collective the context-parallel op runs goes through this module, so that

* the bytes each rank sends and receives are counted in a caller-visible ``CommStats``
  (self-sends are copies, not traffic, and are not counted);
* the backward of a data move is the reverse move (``all_to_all_rows`` is an autograd
  function: gradients of rows a rank received go back to the rank that owns them);
* a call with bad or mismatched input raises on *every* rank instead of leaving some ranks
  waiting in a collective that the others never enter (``agree``: one small, fixed-size
  all-gather of each rank's input description runs before any data-dependent collective).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Bytes one rank sent to and received from other ranks, per phase.

    Pass one to ``moba_attn_func_cp(..., stats=s)``; the forward and the backward (under the
    phase names ``"backward:<phase>"``) add to it. ``method`` is the method the last call ran
    (what ``method="auto"`` chose). Totals: ``sent_bytes`` / ``recv_bytes``.

    All-to-all phases count exactly the bytes of rows that leave / reach this rank. All-gather
    phases count ``(P - 1)`` times the local piece each way (what a ring all-gather moves).
    """

    by_phase: dict[str, list[int]] = field(default_factory=dict)
    method: str | None = None

    def add(self, phase: str, sent: int, recv: int) -> None:
        entry = self.by_phase.setdefault(phase, [0, 0])
        entry[0] += int(sent)
        entry[1] += int(recv)

    @property
    def sent_bytes(self) -> int:
        return sum(s for s, _ in self.by_phase.values())

    @property
    def recv_bytes(self) -> int:
        return sum(r for _, r in self.by_phase.values())

    def reset(self) -> None:
        self.by_phase.clear()
        self.method = None

    def as_dict(self) -> dict:
        return {"method": self.method, "sent_bytes": self.sent_bytes, "recv_bytes": self.recv_bytes,
                "by_phase": {k: {"sent": s, "recv": r} for k, (s, r) in self.by_phase.items()}}


def resolve_group(group, fn: str):
    """(group, rank, world size) of ``group`` (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn}() needs torch.distributed: call torch.distributed.init_process_group() first "
                           "(torchrun sets the environment), or use moba.distributed.run_local()")
    if group is None:
        group = dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """Where small bookkeeping tensors (counts, the input guard) live for ``group``'s backend:
    the current CUDA device for NCCL (it moves only CUDA tensors), else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _record(stats: CommStats | None, phase: str, sent: int, recv: int) -> None:
    if stats is not None:
        stats.add(phase, sent, recv)


def all_gather_cat(x: torch.Tensor, group, stats: CommStats | None, phase: str) -> torch.Tensor:
    """All-gather equal-shaped tensors: (n, ...) on each rank -> (P, n, ...), rank order. Not differentiable."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    nbytes = x.numel() * x.element_size()
    _record(stats, phase, (size - 1) * nbytes, (size - 1) * nbytes)
    return torch.stack(parts)


def _all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(recv_counts), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    return out


def _traffic(row_bytes: int, send_counts, recv_counts, rank: int) -> tuple[int, int]:
    """(bytes sent, bytes received) of an all-to-all, without the rows a rank keeps."""
    return ((sum(send_counts) - send_counts[rank]) * row_bytes, (sum(recv_counts) - recv_counts[rank]) * row_bytes)


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group, stats, phase):
        rank = dist.get_rank(group)
        ctx.meta = (send_counts, recv_counts, group, stats, phase, rank)
        row_bytes = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
        _record(stats, phase, *_traffic(row_bytes, send_counts, recv_counts, rank))
        return _all_to_all(x, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts, group, stats, phase, rank = ctx.meta
        row_bytes = grad[0].numel() * grad.element_size() if grad.dim() > 1 else grad.element_size()
        _record(stats, "backward:" + phase, *_traffic(row_bytes, recv_counts, send_counts, rank))
        return _all_to_all(grad, recv_counts, send_counts, group), None, None, None, None, None


def all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group,
                    stats: CommStats | None = None, phase: str = "all_to_all") -> torch.Tensor:
    """Rows ``x (sum(send_counts), ...)``: the first ``send_counts[0]`` go to rank 0, and so on;
    returns ``(sum(recv_counts), ...)``, the rows from rank 0 first. Differentiable: the backward
    sends the gradient rows back where they came from."""
    return _AllToAllRows.apply(x, list(send_counts), list(recv_counts), group, stats, phase)


def exchange_counts(send_counts: list[int], group, stats: CommStats | None, phase: str) -> list[int]:
    """Each rank tells each other rank how many rows it will send it: returns the counts to receive."""
    t = torch.tensor(send_counts, dtype=torch.int64, device=comm_device(group))
    one = [1] * len(send_counts)
    got = _all_to_all(t, one, one, group)
    _record(stats, phase, 8 * (len(send_counts) - 1), 8 * (len(send_counts) - 1))
    return [int(c) for c in got]


# -- the guard: every rank checks its own input, then all ranks agree before moving data -------

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
META_LEN = 24


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def agree(fn: str, local_error: Exception | None, meta: list[int], describe, group,
          stats: CommStats | None = None) -> torch.Tensor:
    """All-gather each rank's fixed-size description of its input (``meta``, at most META_LEN ints)
    and raise the same kind of error on every rank when one rank's input is invalid or the ranks
    disagree. ``describe(metas) -> str | None`` names the first disagreement. Returns the (P, META_LEN)
    table. The rank whose input is invalid re-raises its own error; the others name that rank."""
    assert len(meta) < META_LEN, "the description of an input is at most META_LEN - 1 ints"
    row = torch.full((META_LEN,), -1, dtype=torch.int64)
    row[0] = 0 if local_error is None else 1
    if local_error is None:
        row[1 : 1 + len(meta)] = torch.tensor(meta, dtype=torch.int64)
    table = all_gather_cat(row.to(comm_device(group)), group, stats, "guard").cpu()
    bad = [r for r in range(table.shape[0]) if int(table[r, 0]) != 0]
    if local_error is not None:
        raise local_error
    if bad:
        raise ValueError(f"{fn}(): the input on rank(s) {bad} of the group is invalid (that rank raised the "
                         "reason); every rank stops here instead of waiting in a collective")
    problem = describe(table[:, 1:])
    if problem is not None:
        raise ValueError(f"{fn}(): the ranks disagree: {problem}")
    return table[:, 1:]
