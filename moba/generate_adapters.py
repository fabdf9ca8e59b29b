"""Adapters letting ``moba.generate`` drive models that are not ``transformers`` causal LMs.

``moba.generate.CachedModel`` calls ``model(input_ids=, past_key_values=, use_cache=True,
logits_to_keep=)`` and reads ``.logits`` / ``.past_key_values``; it rolls back with
``cache.crop(-n)`` and builds a fresh cache with ``DynamicCache(config=model.config)``.

``GPTAdapter`` wraps a ``scaling_runs.model.GPT`` (``forward(idx) -> logits``, no KV cache)
that way. Its "cache" (``TokenCache``) holds the token ids seen so far, and every forward
re-runs the GPT over the whole context (the last ``cfg.context`` tokens): outputs are exact
(greedy speculative == plain), but a step costs a full-context forward, so tokens/s and
``roofline_point`` (which counts only the new tokens fed) do not describe a real KV-cached
decoder. A real KV cache needs ``scaling_runs/model.py``'s attention to accept past keys /
values (see the report / README).

    from moba.generate import generate_speculative
    from moba.generate_adapters import load_gpt
    target, draft = load_gpt("scaling_runs/runs/big"), load_gpt("scaling_runs/runs/small")
    out, stats = generate_speculative(target, draft, ids, 64, gamma=4)
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

__all__ = ["GPTAdapter", "TokenCache", "load_gpt"]


class TokenCache:
    """The token ids a ``GPTAdapter`` has seen, with ``DynamicCache``'s ``crop``."""

    def __init__(self):
        self.ids: torch.Tensor | None = None  # (1, L)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.ids is None else self.ids.shape[1]

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value removes that many from the end."""
        n = self.get_seq_length()
        keep = n + max_length if max_length < 0 else min(max_length, n)
        if self.ids is not None:
            self.ids = self.ids[:, : max(keep, 0)]


class GPTAdapter(torch.nn.Module):
    """A ``scaling_runs.model.GPT`` callable as ``moba.generate`` expects (see module doc)."""

    config = None  # DynamicCache(config=None) works; ours replaces it on the first call

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.context = int(getattr(getattr(gpt, "cfg", None), "context", 0) or 0)

    def get_input_embeddings(self):
        return self.gpt.wte

    def get_output_embeddings(self):
        return self.gpt.lm_head

    @torch.no_grad()
    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep: int = 0, **_):
        cache = past_key_values if isinstance(past_key_values, TokenCache) else TokenCache()
        ids = input_ids if cache.ids is None else torch.cat([cache.ids, input_ids.to(cache.ids.device)], dim=1)
        cache.ids = ids
        ctx = ids[:, -self.context:] if self.context else ids
        logits = self.gpt(ctx)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, past_key_values=cache if use_cache else None)


def load_gpt(path, device="cpu") -> GPTAdapter:
    """A scaling_runs checkpoint (run dir or ``ckpt.pt``) as a ``GPTAdapter`` in eval mode."""
    from scaling_runs.eval_budget import load_model

    model, _, _ = load_model(path, device)
    return GPTAdapter(model).eval()
