"""``torch.nn`` modules built on the op, and the hybrid rule "which layers run full attention".

* ``modules``: ``MoBAAttention``, ``MoBASelfAttention``, ``RotaryEmbedding``,
  ``set_attention_mode``, ``set_context_parallel`` and ``HybridSchedule``.
* ``hybrid``: ``full_layers`` / ``layer_modes``, the one rule every caller uses (the modules
  here, the transformers integration, ``scaling_runs``' model config and budget evaluation).
"""

from .hybrid import full_layers, layer_modes
from .modules import (
    MODES,
    HybridSchedule,
    MoBAAttention,
    MoBASelfAttention,
    RotaryEmbedding,
    attention_modules,
    set_attention_mode,
    set_context_parallel,
)

__all__ = [
    "MODES",
    "HybridSchedule",
    "MoBAAttention",
    "MoBASelfAttention",
    "RotaryEmbedding",
    "attention_modules",
    "full_layers",
    "layer_modes",
    "set_attention_mode",
    "set_context_parallel",
]
