"""A small GPT (nanoGPT-like) whose attention layers are ``moba.nn.MoBASelfAttention``.

    tokens -> embedding -> n_layer x [x + Attn(Norm(x)); x + MLP(Norm(x))] -> Norm -> LM head

* attention: ``MoBASelfAttention`` (q/k/v/o projections without bias, rotary embeddings on
  q and k, GQA with ``n_kv_head`` KV heads); every layer's core is "moba" or "full"
  according to ``ModelConfig.layer_modes()`` ("hybrid" = MoBA with the last
  ``n_full_layers`` layers full, set through ``moba.nn.set_attention_mode``);
* no learned position embedding (rotary only), pre-norm (RMSNorm by default, LayerNorm
  optional), MLP ``Linear(d, 4d) -> GELU -> Linear(4d, d)`` without bias;
* KV-cache decoding: ``forward(idx, cache=moba.KVCache())`` prefills the cache, later calls
  feed only the new tokens; MoBA layers then read only their selected blocks (``moba_decode``);
* ``block_selection="random"`` (a control arm of the cpu-study preset): MoBA layers attend
  to their own block plus ``top_k - 1`` past blocks drawn uniformly at random per query and
  head (``random_block_indices``), at MoBA's budget, through ``moba.moba_attn_func(...,
  block_indices=...)``; the gate is not run;
* LM head tied to the token embedding by default (``tie_embeddings``); untied is an option.
  Parameter counts (``param_counts``): "embedding" is the token embedding plus an untied LM
  head; "non_embedding" is everything else (the N of C = 6 N D, as in Kaplan et al.).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moba import PAD_INDEX, moba_attn_func
from moba.decode import KVCache, LayerKVCache
from moba.nn import MoBAAttention, MoBASelfAttention, set_attention_mode

from .config import ModelConfig


def _norm(cfg: ModelConfig) -> nn.Module:
    return nn.RMSNorm(cfg.n_embd) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.d_ff, bias=False)
        self.proj = nn.Linear(cfg.d_ff, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def random_block_indices(batch: int, seqlen: int, n_heads: int, block_size: int, top_k: int,
                         device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random causal block selection at MoBA's budget, in ``moba.select_blocks``' layout.

    Every query (and head) gets its own block plus ``min(top_k - 1, c)`` distinct blocks drawn
    uniformly from its ``c`` complete past blocks (``c = t // block_size``), never a future one.
    Returns (batch, seqlen, n_heads, min(top_k, n_blocks)) int64 local block indices, ascending,
    unused slots ``PAD_INDEX`` at the end. Draws from ``generator`` (default: torch's global RNG,
    which the trainer's checkpoints save, so a resumed run draws the same blocks).
    """
    n_blocks = -(-seqlen // block_size)
    width = min(top_k, n_blocks)
    own = (torch.arange(seqlen, device=device) // block_size)[:, None, None]  # (S, 1, 1)
    blocks = torch.arange(n_blocks, device=device)
    scores = torch.rand(batch, seqlen, n_heads, n_blocks, device=device, generator=generator)
    # own block first (2 > any draw), past blocks by their draw in [0, 1), future blocks never (-1)
    scores = torch.where(blocks == own, 2.0, torch.where(blocks < own, scores, -1.0))
    top, idx = scores.topk(width, dim=-1)
    idx = torch.where(top >= 0, idx, n_blocks)  # a slot without a past block left: padding
    idx = idx.sort(dim=-1).values
    return torch.where(idx == n_blocks, PAD_INDEX, idx)


class RandomBlockAttention(MoBAAttention):
    """``MoBAAttention`` whose MoBA mode attends to random blocks (``random_block_indices``)
    instead of the gate's; full mode is unchanged. (B, S, Hq, D) inputs only: no cache, no
    packed sequences (training and evaluation of the control arm need neither)."""

    def forward(self, q, k, v, cu_seqlens=None, max_seqlen=None, cache=None, tree=None):
        if self.mode == "full":
            return super().forward(q, k, v, cu_seqlens, max_seqlen, cache, tree)
        if cu_seqlens is not None or cache is not None or tree is not None:
            raise ValueError("random block selection takes (B, S, H, D) inputs only (no cu_seqlens, cache or tree)")
        idx = random_block_indices(q.shape[0], q.shape[1], q.shape[2], self.block_size, self.top_k, q.device)
        return moba_attn_func(q, k, v, self.block_size, self.top_k, self.causal, self.softmax_scale, self.backend,
                              block_indices=idx, deterministic=self.deterministic)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = MoBASelfAttention(
            cfg.n_embd,
            cfg.n_head,
            cfg.n_kv_head,
            block_size=cfg.block_size,
            top_k=cfg.top_k,
            causal=True,
            mode="moba",
            backend=cfg.backend,
            rotary=True,
            rope_theta=cfg.rope_theta,
        )
        if cfg.block_selection == "random":
            a = self.attn.attn
            self.attn.attn = RandomBlockAttention(a.block_size, a.top_k, a.causal, a.mode, a.backend,
                                                  a.softmax_scale, deterministic=a.deterministic)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cache: LayerKVCache | None = None, tree: list[int] | None = None):
        x = x + self.attn(self.norm1(x), cache=cache, tree=tree)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        # GPT-2 style: residual output projections scaled down with depth.
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.apply_attention_kind()

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def apply_attention_kind(self) -> None:
        """Set every layer's attention core to the mode ``cfg.layer_modes()`` asks for."""
        modes = self.cfg.layer_modes()
        for mode in ("moba", "full"):
            layers = [i for i, m in enumerate(modes) if m == mode]
            if layers:
                set_attention_mode(self, mode, layers)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                cache: KVCache | None = None, logits_to_keep: int = 0, tree: list[int] | None = None):
        """idx (B, S) int64 -> logits (B, S, V); with targets: the loss (mean, or (B, S) for "none").

        cache: a ``moba.KVCache`` for decoding; ``idx`` then holds the tokens after the cached
        ones. logits_to_keep > 0: only the last that many positions go through the LM head.
        tree: with a cache and batch 1, the parents of the last ``len(tree)`` tokens, a draft tree
        verified in this forward (``moba.tree``; its keys and values are not cached).
        """
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a moba.KVCache, got {type(cache).__name__}")
        if targets is not None and logits_to_keep:
            raise ValueError("logits_to_keep cannot be combined with targets (the loss needs every position)")
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layer(i), tree)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss


def param_counts(model: GPT) -> dict[str, int]:
    """{"total", "embedding", "non_embedding"} (a tied LM head is counted once, as embedding)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embedding = model.wte.weight.numel()
    if not model.cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def analytic_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the config alone (same numbers as ``param_counts`` of the model)."""
    d, hd = cfg.n_embd, cfg.head_dim
    attn = d * cfg.n_head * hd * 2 + d * cfg.n_kv_head * hd * 2  # q, o and k, v
    mlp = 2 * d * cfg.d_ff
    norms = 2 * d  # RMSNorm / LayerNorm without bias: one weight vector each
    non_emb = cfg.n_layer * (attn + mlp + norms) + d  # + final norm
    emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return {"total": non_emb + emb, "embedding": emb, "non_embedding": non_emb}
