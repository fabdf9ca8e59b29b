"""The MoBA op: public API, gate, reference, and the backends that compute it.

* ``api``: ``moba_attn_func`` / ``moba_attn_varlen_func`` (argument checks, backend choice).
* ``gate``: block means and top-k block selection (the semantics every backend follows).
* ``naive``: the dense-mask reference (``backend="reference"``), obviously right, O(S^2).
* ``torch_impl``: the PyTorch path (``backend="torch"``), any device, autograd.
* ``triton_impl``: glue to the fused kernels in ``moba.triton_kernels`` (``backend="triton"``).
* ``registry``: the one backend registry and ``resolve_backend`` (no import cycle: it imports
  the implementations, they do not import it).
* ``full``: dense attention (SDPA / flash-attn) for full layers and fallbacks.
* ``flex``: a FlexAttention ``BlockMask`` with MoBA's sparsity.
"""

from .api import moba_attn_func, moba_attn_varlen, moba_attn_varlen_func, moba_attn_varlen_naive
from .flex import flex_block_mask
from .full import (
    full_attn_func,
    full_attn_implementation,
    full_attn_varlen_func,
    full_attn_with_kvcache,
    last_full_attn_implementation,
)
from .gate import select_blocks, select_blocks_varlen
from .registry import available_backends, resolve_backend

__all__ = [
    "available_backends",
    "flex_block_mask",
    "full_attn_func",
    "full_attn_implementation",
    "full_attn_varlen_func",
    "full_attn_with_kvcache",
    "last_full_attn_implementation",
    "moba_attn_func",
    "moba_attn_varlen",
    "moba_attn_varlen_func",
    "moba_attn_varlen_naive",
    "resolve_backend",
    "select_blocks",
    "select_blocks_varlen",
]
