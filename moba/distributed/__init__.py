"""Context parallelism for MoBA on torch.distributed: one sequence sharded over several ranks.

* ``shard_sequence`` / ``gather_sequence``: the load-balanced layout (rank ``r`` holds chunks
  ``r`` and ``2P - 1 - r`` of ``2P``) and its inverse (``moba.distributed.layout``).
* ``moba_attn_func_cp``: MoBA on the sharded sequence, equal to ``moba_attn_func`` on the whole
  one; methods "ulysses", "sparse", "auto" (``moba.distributed.attention``); ``CommStats``
  counts the bytes each rank moves; ``moba.distributed.cost`` is the communication model.
* ``run_local``: run a function on N local gloo processes (CPU), e.g. to try it out.

Works with any process group (gloo on CPU, NCCL on GPUs), including one dimension of a
``torch.distributed.device_mesh.DeviceMesh`` (``mesh.get_group("cp")``). See
docs/context_parallel.md.
"""

from .attention import METHODS, moba_attn_func_cp
from .comm import CommStats
from .layout import gather_sequence, shard_positions, shard_sequence
from .local import run_local

__all__ = ["METHODS", "CommStats", "gather_sequence", "moba_attn_func_cp", "run_local", "shard_positions", "shard_sequence"]
