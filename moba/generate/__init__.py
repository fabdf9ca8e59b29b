"""Generation with a KV cache: plain, speculative (model / n-gram / staged drafts) and tree.

* ``loop``: sampling, drafts, ``generate_plain`` / ``generate_speculative`` /
  ``generate_tree_speculative`` (its ``__all__`` is this package's, plus ``GPTAdapter``).
* ``adapters``: ``GPTAdapter``, the model interface ``loop`` expects, around a small GPT.
"""

from . import loop
from .adapters import GPTAdapter
from .loop import *  # noqa: F403  (the names in loop.__all__)

__all__ = ["GPTAdapter", *loop.__all__]
