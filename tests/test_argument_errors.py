"""Every public entry point names the bad argument and the expected value (TypeError /
ValueError), never a crash deep inside: generate functions, the op's argument forms, the
config, the modules and register_moba."""

from __future__ import annotations

import pytest
import torch

import moba
from moba.generate import (
    GPTAdapter,
    NGramDraft,
    Sampling,
    StagedDraft,
    TreeDraft,
    generate_plain,
    generate_speculative,
    generate_tree_speculative,
)


@pytest.fixture(scope="module")
def gpt():
    from scaling_runs.config import ModelConfig
    from scaling_runs.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, context=32, vocab_size=64, block_size=8, top_k=2)
    return GPTAdapter(GPT(cfg)).eval()


IDS = torch.tensor([[1, 2, 3, 4]])
BAD_COUNTS = [(2.5, TypeError), (None, TypeError), ("8", TypeError), (float("inf"), TypeError), (-1, ValueError)]


@pytest.mark.parametrize("value, error", BAD_COUNTS)
def test_max_new_tokens_is_named(gpt, value, error):
    for call in (lambda: generate_plain(gpt, IDS, value),
                 lambda: generate_speculative(gpt, gpt, IDS, value),
                 lambda: generate_tree_speculative(gpt, gpt, IDS, value)):
        with pytest.raises(error, match="max_new_tokens"):
            call()


@pytest.mark.parametrize("value, error", BAD_COUNTS)
def test_gamma_is_named(gpt, value, error):
    with pytest.raises(error, match="gamma"):
        generate_speculative(gpt, gpt, IDS, 4, gamma=value)
    with pytest.raises(error if value != -1 else ValueError, match="gamma_inner"):
        StagedDraft(gpt, NGramDraft([[1, 2, 3]]), gamma_inner=value if value != -1 else 0)


@pytest.mark.parametrize("kw, error, name", [
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(do_sample="yes"), TypeError, "do_sample"),
])
def test_sampling_settings_are_named(gpt, kw, error, name):
    with pytest.raises(error, match=name):
        Sampling(**kw)
    with pytest.raises(error, match=name):
        generate_plain(gpt, IDS, 2, **kw)


@pytest.mark.parametrize("token", [64, 10**6, -1])
def test_out_of_vocabulary_ids_are_refused(gpt, token):
    ids = torch.tensor([[1, token, 3]])
    for call in (lambda: generate_plain(gpt, ids, 2), lambda: generate_speculative(gpt, gpt, ids, 2),
                 lambda: generate_tree_speculative(gpt, gpt, ids, 2)):
        with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, 64\)"):
            call()


def test_branching_beyond_the_vocabulary(gpt):
    with pytest.raises(ValueError, match=r"branching must be <= .*\(64\), got 1000000"):
        generate_tree_speculative(gpt, gpt, IDS, 4, branching=10**6)
    with pytest.raises(ValueError, match="branching"):
        TreeDraft(gpt, branching=10**6)


def test_cu_seqlens_k_as_a_list_is_named():
    q = k = v = torch.randn(12, 2, 8)
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        moba.moba_attn_varlen_func(q, k, v, cu, [0, 6, 12], 6, 6, 4, 2)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_return_lse_must_be_a_bool(value):
    q = k = v = torch.randn(1, 8, 2, 8)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        moba.moba_attn_func(q, k, v, 4, 2, return_lse=value)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        moba.moba_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 8], dtype=torch.int32), 8, 4, 2,
                                   return_lse=value)


def test_config_json_edge_cases():
    deep = "[" * 100000 + "]" * 100000
    with pytest.raises(ValueError, match="nested too deeply"):
        moba.MoBAConfig.from_json(deep)
    with pytest.raises(ValueError, match="JSON object"):
        moba.MoBAConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="not valid JSON"):
        moba.MoBAConfig.from_json("{")
    cfg = moba.MoBAConfig(block_size=10**5000, top_k=3)  # any integer: one block per sequence
    assert moba.MoBAConfig.from_json(cfg.to_json()) == cfg
    assert cfg.block_size == 2**63 - 1
    with pytest.raises(TypeError, match=r"block_size must be an int >= 1, got float"):
        moba.MoBAConfig(block_size=2.5)


def test_self_attention_module_errors_name_the_argument():
    from moba.nn import MoBASelfAttention

    layer = MoBASelfAttention(32, 4, block_size=4, top_k=2)
    with pytest.raises(ValueError, match="hidden_size = 32, got shape \\(1, 8, 48\\)"):
        layer(torch.randn(1, 8, 48))
    with pytest.raises(TypeError, match="cache must be a moba.LayerKVCache or None, got str"):
        layer(torch.randn(1, 8, 32), cache="abc")


def test_register_moba_full_attention_layers_must_be_a_sequence():
    pytest.importorskip("transformers")
    from moba.integrations.transformers import register_moba

    with pytest.raises(TypeError, match="full_attention_layers must be a sequence of layer indices"):
        register_moba(block_size=4, top_k=2, full_attention_layers=5, name="moba_args_test")
