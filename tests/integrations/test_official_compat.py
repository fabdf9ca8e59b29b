"""Code written for the official MoonshotAI/MoBA package runs on this one.

The official ``examples/llama.py`` does, in this order::

    from moba import register_moba, MoBAConfig
    register_moba(MoBAConfig(args.moba_chunk_size, args.moba_topk))
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, device_map="auto",
                                                 torch_dtype=torch.float16, attn_implementation=args.attn)
    tokens = model.generate(input_ids, max_length=32, do_sample=False)

with ``--attn`` one of "flash_attention_2", "moba", "moba_naive". These tests make the same
calls on a tiny Llama saved to a temporary folder (no hub download; ``device_map`` is left out
because it needs the ``accelerate`` package, and flash_attention_2 needs CUDA).
"""

import builtins

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=None, bos_token_id=None, initializer_range=0.3)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _example(path, attn: str, dtype=torch.float16, chunk_size=4, topk=2):
    """The official example's calls, verbatim except for the model path and device_map."""
    from moba import MoBAConfig, register_moba

    register_moba(MoBAConfig(chunk_size, topk))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, torch_dtype=dtype, attn_implementation=attn
    )
    input_ids = torch.tensor([[5, 9, 17, 3, 22, 41, 7, 13, 2, 30, 11, 19, 8]], device=model.device)
    return model, model.generate(input_ids, max_length=32, do_sample=False)


@pytest.mark.parametrize("attn", ["moba", "moba_naive"])
def test_official_example_runs(tiny_llama_dir, attn):
    model, tokens = _example(tiny_llama_dir, attn)
    assert tokens.shape == (1, 32)
    assert model.config._attn_implementation == attn


def test_moba_naive_is_the_reference_backend_with_the_same_settings(tiny_llama_dir):
    """float32: "moba" (torch/triton path) and "moba_naive" (dense-mask reference) generate the
    same tokens, and the registered settings are the config's."""
    from transformers import AttentionInterface

    _, fast = _example(tiny_llama_dir, "moba", dtype=torch.float32)
    _, naive = _example(tiny_llama_dir, "moba_naive", dtype=torch.float32)
    assert torch.equal(fast, naive)
    settings = {name: AttentionInterface._global_mapping[name].moba_settings for name in ("moba", "moba_naive")}
    assert (settings["moba"].block_size, settings["moba"].top_k) == (4, 2)
    assert (settings["moba_naive"].block_size, settings["moba_naive"].top_k) == (4, 2)
    assert settings["moba_naive"].backend == "reference"


@pytest.mark.parametrize("name", ["sdpa", "eager", "flash_attention_2", "flex_attention", "paged|sdpa"])
def test_register_refuses_transformers_builtin_names(name):
    """Registering over "sdpa" would make every model in the process that asks for SDPA run MoBA."""
    from transformers import AttentionInterface

    from moba.integrations.transformers import register_moba

    before = AttentionInterface._global_mapping.get(name)
    with pytest.raises(ValueError, match="name"):
        register_moba(64, 3, name=name)
    assert AttentionInterface._global_mapping.get(name) is before
    register_moba(64, 3, name="moba_compat_test")  # a new name, and registering it again, are fine
    register_moba(64, 2, name="moba_compat_test")


def test_register_without_transformers_names_the_extra(monkeypatch):
    from moba.integrations.transformers import register_moba

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match=r"pip install 'moba-attn\[hf\]'"):
        register_moba(64, 3)
