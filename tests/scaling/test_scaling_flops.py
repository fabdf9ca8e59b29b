"""FLOP accounting and parameter counts of scaling_runs, against hand-computed cases."""

from __future__ import annotations

import pytest

from scaling_runs.config import ModelConfig
from scaling_runs.flops import (
    PFLOPS_DAY,
    attention_flops_per_sequence,
    attention_keys,
    flops_per_token,
    pflops_days,
    training_flops,
)
from scaling_runs.model import GPT, analytic_param_counts, param_counts


def test_attention_keys_full_causal():
    # query t reads t + 1 keys: 1 + 2 + ... + 8
    assert attention_keys(8, "full", 2, 2) == (36, 0)


def test_attention_keys_moba_by_hand():
    # S=8, block 2, top-2 (own + 1 past): c = 0 0 1 1 2 2 3 3
    # own-block keys 1 2 1 2 1 2 1 2 = 12; past blocks min(1, c) * 2 = 0 0 2 2 2 2 2 2 = 12
    # gate candidates c: 0+0+1+1+2+2+3+3 = 12
    assert attention_keys(8, "moba", 2, 2) == (24, 12)
    # top-3 with a shorter tail: S=5, block 2: c = 0 0 1 1 2; own 1 2 1 2 1 = 7;
    # past min(2, c) * 2 = 0 0 2 2 4 = 8; candidates 0+0+1+1+2 = 4
    assert attention_keys(5, "moba", 2, 3) == (15, 4)


def test_moba_with_enough_blocks_reads_like_full():
    assert attention_keys(64, "moba", 8, 8)[0] == attention_keys(64, "full", 8, 8)[0]
    assert attention_keys(64, "moba", 8, 100)[0] == 64 * 65 // 2


def test_attention_flops_per_sequence_by_hand():
    cfg = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, context=8, block_size=2, top_k=2,
                      attention="moba")
    # per layer: 12 * n_head * head_dim * keys = 12 * 2 * 8 * 24 = 4608
    # gate: 2 * n_head * hd * candidates + n_kv * hd * S = 2*2*8*12 + 1*8*8 = 448
    assert attention_flops_per_sequence(cfg) == {"attention": 2 * 4608, "gate": 2 * 448}
    hybrid = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, context=8, block_size=2, top_k=2,
                         attention="hybrid", n_full_layers=1)
    # layer 0 MoBA (24 keys), layer 1 full (36 keys)
    assert attention_flops_per_sequence(hybrid) == {"attention": 12 * 16 * 24 + 12 * 16 * 36, "gate": 448}
    full = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, context=8, attention="full")
    assert attention_flops_per_sequence(full) == {"attention": 2 * 12 * 16 * 36, "gate": 0}


def test_training_flops_and_pflops_days():
    cfg = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, context=8, block_size=2, top_k=2)
    per_tok = flops_per_token(cfg, n_non_embedding=1000)
    assert per_tok["dense"] == 6000
    assert per_tok["attention"] == pytest.approx(2 * 4608 / 8)
    assert per_tok["gate"] == pytest.approx(2 * 448 / 8)
    f = training_flops(cfg, 1000, tokens=80)
    assert f["flops"] == 6 * 1000 * 80
    assert f["attn_aware_flops"] == pytest.approx(6 * 1000 * 80 + 10 * (2 * 4608 + 2 * 448))
    assert pflops_days(8.64e19) == 1.0 and PFLOPS_DAY == 8.64e19


@pytest.mark.parametrize("tie", [True, False])
def test_param_counts_match_model_and_hand_count(tie):
    cfg = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, vocab_size=256, tie_embeddings=tie)
    model = GPT(cfg)
    counts = param_counts(model)
    assert counts == analytic_param_counts(cfg)
    # per layer: q 16x16, o 16x16, k 16x8, v 16x8 = 768; MLP 2 * 16 * 64 = 2048; 2 norms 32
    assert counts["non_embedding"] == 2 * (768 + 2048 + 32) + 16
    assert counts["embedding"] == 256 * 16 * (1 if tie else 2)
