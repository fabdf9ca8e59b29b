"""transformers integration: attn_implementation="moba" on tiny random Llama / Qwen2 / Qwen3 / Mistral.

Runs on every transformers release in ``TESTED_TRANSFORMERS_VERSIONS`` (``make test`` pins the newest,
``make test-oldest`` / ``make test-latest`` run the ends of the range).
"""

import copy
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moba  # noqa: E402
import moba.decode  # noqa: E402
import moba.integrations.transformers as mt  # noqa: E402
import moba.ops.full as full  # noqa: E402
from moba.decode import BlockMeanState  # noqa: E402

BS, TOP_K = 4, 2
VOCAB = 64
# the model's cache keyword: ``cache`` from transformers 5.24, ``past_key_values`` before
CACHE_KW = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    mt.register_moba(BS, TOP_K, name="moba_t")
    mt.register_moba(BS, TOP_K, name="moba_t_ref", backend="reference")
    mt.register_moba(BS, 1000, name="moba_t_dense")
    mt.register_moba(BS, TOP_K, full_attention_layers=(-1,), name="moba_t_hybrid")
    mt.register_moba(BS, TOP_K, full_attention_layers=(0, 1), name="moba_t_allfull")


def _config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, eos_token_id=None, bos_token_id=None, initializer_range=0.3)
    common.update(overrides)
    if arch == "qwen3":
        common.setdefault("head_dim", 8)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[arch]
    return cls(**common)


def _models(arch, *impls, **overrides):
    """Models with the same random weights, one per attention implementation."""
    torch.manual_seed(0)
    cfg = _config(arch, **overrides)
    base = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    out = []
    for impl in impls:  # a config per model: from_config records the implementation on the config
        m = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
        m.load_state_dict(base.state_dict())
        out.append(m)
    return base, out


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_logits_dense_and_reference(arch):
    sdpa, (dense, sparse, ref) = _models(arch, "moba_t_dense", "moba_t", "moba_t_ref")
    ids = torch.randint(1, VOCAB, (2, 23))
    expected = _logits(sdpa, ids)
    torch.testing.assert_close(_logits(dense, ids), expected, rtol=1e-4, atol=1e-5)  # top_k >= n_blocks
    got = _logits(sparse, ids)
    torch.testing.assert_close(got, _logits(ref, ids), rtol=1e-4, atol=1e-5)  # small top_k == MoBA reference
    assert not torch.allclose(got, expected, atol=1e-3)  # and it is really sparse


def _check_generate_equals_prefill(model, prompt, new_tokens, attention_mask=None, tol=1e-5):
    out = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    mask = None if attention_mask is None else torch.cat(
        [attention_mask, attention_mask.new_ones(seq.shape[0], seq.shape[1] - prompt.shape[1])], dim=1)
    # positions as generate() computes them (they matter when the padding leaves holes)
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    full_logits = _logits(model, seq, attention_mask=mask, position_ids=positions)
    for i, step in enumerate(out.logits):
        torch.testing.assert_close(step, full_logits[:, prompt.shape[1] - 1 + i], rtol=10 * tol, atol=tol)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_decode_equals_prefill_and_is_incremental(arch, monkeypatch):
    _, (model,) = _models(arch, "moba_t")
    folded = []
    fold = BlockMeanState._fold
    monkeypatch.setattr(BlockMeanState, "_fold",
                        lambda self, k, st, rows, b, e: (folded.append(sum(y - x for x, y in zip(b, e, strict=True))),
                                                         fold(self, k, st, rows, b, e))[1])
    prompt = torch.randint(1, VOCAB, (2, 6))
    for _ in range(2):  # the first generate() installs the cache hooks; the second uses them from the prefill
        folded.clear()
        out = _check_generate_equals_prefill(model, prompt, 18)  # 6 + 18 tokens: 6 blocks of 4
    # incremental: the prompt once (2 rows x 6 tokens, per layer), then 1 token per row per step;
    # (the last two: the check's plain forward over all 24 tokens also fills a fresh cache)
    assert folded == [12, 12] + [2] * (2 * 17) + [48, 48], folded
    cache = getattr(out, CACHE_KW)
    states = mt._STATES[cache]
    assert sorted(states) == [0, 1] and states[0].lengths == [cache.get_seq_length()] * 2


