"""Context parallelism for the training loop: ``--context_parallel N`` (a dp x cp DeviceMesh).

The world of ``W`` ranks becomes a 2-D ``DeviceMesh`` with dims ("dp", "cp") of sizes
``(W / N, N)``. The training loop is unchanged: every rank still draws its own
``batch_size / W`` sequences. ``ContextParallelLM`` wraps the GPT so that the ``N`` ranks of a
cp group work on their sequences *together*: the group all-gathers its token ids (``N x B``
sequences), every rank runs the model on its shard of all of them (chunks ``r`` and
``2N - 1 - r``, ``moba.distributed``; attention through ``moba_attn_func_cp`` with the cp
group, rotary on the true positions), and

* ``reduction="mean"``: returns the mean loss over the rank's shard tokens. All shards hold
  equally many tokens, so DDP's average over the ``W`` ranks is the mean over the global
  batch, as with one process;
* ``reduction="none"``: returns the per-position loss of the rank's *own* ``B`` sequences
  (gathered over the cp group), as the unsharded model does (the evaluation path).

Parameters stay replicated on every rank (DDP over the whole world averages the gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def build_mesh(world: int, cp: int, device: torch.device):
    """(mesh, cp_group): a ("dp", "cp") DeviceMesh of shape (world / cp, cp)."""
    from torch.distributed.device_mesh import init_device_mesh

    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"context_parallel must be an int >= 1, got {cp!r}")
    if world % cp:
        raise ValueError(f"context_parallel ({cp}) must divide the number of processes ({world})")
    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    return mesh, mesh.get_group("cp")


class ContextParallelLM(nn.Module):
    """Runs ``model(idx, targets, reduction)`` with every sequence sharded over ``cp_group``."""

    def __init__(self, model: nn.Module, cp_group, method: str = "auto"):
        super().__init__()
        self.model, self.cp_group, self.method = model, cp_group, method

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        from moba.distributed import gather_sequence, shard_sequence
        from moba.nn import set_context_parallel

        group = self.cp_group
        if targets is None:
            raise ValueError("ContextParallelLM needs targets (it returns losses)")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        both = torch.stack([idx, targets])  # (2, B, S): every rank of the group has the same B
        parts = [torch.empty_like(both) for _ in range(size)]
        dist.all_gather(parts, both.contiguous(), group=group)
        both = torch.cat(parts, dim=1)  # (2, size * B, S): the group's sequences, rank order
        x, y = (shard_sequence(t, group, dim=1) for t in both)
        set_context_parallel(self.model, group, self.method)
        try:
            loss = self.model(x, y, reduction="none")  # (size * B, S / size)
        finally:
            set_context_parallel(self.model, None)
        if reduction == "mean":
            return loss.mean()
        full = gather_sequence(loss, group, dim=1)  # (size * B, S)
        b = idx.shape[0]
        return full[rank * b:(rank + 1) * b]


def wrap(model: nn.Module, cp: int, world: int, device: torch.device, context: int) -> nn.Module:
    """The model wrapped for ``cp``-way context parallelism (``cp == 1``: the model itself)."""
    if cp == 1:
        return model
    if context % (2 * cp):
        raise ValueError(f"context ({context}) must be a multiple of 2 * context_parallel = {2 * cp}")
    _, group = build_mesh(world, cp, device)
    return ContextParallelLM(model, group)
