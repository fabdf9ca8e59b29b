"""Compute accounting for the scaling runs.

Two counts are recorded for every evaluation:

1. ``flops`` (the paper's convention, Kaplan et al. 2020): ``C = 6 * N * D``, with ``N`` the
   non-embedding parameters (``model.param_counts``) and ``D`` the training tokens. It
   ignores attention, so MoBA and full attention of the same size get the same C; this is
   the x axis of the MoBA paper's scaling-law figures and of our fits by default.

2. ``attn_aware_flops``: ``6 * N * D`` plus the attention that is actually computed,
   crediting MoBA only for the keys it reads. Per training sequence of length S and layer:
     * attention matmuls, per query at position t that reads ``keys(t)`` keys and per query
       head: ``QK^T`` 2*hd FLOPs and ``PV`` 2*hd FLOPs per key, so the forward costs
       ``4 * n_head * hd * keys(t)``; forward + backward = 3x forward:
       ``12 * n_head * hd * sum_t keys(t)``;
     * full causal attention reads ``keys(t) = t + 1`` (so ``sum_t keys(t) = S (S + 1) / 2``);
     * MoBA reads its own block causally plus ``min(top_k - 1, c)`` complete past blocks,
       with ``c = t // block_size``: ``keys(t) = (t - c * block_size + 1)
       + min(top_k - 1, c) * block_size``;
     * MoBA gating (forward only, the selection has no gradient): block means, one add per
       key element ``n_kv_head * hd * S``, and gate scores ``2 * n_head * hd`` per candidate
       block (the ``c`` complete past blocks) per query: ``2 * n_head * hd * sum_t c(t)``.
   Tokens are counted in whole sequences (``D / S`` sequences). Evaluation is not counted.

PFLOP/s-days: ``FLOPs / 8.64e19`` (1e15 FLOP/s for 86400 s).
"""

from __future__ import annotations

from moba._core.accounting import dense_pairs, gate_candidates, moba_pairs

from .config import ModelConfig

PFLOPS_DAY = 8.64e19


def pflops_days(flops: float) -> float:
    return flops / PFLOPS_DAY


def attention_keys(seqlen: int, mode: str, block_size: int, top_k: int) -> tuple[int, int]:
    """(sum over queries of keys read, sum over queries of gate candidates) for one sequence
    (counted by ``moba._core.accounting``, the count bench/ uses too)."""
    if mode == "full":
        return dense_pairs(seqlen), 0
    if mode != "moba":
        raise ValueError(f"mode must be 'moba' or 'full', got {mode!r}")
    return moba_pairs(seqlen, block_size, top_k), gate_candidates(seqlen, block_size)


def attention_flops_per_sequence(cfg: ModelConfig, seqlen: int | None = None) -> dict[str, float]:
    """Training FLOPs of attention (matmuls, fwd+bwd) and of MoBA gating (fwd) per sequence."""
    s = seqlen or cfg.context
    hd = cfg.head_dim
    matmul = gate = 0.0
    cache: dict[str, tuple[int, int]] = {}
    for mode in cfg.layer_modes():
        if mode not in cache:
            cache[mode] = attention_keys(s, mode, cfg.block_size, cfg.top_k)
        keys, cands = cache[mode]
        matmul += 12 * cfg.n_head * hd * keys
        if mode == "moba" and getattr(cfg, "block_selection", "gate") == "gate":  # random blocks: no gate
            gate += 2 * cfg.n_head * hd * cands + cfg.n_kv_head * hd * s
    return {"attention": matmul, "gate": gate}


def flops_per_token(cfg: ModelConfig, n_non_embedding: int) -> dict[str, float]:
    """Training FLOPs per token: "dense" (6N), "attention", "gate", "attn_aware" (their sum)."""
    per_seq = attention_flops_per_sequence(cfg)
    attn = per_seq["attention"] / cfg.context
    gate = per_seq["gate"] / cfg.context
    dense = 6.0 * n_non_embedding
    return {"dense": dense, "attention": attn, "gate": gate, "attn_aware": dense + attn + gate}


def training_flops(cfg: ModelConfig, n_non_embedding: int, tokens: int) -> dict[str, float]:
    """{"flops": 6 N D, "attn_aware_flops": 6 N D + attention + gating} for ``tokens`` tokens."""
    per_tok = flops_per_token(cfg, n_non_embedding)
    return {"flops": per_tok["dense"] * tokens, "attn_aware_flops": per_tok["attn_aware"] * tokens}


def causal_sparsity(seqlen: int, mode: str, block_size: int, top_k: int) -> float:
    """Share of the causal (query, key) pairs, ``S (S + 1) / 2``, that ``mode`` does not read.

    Exact for one sequence of ``seqlen`` tokens (``attention_keys``): 0 for full attention;
    MoBA (and the random-block arm, same budget) at 512 / 32 / top-3 reads 38,144 of 131,328
    pairs: sparsity 0.7096 (the paper's 8K / 512 / top-3: 0.7109).
    """
    keys, _ = attention_keys(seqlen, mode, block_size, top_k)
    return 1.0 - keys / (seqlen * (seqlen + 1) / 2)