def test_generate_left_padded_batch_equals_single_runs():
    _, (model,) = _models("llama", "moba_t")
    torch.manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (1, n)) for n in (9, 5)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, 9 - p.shape[1]:] = p[0]
        mask[r, 9 - p.shape[1]:] = 1
    batched = _check_generate_equals_prefill(model, ids, 14, attention_mask=mask)
    for r, p in enumerate(prompts):
        single = model.generate(p, max_new_tokens=14, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        assert torch.equal(batched.sequences[r, 9:], single.sequences[0, p.shape[1]:])
        for a, b in zip(batched.logits, single.logits, strict=True):
            torch.testing.assert_close(a[r], b[0], rtol=1e-4, atol=1e-4)


def test_packed_sequences_from_position_ids_equal_separate_runs():
    _, (model,) = _models("qwen3", "moba_t")
    a, b = torch.randint(1, VOCAB, (1, 13)), torch.randint(1, VOCAB, (1, 10))
    pos = torch.cat([torch.arange(13), torch.arange(10)])[None]
    got = _logits(model, torch.cat([a, b], dim=1), position_ids=pos, use_cache=False)
    torch.testing.assert_close(got[:, :13], _logits(model, a), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[:, 13:], _logits(model, b), rtol=1e-4, atol=1e-5)


def test_decoding_with_holes_in_the_padding_mask():
    """A padding mask that is not a left prefix (e.g. right-padded prompts, then generation) takes
    the from-scratch path: each row equals decoding its real tokens alone."""
    torch.manual_seed(4)
    attention = mt.make_attention_function(mt.MoBASettings(moba.MoBAConfig(block_size=BS, top_k=TOP_K, backend="auto"), ()))
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 0, True
    b, hq, hkv, lk, d, lq = 2, 4, 2, 19, 8, 2
    q, k, v = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
    mask = torch.ones(b, lk, dtype=torch.bool)
    mask[0, 7:11] = False  # a hole: 4 padding tokens between the prompt and the generated tokens
    out, weights = attention(module, q, k, v, mask, scaling=0.4)
    assert weights is None and out.shape == (b, lq, hq, d)
    for r in range(b):
        kr, vr = k[r : r + 1, :, mask[r]].transpose(1, 2), v[r : r + 1, :, mask[r]].transpose(1, 2)
        expected = moba.decode.moba_decode(q[r : r + 1].transpose(1, 2), kr, vr, BlockMeanState(BS), BS, TOP_K, 0.4)
        torch.testing.assert_close(out[r : r + 1], expected, rtol=1e-5, atol=1e-6)


def test_prefill_with_a_hole_in_the_padding_mask_keeps_the_row_one_sequence():
    """Padding inside a row (e.g. a right-padded prompt followed by generated tokens, run again as
    one forward) is skipped: the row's real tokens are one sequence, as decoding reads them and
    as dense attention with the same mask sees them (not two sequences cut at the hole)."""
    torch.manual_seed(5)
    attention = mt.make_attention_function(mt.MoBASettings(moba.MoBAConfig(block_size=BS, top_k=TOP_K), ()))
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 0, True
    b, hq, hkv, length, d = 2, 4, 2, 18, 8
    q, k, v = torch.randn(b, hq, length, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 6:9] = False
    out, _ = attention(module, q, k, v, mask, scaling=0.4)
    for r in range(b):
        qr, kr, vr = (x[r : r + 1, :, mask[r]].transpose(1, 2) for x in (q, k, v))
        expected = moba.moba_attn_func(qr, kr, vr, BS, TOP_K, softmax_scale=0.4)
        torch.testing.assert_close(out[r : r + 1, mask[r]], expected, rtol=1e-5, atol=1e-6)


def test_hybrid_full_layers_are_checked(monkeypatch):
    sdpa, (hybrid, allfull, sparse) = _models("llama", "moba_t_hybrid", "moba_t_allfull", "moba_t")
    ids = torch.randint(1, VOCAB, (2, 21))
    calls = []
    real_full, real_moba = mt.full_attn_with_kvcache, mt.moba_attn_func
    monkeypatch.setattr(mt, "full_attn_with_kvcache", lambda *a, **k: (calls.append("full"), real_full(*a, **k))[1])
    monkeypatch.setattr(mt, "moba_attn_func", lambda *a, **k: (calls.append("moba"), real_moba(*a, **k))[1])
    monkeypatch.setattr(full, "_last_implementation", None)
    got = _logits(hybrid, ids)
    assert calls == ["moba", "full"]  # layer 0 MoBA, layer 1 (the last) full
    assert moba.last_full_attn_implementation() == "sdpa"
    expected = _logits(sdpa, ids)
    assert not torch.allclose(got, expected, atol=1e-3) and not torch.allclose(got, _logits(sparse, ids), atol=1e-3)
    torch.testing.assert_close(_logits(allfull, ids), expected, rtol=1e-4, atol=1e-5)  # full layers are dense
    _check_generate_equals_prefill(hybrid, ids[:, :5], 9)  # full layers decode over the cache too


def test_speculative_style_crop_then_continue():
    _, (model,) = _models("qwen2", "moba_t")
    torch.manual_seed(2)
    seq = torch.randint(1, VOCAB, (1, 30))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(seq[:, :11], use_cache=True, **{CACHE_KW: cache})  # prefill (installs the hooks)
        model(seq[:, 11:12], use_cache=True, **{CACHE_KW: cache})
        model(seq[:, 12:17], use_cache=True, **{CACHE_KW: cache})  # a 5-token "draft"
        cache.crop(-3)  # 3 draft tokens rejected: 14 tokens stay
        other = torch.randint(1, VOCAB, (1, 4))
        got = model(other, use_cache=True, **{CACHE_KW: cache}).logits
    assert mt._STATES[cache][0].lengths == [18]
    expected = _logits(model, torch.cat([seq[:, :14], other], dim=1))[:, -4:]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_assisted_generation_equals_plain_greedy(monkeypatch):
    """transformers' speculative decoding (assistant model): drafts are verified as chunks and the
    rejected tokens cropped from both caches; the result equals plain greedy decoding."""
    _, (target,) = _models("llama", "moba_t")
    _, (draft,) = _models("llama", "moba_t", num_hidden_layers=1)
    crops = []
    update = BlockMeanState.update

    def spy(self, k, starts, n_new):
        if self.lengths is not None and self.lengths[0] > k.shape[1] - starts[0] - n_new:
            crops.append(1)
        return update(self, k, starts, n_new)

    monkeypatch.setattr(BlockMeanState, "update", spy)
    prompt = torch.randint(1, VOCAB, (1, 7))
    kw = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    plain = target.generate(prompt, **kw)
    assisted = target.generate(prompt, assistant_model=draft, **kw)
    assert crops, "the draft was never cropped: the test does not exercise crop"
    assert torch.equal(plain.sequences, assisted.sequences)
    for a, b in zip(plain.logits, assisted.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_beam_search_follows_cache_reordering():
    _, (model, ref) = _models("llama", "moba_t", "moba_t_ref")
    prompt = torch.randint(1, VOCAB, (1, 5))
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    a, b = model.generate(prompt, **kw), ref.generate(prompt, **kw)  # ref: no decode state at all
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, rtol=1e-4, atol=1e-5)


def test_training_through_a_transformers_model():
    _, (model,) = _models("llama", "moba_t")
    model.train()
    ids = torch.randint(1, VOCAB, (2, 17))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = model(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert model(ids, labels=ids).loss < loss - 1e-3


def test_switch_a_transformers_model_to_full_attention_mid_training():
    """The MoBA -> full recipe for a transformers model: one set_attn_implementation call."""
    sdpa, (model,) = _models("llama", "moba_t")
    ids = torch.randint(1, VOCAB, (2, 21))
    assert not torch.allclose(_logits(model, ids), _logits(sdpa, ids), atol=1e-3)
    model.set_attn_implementation("moba_t_allfull")  # or "sdpa": every layer dense from here on
    torch.testing.assert_close(_logits(model, ids), _logits(sdpa, ids), rtol=1e-4, atol=1e-5)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(_logits(model, ids), _logits(sdpa, ids), rtol=1e-4, atol=1e-5)


def test_unsupported_options_raise_clear_errors():
    # sliding window: fine while the sequence fits the window, an error beyond it
    _, (qwen,) = _models("qwen2", "moba_t", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    _logits(qwen, torch.randint(1, VOCAB, (1, 8)))
    with pytest.raises(ValueError, match="sliding_window=8"):
        _logits(qwen, torch.randint(1, VOCAB, (1, 9)))
    _, (llama,) = _models("llama", "moba_t", attention_dropout=0.1)
    llama.train()
    with pytest.raises(ValueError, match="dropout"):
        llama(torch.randint(1, VOCAB, (1, 6)))
    llama.eval()
    _logits(llama, torch.randint(1, VOCAB, (1, 6)))  # no dropout at inference
    with pytest.raises(ValueError, match="custom attention masks"):
        _logits(llama, torch.randint(1, VOCAB, (1, 6)), attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_size"):
        mt.register_moba(0, 3, name="moba_bad")
    with pytest.raises(ValueError, match="backend"):
        mt.register_moba(4, 3, name="moba_bad", backend="cuda")


@pytest.mark.parametrize("fresh", [True, False], ids=["first-call", "hooks-installed"])
def test_static_cache_is_refused_never_silently_wrong(fresh):
    """A static cache has unused slots after the real keys: refused on a module's very first call
    (from the query positions) and, once the hooks are in, from the cache object itself."""
    _, (llama,) = _models("llama", "moba_t")
    ids = torch.randint(1, VOCAB, (1, 6))
    if fresh:  # one forward: only the position check can see the 10 unused slots
        cache = transformers.StaticCache(config=llama.config, max_cache_len=16)
        with pytest.raises(ValueError, match="growing cache"):
            _logits(llama, ids, use_cache=True, **{CACHE_KW: cache})
    else:
        llama.generate(ids, max_new_tokens=2)  # installs the cache hooks
        with pytest.raises(ValueError, match="growing cache"):
            llama.generate(ids, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("fresh", [True, False], ids=["first-call", "hooks-installed"])
def test_refused_static_generate_leaves_the_model_usable(fresh):
    """transformers 4.56 keeps the static cache generate built on the model for the next call and
    sets its layers up on their first update; a refusal must not leave that half-built cache
    behind (the next static call failed inside transformers with an AttributeError)."""
    _, (llama,) = _models("llama", "moba_t")
    ids = torch.randint(1, VOCAB, (1, 6))
    if not fresh:
        llama.generate(ids, max_new_tokens=2)
    for _ in range(2):
        with pytest.raises(ValueError, match="growing cache"):
            llama.generate(ids, max_new_tokens=2, cache_implementation="static")
    assert llama.generate(ids, max_new_tokens=2).shape == (1, 8)


class _WrappedCache:
    """A cache object the integration does not know: it forwards everything to a DynamicCache."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_unrecognised_cache_object_is_refused():
    _, (llama,) = _models("llama", "moba_t")
    ids = torch.randint(1, VOCAB, (1, 6))
    _logits(llama, ids)  # installs the cache hooks
    cache = _WrappedCache(transformers.DynamicCache(config=llama.config))
    with pytest.raises(ValueError, match="_WrappedCache"):
        _logits(llama, ids, use_cache=True, **{CACHE_KW: cache})


def test_unknown_attention_arguments_are_named():
    attention = mt.make_attention_function(mt.MoBASettings(moba.MoBAConfig(block_size=BS, top_k=TOP_K, backend="auto"), ()))
    module = torch.nn.Module()
    module.layer_idx = 0
    q = k = v = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="alibi_slopes, window_shape"):
        attention(module, q, k, v, None, alibi_slopes=torch.ones(2), window_shape=(4, 4))
    out, _ = attention(module, q, k, v, None, some_flag=None, other=False, use_cache=True)  # carry nothing: fine
    assert out.shape == (1, 8, 2, 4)


def test_hybrid_layer_indices_out_of_range_raise():
    mt.register_moba(BS, TOP_K, full_attention_layers=(2,), name="moba_t_bad_layers")
    _, (llama,) = _models("llama", "moba_t_bad_layers")  # 2 layers: valid indices -2 .. 1
    with pytest.raises(ValueError, match=r"full_attention_layers \[2\] out of range"):
        _logits(llama, torch.randint(1, VOCAB, (1, 6)))


def test_cu_seq_lens_pack_like_restarting_position_ids():
    """Padding-free batches pass cu_seq_lens_q/k (flash-attention collators): same as separate runs."""
    torch.manual_seed(5)
    attention = mt.make_attention_function(mt.MoBASettings(moba.MoBAConfig(block_size=BS, top_k=TOP_K, backend="auto"), ()))
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 0, True
    q, k, v = torch.randn(1, 4, 23, 8), torch.randn(1, 2, 23, 8), torch.randn(1, 2, 23, 8)
    cu = torch.tensor([0, 13, 23], dtype=torch.int32)
    got, _ = attention(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=13, max_length_k=13)
    for a, b in ((0, 13), (13, 23)):
        one, _ = attention(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None)
        torch.testing.assert_close(got[:, a:b], one, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cu_seq_lens_q == cu_seq_lens_k"):
        attention(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 23]))


def test_untested_transformers_version_warns_once(monkeypatch):
    monkeypatch.setattr(mt, "_warned_versions", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mt._warn_if_untested(mt.TESTED_TRANSFORMERS_VERSIONS[-1])  # inside the range: silent
        mt._warn_if_untested(mt.TESTED_TRANSFORMERS_VERSIONS[0])
    with pytest.warns(UserWarning, match="tested with transformers 4.56.0 to"):
        mt._warn_if_untested("99.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mt._warn_if_untested("99.0.0")  # once


def test_mask_function_never_builds_a_square_mask():
    assert mt.padding_mask_function(2, 5, 5) is None
    assert mt.padding_mask_function(2, 5, 5, attention_mask=torch.ones(2, 5, dtype=torch.bool)) is None
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[0, 0] = False
    assert mt.padding_mask_function(2, 1, 7, attention_mask=pad).shape == (2, 7)
    # as transformers calls it: by keyword, with cache_position (before 5.4) or q_length/q_offset (after)
    old_style = dict(batch_size=2, cache_position=torch.arange(6, 7), kv_length=7, kv_offset=0)
    new_style = dict(batch_size=2, q_length=1, kv_length=7, q_offset=6, kv_offset=0, config=None, dtype=torch.float32)
    for kw in (old_style, new_style):
        assert mt.padding_mask_function(**kw, attention_mask=pad).shape == (2, 7)
        assert mt.padding_mask_function(**kw, attention_mask=torch.ones(2, 7, dtype=torch.bool)) is None


@pytest.mark.gpu
def test_generate_on_cuda_decode_equals_prefill():
    """On CUDA the decode steps run the Triton decode kernel (backend "auto")."""
    _, (model,) = _models("llama", "moba_t")
    model = model.cuda()
    prompt = torch.randint(1, VOCAB, (2, 6), device="cuda")
    # prefill runs the Triton MoBA kernels (tf32 dots in float32), decoding the decode kernel
    _check_generate_equals_prefill(model, prompt, 18, tol=3e-3)


@pytest.mark.parametrize("first_dynamic", [False, True], ids=["first-call", "hooks-installed"])
def test_refused_static_generate_leaves_nothing_half_built(first_dynamic):
    """``generate`` keeps the static cache it built; after our refusal the next static call must
    get the same clear refusal (transformers 4.56 read ``max_batch_size`` of the layers the
    refused forward never reached: AttributeError deep inside), and a dynamic call still works."""
    _, (llama,) = _models("llama", "moba_t")
    ids = torch.randint(1, VOCAB, (1, 6))
    if first_dynamic:
        llama.generate(ids, max_new_tokens=2)
    for _ in range(2):
        with pytest.raises(ValueError, match="growing cache"):
            llama.generate(ids, max_new_tokens=2, cache_implementation="static")
    assert llama.generate(ids, max_new_tokens=2).shape == (1, 8)
