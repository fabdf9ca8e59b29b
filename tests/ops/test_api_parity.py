"""API parity (issue 17): MoBAConfig everywhere and its JSON round trip, the official MoBA
package's names, flash-attn's varlen arguments, fewer queries than keys, ``return_lse`` and
``deterministic``.

Truths used here are independent of the package's internals where it matters: the
log-sum-exp is checked against a dense float64 ``logsumexp`` over an explicit mask built from
``select_blocks`` indices, and "queries shorter than keys" against the last rows of the
self-attention output (MoBA's output for a query never depends on which other queries exist).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch

import moba
from moba import MoBAConfig
from moba.ops.registry import _BACKENDS, Backend, register_backend
from tests._helpers import (
    ROOT,
    assert_close_by_rule,
    cu_seqlens_of,
    random_qkv,
    random_varlen,
)
from tests._subprocess import run_child

# --------------------------------------------------------------------------- MoBAConfig


def test_config_official_aliases():
    assert MoBAConfig(moba_chunk_size=64, moba_topk=2) == MoBAConfig(block_size=64, top_k=2)
    assert MoBAConfig(64, 2) == MoBAConfig(block_size=64, top_k=2)  # the official positional call
    cfg = MoBAConfig(moba_chunk_size=64, moba_topk=2)
    assert (cfg.moba_chunk_size, cfg.moba_topk) == (64, 2)
    assert MoBAConfig(block_size=64, moba_chunk_size=64).block_size == 64  # agreeing is fine
    with pytest.raises(ValueError, match="block_size=32 and its alias moba_chunk_size=64"):
        MoBAConfig(block_size=32, moba_chunk_size=64)
    with pytest.raises(ValueError, match="top_k=3 and its alias moba_topk=2"):
        MoBAConfig(top_k=3, moba_topk=2)


def test_config_converts_numpy_values():
    cfg = MoBAConfig(np.int64(64), np.int32(3), np.bool_(False), softmax_scale=np.float32(0.25))
    assert type(cfg.block_size) is int and type(cfg.top_k) is int and cfg.causal is False
    assert type(cfg.softmax_scale) is float and cfg.softmax_scale == 0.25
    assert cfg == MoBAConfig(64, 3, False, softmax_scale=0.25)
    json.dumps(cfg.to_dict())  # plain Python values only


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
        (dict(backend=None), TypeError, "backend must be a str"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a finite positive"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
        (dict(softmax_scale=float("inf")), ValueError, "softmax_scale"),
        (dict(softmax_scale=0), ValueError, "softmax_scale"),
        (dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
        (dict(softmax_scale=True), TypeError, "softmax_scale"),
        (dict(deterministic=1), TypeError, "deterministic"),
        (dict(block_size=np.float64(4)), TypeError, "block_size"),
        (dict(top_k=np.int64(0)), ValueError, "top_k"),
    ],
)
def test_config_validates_every_field(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        MoBAConfig(**kw)


def test_config_json_round_trip():
    cfg = MoBAConfig(block_size=48, top_k=5, causal=False, backend="torch", softmax_scale=0.125,
                     deterministic=True)
    assert MoBAConfig.from_dict(cfg.to_dict()) == cfg
    assert MoBAConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json(indent=2)) == cfg.to_dict()
    assert MoBAConfig.from_json('{"moba_chunk_size": 4096, "moba_topk": 12}') == MoBAConfig(4096, 12)
    with pytest.raises(ValueError, match=r"unknown MoBAConfig field\(s\) \['chunk'\]"):
        MoBAConfig.from_dict({"chunk": 4})
    with pytest.raises(ValueError, match="unknown backend"):
        MoBAConfig.from_json('{"backend": "tpu"}')
    with pytest.raises(TypeError, match="needs a dict"):
        MoBAConfig.from_dict([("block_size", 4)])
    assert dataclasses.replace(cfg, top_k=2).top_k == 2  # dataclasses.replace goes through validation
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(cfg, top_k=0)
    assert hash(cfg) == hash(MoBAConfig.from_json(cfg.to_json()))


def test_functions_accept_config():
    q, k, v = random_qkv(2, 24, 4, 2, 8)
    cfg = MoBAConfig(block_size=5, top_k=2, backend="torch", softmax_scale=0.3)
    want = moba.moba_attn_func(q, k, v, 5, 2, softmax_scale=0.3, backend="torch")
    assert torch.equal(moba.moba_attn_func(q, k, v, config=cfg), want)
    # explicit arguments that agree with the config are fine ...
    assert torch.equal(moba.moba_attn_func(q, k, v, 5, np.int64(2), config=cfg, backend="torch"), want)
    # ... and one that disagrees is an error naming both values
    with pytest.raises(ValueError, match=r"top_k=3 conflicts with config.top_k=2"):
        moba.moba_attn_func(q, k, v, top_k=3, config=cfg)
    with pytest.raises(ValueError, match=r"causal=False conflicts with config.causal=True"):
        moba.moba_attn_func(q, k, v, causal=False, config=cfg)
    with pytest.raises(TypeError, match="config must be a moba.MoBAConfig"):
        moba.moba_attn_func(q, k, v, config={"block_size": 5})
    with pytest.raises(TypeError, match=r"moba_attn_func\(\) needs block_size"):
        moba.moba_attn_func(q, k, v)
    with pytest.raises(TypeError, match=r"needs top_k"):
        moba.moba_attn_func(q, k, v, 5)
    # varlen, both call forms
    qv, kv, vv, cu, m = random_varlen([7, 0, 17], 4, 2, 8)
    want = moba.moba_attn_varlen_func(qv, kv, vv, cu, m, 5, 2, softmax_scale=0.3, backend="torch")
    assert torch.equal(moba.moba_attn_varlen_func(qv, kv, vv, cu, m, config=cfg), want)
    assert torch.equal(moba.moba_attn_varlen_func(qv, kv, vv, cu, cu, m, m, config=cfg), want)
    with pytest.raises(ValueError, match="block_size=6 conflicts"):
        moba.moba_attn_varlen_func(qv, kv, vv, cu, m, 6, config=cfg)


def test_modules_accept_config():
    from moba.nn import MoBAAttention, MoBASelfAttention

    cfg = MoBAConfig(block_size=4, top_k=2, backend="torch", softmax_scale=0.5)
    core = MoBAAttention(config=cfg)
    assert core.config == cfg and core.block_size == 4 and core.softmax_scale == 0.5
    q, k, v = random_qkv(1, 16, 2, 2, 8)
    assert torch.equal(core(q, k, v), moba.moba_attn_func(q, k, v, config=cfg))
    core.top_k = 3  # training code changes settings in place; .config follows
    assert core.config == dataclasses.replace(cfg, top_k=3)
    layer = MoBASelfAttention(16, 2, config=cfg)
    assert layer.attn.config == cfg
    assert MoBASelfAttention(16, 2, block_size=4, config=cfg).attn.config == cfg
    with pytest.raises(ValueError, match="block_size=8 conflicts with config.block_size=4"):
        MoBASelfAttention(16, 2, block_size=8, config=cfg)
    assert MoBAAttention().config == MoBAConfig()  # defaults unchanged: 512, 3, causal, auto


# --------------------------------------------------------------------------- official names


def test_official_names_are_importable():
    from moba import MoBAConfig as Config  # noqa: F401
    from moba import moba_attn_varlen, moba_attn_varlen_naive, register_moba  # noqa: F401

    assert callable(register_moba) and "register_moba" in moba.__all__


def test_official_moba_attn_varlen_is_ours_with_local_top_k_1():
    q, k, v, cu, m = random_varlen([20, 13], 2, 2, 8, dtype=torch.float64)
    ours = moba.moba_attn_varlen_func(q, k, v, cu, m, 4, 3)
    assert torch.equal(moba.moba_attn_varlen(q, k, v, cu, m, 4, 3), ours)
    assert torch.equal(moba.moba_attn_varlen(q, k, v, cu, m, moba_chunk_size=4, moba_topk=3), ours)
    naive = moba.moba_attn_varlen_naive(q, k, v, cu, m, 4, 3)
    assert (naive - ours).abs().max() < 1e-12
    # top_k = 1 is local block attention (the official code runs dense causal attention there):
    local = moba.moba_attn_varlen(q, k, v, cu, m, 4, 1)
    dense = moba.moba_attn_varlen(q, k, v, cu, m, 4, 1000)
    assert (local - dense).abs().max() > 1e-3
    idx = torch.zeros(q.shape[0], 2, 1, dtype=torch.int32)  # own block only
    pos = torch.cat([torch.arange(20), torch.arange(13)])
    idx[:, :, 0] = (pos // 4)[:, None].to(torch.int32)
    assert (moba.moba_attn_varlen_func(q, k, v, cu, m, 4, block_indices=idx) - local).abs().max() < 1e-12


def test_register_moba_takes_a_config_and_official_names():
    transformers = pytest.importorskip("transformers")
    from moba import register_moba

    cfg = MoBAConfig(moba_chunk_size=4, moba_topk=2)
    assert register_moba(cfg) == "moba"
    assert register_moba(cfg, name="moba_cfg_pos") == "moba_cfg_pos"
    assert register_moba(config=cfg, name="moba_cfg_kw", top_k=2) == "moba_cfg_kw"
    with pytest.raises(ValueError, match="top_k=3 conflicts"):
        register_moba(cfg, 3, name="moba_bad")
    with pytest.raises(ValueError, match="causal=True"):
        register_moba(MoBAConfig(4, 2, causal=False), name="moba_bad")
    # the official package's example, shrunk: a tiny random Llama generates with attn "moba"
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="moba").eval()
    ids = torch.randint(1, 64, (1, 10))
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.set_attn_implementation("eager")
    dense = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 16) and out.shape == dense.shape


# --------------------------------------------------------------------------- flash-attn arguments


def test_varlen_flash_attn_argument_names():
    q, k, v, cu, m = random_varlen([9, 14, 0, 5], 4, 2, 8)
    want = moba.moba_attn_varlen_func(q, k, v, cu, m, 4, 2, True, None, "torch")
    calls = [
        lambda: moba.moba_attn_varlen_func(q, k, v, cu, cu, m, m, 4, 2, True, None, "torch"),
        lambda: moba.moba_attn_varlen_func(q, k, v, cu, cu, m, m, block_size=4, top_k=2, backend="torch"),
        lambda: moba.moba_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m,
                                           max_seqlen_k=m, block_size=4, top_k=2, backend="torch"),
        lambda: moba.moba_attn_varlen_func(q, k, v, cu_seqlens=cu, max_seqlen=m, block_size=4, top_k=2,
                                           backend="torch"),
        lambda: moba.moba_attn_varlen_func(q, k, v, cu, max_seqlen=m, block_size=4, top_k=2, backend="torch"),
    ]
    for call in calls:
        assert torch.equal(call(), want)


def test_varlen_argument_errors():
    q, k, v, cu, m = random_varlen([9, 14], 2, 2, 8)
    with pytest.raises(TypeError, match="multiple values for argument 'block_size'"):
        moba.moba_attn_varlen_func(q, k, v, cu, m, 4, 2, block_size=4)
    with pytest.raises(TypeError, match="multiple values for argument 'max_seqlen_q'"):
        moba.moba_attn_varlen_func(q, k, v, cu, cu, m, m, 4, 2, max_seqlen_q=m)
    with pytest.raises(TypeError, match="at most"):
        moba.moba_attn_varlen_func(q, k, v, cu, m, 4, 2, True, None, "torch", "extra")
    with pytest.raises(TypeError, match="needs max_seqlen_q and max_seqlen_k"):
        moba.moba_attn_varlen_func(q, k, v, cu, cu_k := cu_seqlens_of([9, 14]), block_size=4, top_k=2)
    with pytest.raises(TypeError, match="cu_seqlens_q or cu_seqlens, not both"):
        moba.moba_attn_varlen_func(q, k, v, cu, m, 4, 2, cu_seqlens=cu)
    with pytest.raises(ValueError, match="same number of sequences"):
        moba.moba_attn_varlen_func(q, k, v, cu, cu_seqlens_of([9, 14, 0]), m, m, 4, 2)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal the total number of tokens 23"):
        moba.moba_attn_varlen_func(q, k, v, cu, cu_seqlens_of([9, 13]), m, m, 4, 2)
    with pytest.raises(ValueError, match=r"sequence 1 has more queries \(14\) than keys \(12\)"):
        moba.moba_attn_varlen_func(q, k[:21], v[:21], cu, cu_seqlens_of([9, 12]), m, m, 4, 2)
    del cu_k


def _suffix(x: torch.Tensor, cu_k: list[int], lq: list[int]) -> torch.Tensor:
    """The last lq[n] tokens of every packed sequence n of x."""
    return torch.cat([x[cu_k[n + 1] - lq[n] : cu_k[n + 1]] for n in range(len(lq))])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fewer_queries_than_keys_varlen(backend, causal):
    """Queries = the last Lq keys of each sequence (chunked prefill / decoding), checked
    against the same rows of self-attention, with the tolerance rule (truth: float64)."""
    lk, lq = [23, 9, 0, 16, 5], [7, 9, 0, 1, 0]
    q, k, v, cu_k, mk = random_varlen(lk, 4, 2, 8, dtype=torch.float32)
    cu_q = cu_seqlens_of(lq)
    qs = _suffix(q, cu_k.tolist(), lq)

    def run(dtype, be):
        qq, kk, vv = (t.to(dtype) for t in (qs, k, v))
        return moba.moba_attn_varlen_func(qq, kk, vv, cu_q, cu_k, max(lq), mk, 4, 2, causal, backend=be)

    out = run(torch.float32, backend)
    full = moba.moba_attn_varlen_func(q.double(), k.double(), v.double(), cu_k, mk, 4, 2, causal, backend="reference")
    truth = _suffix(full, cu_k.tolist(), lq)
    assert out.shape == qs.shape and out.dtype == torch.float32
    assert_close_by_rule(out, run(torch.float32, "reference"), truth)
    assert (run(torch.float64, backend) - truth).abs().max() < 1e-12


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fewer_queries_than_keys_fixed_with_grad(backend):
    q, k, v = random_qkv(2, 21, 4, 2, 8, dtype=torch.float64)
    sq = 6
    qs = q[:, -sq:].clone().requires_grad_()
    out = moba.moba_attn_func(qs, k, v, 4, 2, backend=backend)
    full = moba.moba_attn_func(q, k, v, 4, 2, backend="reference")
    assert out.shape == qs.shape and (out - full[:, -sq:]).abs().max() < 1e-12
    out.sum().backward()
    q_full = q.clone().requires_grad_()
    moba.moba_attn_func(q_full, k, v, 4, 2, backend="reference")[:, -sq:].sum().backward()
    assert (qs.grad - q_full.grad[:, -sq:]).abs().max() < 1e-12
    # queries shorter than keys with given block indices (shape (B, Sq, Hq, slots))
    idx = moba.select_blocks(q, k, 4, 2)[:, -sq:]
    assert (moba.moba_attn_func(qs, k, v, 4, block_indices=idx, backend=backend) - out).abs().max() < 1e-12


# --------------------------------------------------------------------------- return_lse


def _dense_lse_from_indices(q, k, idx, block_size, causal, scale):
    """Independent float64 log-sum-exp (B, Hq, Sq): explicit mask from block indices (B, Sq, Hq, slots)."""
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale
    key_block = torch.arange(sk) // block_size
    chosen = (idx.long()[..., None] == key_block).any(dim=-2)  # (B, Sq, Hq, Sk)
    allowed = chosen.permute(0, 2, 1, 3)
    if causal:
        pos = torch.arange(sk - sq, sk)
        allowed = allowed & (torch.arange(sk)[None, :] <= pos[:, None])
    return torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_return_lse_fixed(backend, causal, dtype):
    q, k, v = random_qkv(2, 19, 4, 2, 8, dtype=dtype)
    scale = 0.4
    out, lse = moba.moba_attn_func(q, k, v, 4, 2, causal, scale, backend, return_lse=True)
    assert lse.shape == (2, 4, 19) and lse.is_contiguous() and not lse.requires_grad
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the same output as without the lse (the torch backend may pick another exact formulation
    # without it, e.g. dense under the selection mask at short lengths: equal up to rounding)
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else {}  # a few float16 ulps
    torch.testing.assert_close(out, moba.moba_attn_func(q, k, v, 4, 2, causal, scale, backend), **tol)
    idx = moba.select_blocks(q, k, 4, 2, causal)
    truth = _dense_lse_from_indices(q, k, idx, 4, causal, scale)
    _, lse_lowp = moba.moba_attn_func(q, k, v, 4, 2, causal, scale, "reference", return_lse=True,
                                      block_indices=idx)
    assert_close_by_rule(lse, lse_lowp, truth, name="lse")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_return_lse_varlen_and_fewer_queries(backend):
    lk, lq = [13, 0, 22], [5, 0, 22]
    q, k, v, cu_k, mk = random_varlen(lk, 4, 2, 8, dtype=torch.float64)
    cu_q = cu_seqlens_of(lq)
    qs = _suffix(q, cu_k.tolist(), lq)
    out, lse = moba.moba_attn_varlen_func(qs, k, v, cu_q, cu_k, 22, 22, 4, 2, backend=backend, return_lse=True)
    assert lse.shape == (4, qs.shape[0]) and lse.dtype == torch.float64
    _, lse_self = moba.moba_attn_varlen_func(q, k, v, cu_k, mk, 4, 2, backend="reference", return_lse=True)
    assert (lse - _suffix(lse_self.T, cu_k.tolist(), lq).T).abs().max() < 1e-12
    # dense (top_k >= blocks) log-sum-exp = plain causal logsumexp, per sequence
    _, lse_dense = moba.moba_attn_varlen_func(q, k, v, cu_k, mk, 4, 100, backend=backend, return_lse=True)
    for a, b in zip(cu_k[:-1].tolist(), cu_k[1:].tolist(), strict=True):
        if b == a:
            continue
        kk = k[a:b].repeat_interleave(2, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[a:b], kk) * 8**-0.5
        s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        assert (lse_dense[:, a:b] - torch.logsumexp(s, -1)).abs().max() < 1e-12


def test_lse_merges_two_key_sets():
    """What return_lse is for: attention over keys A then B, merged, equals attention over A+B.
    Dense MoBA (top_k >= blocks) over a cache prefix (non-causal, all of it visible) and a
    causal chunk equals causal attention of the chunk over prefix + chunk."""
    q, k, v = random_qkv(1, 24, 2, 2, 8, dtype=torch.float64)
    p = 16  # cached prefix length; queries are the last 8 tokens
    qc = q[:, p:]
    o1, l1 = moba.moba_attn_func(qc, k[:, :p], v[:, :p], 4, 100, causal=False, return_lse=True)
    o2, l2 = moba.moba_attn_func(qc, k[:, p:], v[:, p:], 4, 100, causal=True, return_lse=True)
    lse = torch.logaddexp(l1, l2)  # (B, H, Sq)
    w1 = torch.exp(l1 - lse).transpose(1, 2)[..., None]
    w2 = torch.exp(l2 - lse).transpose(1, 2)[..., None]
    merged = o1 * w1 + o2 * w2
    want, want_lse = moba.moba_attn_func(qc, k, v, 4, 100, causal=True, return_lse=True)
    assert (merged - want).abs().max() < 1e-12 and (lse - want_lse).abs().max() < 1e-12


def test_return_lse_keeps_output_differentiable():
    q, k, v = random_qkv(1, 12, 2, 1, 8, dtype=torch.float64, requires_grad=True)
    out, lse = moba.moba_attn_func(q, k, v, 4, 2, backend="torch", return_lse=True)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and not lse.requires_grad


# --------------------------------------------------------------------------- backends without a feature


@pytest.fixture
def limited_backend():
    """A registered backend that cannot return the lse and is never deterministic."""
    torch_be = _BACKENDS["torch"]
    register_backend(Backend("limited", torch_be.attention, torch_be.select, lambda d: None,
                             nondeterministic_reason=lambda d: "it is a test double"))
    yield "limited"
    del _BACKENDS["limited"]


def test_backend_without_lse_or_determinism_raises(limited_backend):
    q, k, v = random_qkv(1, 12, 2, 1, 8, requires_grad=True)
    assert moba.moba_attn_func(q, k, v, 4, 2, backend=limited_backend).shape == q.shape
    with pytest.raises(NotImplementedError, match="backend 'limited' cannot return the log-sum-exp"):
        moba.moba_attn_func(q, k, v, 4, 2, backend=limited_backend, return_lse=True)
    with pytest.raises(NotImplementedError, match="backend 'limited' is not deterministic on cpu: it is a test double"):
        moba.moba_attn_func(q, k, v, 4, 2, backend=limited_backend, deterministic=True)
    with torch.no_grad():  # no backward, nothing to be non-deterministic about
        moba.moba_attn_func(q, k, v, 4, 2, backend=limited_backend, deterministic=True)


def test_deterministic_torch_backend():
    q, k, v = random_qkv(1, 40, 4, 2, 8, requires_grad=True)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        moba.moba_attn_func(q, k, v, 4, 3, backend="torch", deterministic=True).square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    # the CUDA rule, checked without a GPU: atomics unless torch's deterministic mode is on
    reason = _BACKENDS["torch"].nondeterministic_reason
    assert reason(torch.device("cpu")) is None
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert "use_deterministic_algorithms" in reason(torch.device("cuda"))
        torch.use_deterministic_algorithms(True)
        assert reason(torch.device("cuda")) is None
    finally:
        torch.use_deterministic_algorithms(was)
    assert _BACKENDS["reference"].nondeterministic_reason(torch.device("cuda")) is None


# --------------------------------------------------------------------------- Triton (interpreter)

_TRITON_SCRIPT = r"""
import torch, moba
torch.manual_seed(0)
def rnd(*s): return torch.randn(*s, dtype=torch.float64).float()
lk, lq = [37, 16, 9], [5, 16, 1]
cu_k = torch.tensor([0, 37, 53, 62], dtype=torch.int32); cu_q = torch.tensor([0, 5, 21, 22], dtype=torch.int32)
k, v = rnd(62, 2, 16), rnd(62, 2, 16)
q = rnd(22, 4, 16)
for causal in (True, False):
    idx = None
    out, lse = moba.moba_attn_varlen_func(q, k, v, cu_q, cu_k, 16, 37, 8, 3, causal, backend="triton", return_lse=True)
    ref, ref_lse = moba.moba_attn_varlen_func(q.double(), k.double(), v.double(), cu_q, cu_k, 16, 37, 8, 3, causal,
                                              backend="reference", return_lse=True)
    lo, lo_lse = moba.moba_attn_varlen_func(q, k, v, cu_q, cu_k, 16, 37, 8, 3, causal, backend="reference", return_lse=True)
    assert lse.shape == (4, 22) and lse.dtype == torch.float32
    for a, l, t in ((out, lo, ref), (lse, lo_lse, ref_lse)):
        err, ref_err = (a.double() - t).abs().max().item(), (l.double() - t).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, (causal, err, ref_err)
qf, kf, vf = rnd(1, 24, 2, 16), rnd(1, 40, 1, 16), rnd(1, 40, 1, 16)
out, lse = moba.moba_attn_func(qf, kf, vf, 8, 2, backend="triton", return_lse=True, deterministic=True)
ref = moba.moba_attn_func(qf.double(), kf.double(), vf.double(), 8, 2, backend="reference")
assert out.shape == qf.shape and lse.shape == (1, 2, 24) and (out.double() - ref).abs().max() < 1e-5
print("TRITON-OK")
"""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="runs its own interpreter subprocess")
def test_triton_backend_fewer_queries_and_lse_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = run_child([sys.executable, "-c", _TRITON_SCRIPT], env=env, cwd=ROOT)
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
