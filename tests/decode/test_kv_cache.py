"""KV-cache decoding of ``moba.nn.MoBASelfAttention`` and the scaling_runs GPT (``moba.KVCache``).

Contract: feeding a sequence in chunks through a cache gives the logits of one forward over
the whole sequence (float64, to rounding), for MoBA, full and hybrid layers, GQA, batch > 1,
chunks that cross block boundaries, and after crops (speculative rollback).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moba
from moba.decode import LayerKVCache
from moba.nn import MoBASelfAttention, attention_modules
from scaling_runs.config import ModelConfig
from scaling_runs.model import GPT

TOL = 1e-10  # float64


def _gpt(attention="moba", n_full_layers=0, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, context=128, vocab_size=50, block_size=8,
                      top_k=2, attention=attention, n_full_layers=n_full_layers, **kw)
    return GPT(cfg).double().eval()


def _chunked(gpt, ids, chunks, cache=None):
    cache = moba.KVCache() if cache is None else cache
    outs, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(gpt(ids[:, pos : pos + n], cache=cache))
            pos += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("attention,n_full", [("moba", 0), ("full", 0), ("hybrid", 1)])
def test_chunked_decoding_equals_one_forward(attention, n_full):
    gpt = _gpt(attention, n_full)
    modes = [m.mode for m in attention_modules(gpt)]
    assert modes == {"moba": ["moba"] * 3, "full": ["full"] * 3, "hybrid": ["moba", "moba", "full"]}[attention]
    ids = torch.randint(0, 50, (2, 75), generator=torch.Generator().manual_seed(1))
    chunks = [30, 1, 1, 5, 3, 1, 9, 20, 5]  # prefill, single tokens, chunks crossing 8-token blocks
    with torch.no_grad():
        ref = gpt(ids)
    got, cache = _chunked(gpt, ids, chunks)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert cache.get_seq_length() == 75 and all(layer.length == 75 for layer in cache.layers)


def test_decoding_reads_selected_blocks_only():
    """MoBA layers with a cache go through moba_decode, never a dense pass over the cache."""
    gpt = _gpt()
    ids = torch.randint(0, 50, (1, 64), generator=torch.Generator().manual_seed(2))
    cache = moba.KVCache()
    with torch.no_grad():
        gpt(ids[:, :63], cache=cache)
    calls = []
    original = moba.nn.modules.moba_decode

    def spy(q, k, v, state, block_size, top_k, *a, **kw):
        calls.append((q.shape[1], k.shape[1], top_k))
        return original(q, k, v, state, block_size, top_k, *a, **kw)

    moba.nn.modules.moba_decode = spy
    try:
        with torch.no_grad():
            gpt(ids[:, 63:], cache=cache)
    finally:
        moba.nn.modules.moba_decode = original
    assert calls == [(1, 64, 2)] * 3
    # the block means were folded incrementally: every layer's state covers the cache
    assert all(layer.state.lengths == [64] for layer in cache.layers)


@pytest.mark.parametrize("crop", [-7, -1, 41, 8, 0])
def test_crop_then_refeed_equals_one_forward(crop):
    gpt = _gpt("hybrid", 1)
    ids = torch.randint(0, 50, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = gpt(ids)
    _, cache = _chunked(gpt, ids, [40, 1, 2, 27])
    cache.crop(crop)
    keep = 70 + crop if crop < 0 else crop
    assert cache.get_seq_length() == keep
    with torch.no_grad():
        # a different continuation first (a rejected speculation), then crop back and the real one
        other = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(4))
        gpt(other, cache=cache)
        cache.crop(keep)
        got = gpt(ids[:, keep:], cache=cache)
    torch.testing.assert_close(got, ref[:, keep:], atol=TOL, rtol=0)


def test_self_attention_layer_with_cache_and_storage_growth():
    torch.manual_seed(0)
    layer = MoBASelfAttention(48, num_heads=6, num_kv_heads=2, block_size=4, top_k=3).double()
    x = torch.randn(3, 150, 48, dtype=torch.float64)  # 150 > the initial capacity (64): storage grows
    with torch.no_grad():
        ref = layer(x)
        cache = LayerKVCache()
        got = torch.cat([layer(x[:, :10], cache=cache)] + [layer(x[:, i : i + 7], cache=cache) for i in range(10, 150, 7)], 1)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert cache.keys.shape == (3, 150, 2, 8) and cache.values.shape == (3, 150, 2, 8)


def test_logits_to_keep_and_float32():
    gpt = _gpt().float()
    ids = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = gpt(ids)
        cache = moba.KVCache()
        gpt(ids[:, :36], cache=cache)
        last = gpt(ids[:, 36:], cache=cache, logits_to_keep=2)
    assert last.shape == (1, 2, 50)
    torch.testing.assert_close(last, ref[:, -2:], atol=1e-5, rtol=1e-5)


def test_bad_cache_inputs():
    gpt = _gpt()
    ids = torch.randint(0, 50, (2, 12))
    with pytest.raises(TypeError, match="moba.KVCache"):
        gpt(ids, cache=[])
    with pytest.raises(ValueError, match="logits_to_keep"):
        gpt(ids, targets=ids, logits_to_keep=1)
    cache = moba.KVCache()
    with torch.no_grad():
        gpt(ids, cache=cache)
        with pytest.raises(ValueError, match="do not match the cache"):
            gpt(ids[:1], cache=cache)  # another batch size
    layer = MoBASelfAttention(16, 2, block_size=4, top_k=2, causal=False)
    with pytest.raises(ValueError, match="causal"):
        layer(torch.randn(1, 8, 16), cache=LayerKVCache())
    layer = MoBASelfAttention(16, 2, block_size=4, top_k=2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(8, 16), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), max_seqlen=8,
              cache=LayerKVCache())
    with pytest.raises(TypeError, match="LayerKVCache"):
        layer.attn(torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8), cache=moba.KVCache())


def test_generate_on_gpt_checkpoint_uses_the_cache(tmp_path):
    """load_gpt: greedy plain/speculative decoding of a checkpoint equal a no-cache recompute,
    and every forward after the prefill feeds only new tokens."""
    import copy

    from moba.generate import GPTAdapter, generate_plain, generate_speculative
    from scaling_runs.checkpoint import load_gpt

    gpt = _gpt(tie_embeddings=False)
    with torch.no_grad():  # a varied greedy continuation, not one repeated token
        for p in gpt.parameters():
            p.mul_(4)
    torch.save({"model": gpt.float().state_dict(), "config": {"model": dataclasses.asdict(gpt.cfg)}, "step": 0},
               tmp_path / "ckpt.pt")
    target = load_gpt(tmp_path / "ckpt.pt")
    target.gpt.double()
    gpt.double()
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(6))
    out, st = generate_plain(target, ids, 24, return_stats=True)
    ref = ids
    with torch.no_grad():
        for _ in range(24):
            ref = torch.cat([ref, gpt(ref)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref) and len(set(ref[0, 20:].tolist())) > 5
    assert (st.prefill_tokens, st.target_tokens, st.target_forwards) == (19, 24, 24)  # then one token per step
    draft = GPTAdapter(copy.deepcopy(gpt))
    spec, st = generate_speculative(target, draft, ids, 24, gamma=3)
    assert torch.equal(spec, ref) and st.acceptance_rate == 1.0
    with torch.no_grad():  # a noisy copy: some drafts rejected, caches cropped
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=p.dtype) * 0.3 * p.std())
    spec, st = generate_speculative(target, draft, ids, 24, gamma=3)
    assert torch.equal(spec, ref) and 0 < st.acceptance_rate < 1.0, st
