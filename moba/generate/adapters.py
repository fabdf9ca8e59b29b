"""Adapters letting ``moba.generate`` drive models that are not ``transformers`` causal LMs.

``moba.generate.CachedModel`` calls ``model(input_ids=, cache=, use_cache=True,
logits_to_keep=)`` (``past_key_values=`` for transformers before 5.24), reads ``.logits`` and the returned cache, rolls back with
``cache.crop(-n)`` and asks ``model.new_cache()`` for an empty cache.

``GPTAdapter`` wraps a ``scaling_runs.model.GPT`` that way, with a ``moba.KVCache``: the
prompt is prefilled once, then every call feeds only the new tokens, and the MoBA layers
decode sparsely (``moba_decode`` reads ``top_k`` blocks of the cache per query; the block
means are kept incrementally and follow crops). Positions past the model's training
context (``cfg.context``) keep counting (rotary positions are not windowed).

    from moba.generate import generate_speculative
    from scaling_runs.checkpoint import load_gpt          # builds GPTAdapter(GPT from the checkpoint)
    target, draft = load_gpt("runs/cpu-tiny/s3-moba"), load_gpt("runs/cpu-tiny/s1-moba")
    out, stats = generate_speculative(target, draft, ids, 64, gamma=4)
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..decode.kv_cache import KVCache

__all__ = ["GPTAdapter"]


class GPTAdapter(torch.nn.Module):
    """A ``scaling_runs.model.GPT`` callable as ``moba.generate`` expects (see module doc)."""

    config = None

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def new_cache(self) -> KVCache:
        return KVCache()

    def get_input_embeddings(self):
        return self.gpt.wte

    def get_output_embeddings(self):
        return self.gpt.lm_head

    supports_tree = True  # ``forward(..., tree=parents)``: draft-tree verification (moba.decode.tree)

    @torch.no_grad()
    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep: int = 0,
                tree: list[int] | None = None, **_):
        """input_ids (B, n): the tokens after the cached ones -> ``.logits`` (B, n or logits_to_keep, V).

        tree: the parents of the last ``len(tree)`` tokens, a draft tree (batch 1; not cached)."""
        cache = cache if isinstance(cache, KVCache) else KVCache()
        logits = self.gpt(input_ids, cache=cache, logits_to_keep=logits_to_keep, tree=tree)
        return SimpleNamespace(logits=logits, cache=cache if use_cache else None)


def __getattr__(name):
    if name == "load_gpt":  # it loads scaling_runs checkpoints, so it lives there: moba never imports them
        raise ImportError("load_gpt moved to scaling_runs.checkpoint.load_gpt (run from the repository root)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
