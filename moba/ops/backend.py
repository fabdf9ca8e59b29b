"""``Backend``: what a MoBA backend provides (the registry, ``moba.ops.registry``, holds them).

This module imports no backend, so the backends import it and the registry imports them:
no cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    #: (q, k, v, layout, block_indices, causal, scale) -> output (Tq, Hq, D)
    attention: Callable[..., torch.Tensor]
    #: (q, k, layout, top_k, causal) -> block indices (Tq, Hq, n_slots)
    select: Callable[..., torch.Tensor]
    #: device -> None when usable there, else the reason it is not
    unavailable_reason: Callable[[torch.device], str | None]
    #: q -> None when the backend handles this dtype / head dim, else why not ("auto" skips it)
    unsupported_input: Callable[[torch.Tensor], str | None] = lambda q: None
    #: like ``attention`` but -> (output, lse (Tq, Hq) float32/float64); None: no lse
    attention_lse: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    #: device -> None when gradients are bitwise reproducible there, else why not
    nondeterministic_reason: Callable[[torch.device], str | None] = lambda device: None
    #: optional gate + attention in one call, (q, k, v, cu_q, cu_k, block_size, top_k, causal,
    #: scale) -> output, with host lists of boundaries and no BlockLayout built by the caller
    #: (so torch.compile can trace it with dynamic lengths); used when no block_indices are given
    gated_attention: Callable[..., torch.Tensor] | None = None
