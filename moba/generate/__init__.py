"""Generation with a KV cache: plain, speculative (model / n-gram / staged drafts) and tree.

* ``loop``: sampling, drafts, ``generate_plain`` / ``generate_speculative`` /
  ``generate_tree_speculative``.
* ``adapters``: ``GPTAdapter``, the model interface ``loop`` expects, around a small GPT.
"""

from .adapters import GPTAdapter
from .loop import (
    CachedModel,
    GenerationStats,
    ModelDraft,
    NGramDraft,
    Sampling,
    StagedDraft,
    TreeDraft,
    TreeTarget,
    generate_plain,
    generate_speculative,
    generate_tree_speculative,
    speculative_accept,
    speculative_step,
    verify,
)

__all__ = [
    "CachedModel",
    "GPTAdapter",
    "GenerationStats",
    "ModelDraft",
    "NGramDraft",
    "Sampling",
    "StagedDraft",
    "TreeDraft",
    "TreeTarget",
    "generate_plain",
    "generate_speculative",
    "generate_tree_speculative",
    "speculative_accept",
    "speculative_step",
    "verify",
]
