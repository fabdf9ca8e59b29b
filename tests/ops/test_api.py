"""Public API surface: exports, MoBAConfig, backend selection, shapes and dtypes, the
``block_indices=`` / ``softmax_scale`` / ``top_k`` arguments, autograd plumbing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moba
from tests._helpers import cu_seqlens_of, dense_sdpa_causal, random_qkv, random_varlen, usable_backends

PUBLIC = [
    "PAD_INDEX",
    "MoBAConfig",
    "available_backends",
    "moba_attn_func",
    "moba_attn_varlen_func",
    "select_blocks",
    "select_blocks_varlen",
]


def test_public_names():
    for name in PUBLIC:
        assert name in moba.__all__ and hasattr(moba, name), name
    assert moba.PAD_INDEX == -1
    assert isinstance(moba.__version__, str) and moba.__version__.count(".") >= 1
    for fn in (
        moba.moba_attn_func,
        moba.moba_attn_varlen_func,
        moba.select_blocks,
        moba.select_blocks_varlen,
    ):
        assert fn.__doc__ and "Args" in fn.__doc__ and "Returns" in fn.__doc__


def test_available_backends():
    status = moba.available_backends("cpu")
    assert {"reference", "torch", "triton"} <= set(status)
    assert status["reference"] is None and status["torch"] is None
    assert status["triton"] is None or (isinstance(status["triton"], str) and status["triton"])
    assert moba.available_backends(torch.device("cpu")) == status


# --------------------------------------------------------------------------- MoBAConfig


def test_config_defaults_and_dict():
    cfg = moba.MoBAConfig()
    assert (cfg.block_size, cfg.top_k, cfg.causal, cfg.backend) == (512, 3, True, "auto")
    cfg = moba.MoBAConfig(block_size=7, top_k=1, causal=False, backend="torch")
    assert cfg.to_dict() == {"block_size": 7, "top_k": 1, "causal": False, "backend": "torch",
                             "softmax_scale": None, "deterministic": False}
    assert moba.MoBAConfig(**cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 5


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=-1), ValueError, "block_size"),
        (dict(block_size=3.5), TypeError, "block_size"),
        (dict(block_size=True), TypeError, "block_size"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k="3"), TypeError, "top_k"),
        (dict(causal="yes"), TypeError, "causal"),
        (dict(causal=0), TypeError, "causal"),
        (dict(backend=None), TypeError, "backend"),
    ],
)
def test_config_validates(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        moba.MoBAConfig(**kw)


# --------------------------------------------------------------------------- backends


def test_auto_backend_on_cpu_is_the_torch_path():
    q, k, v = random_qkv(2, 30, 4, 2, 8)
    a = moba.moba_attn_func(q, k, v, 6, 2)
    b = moba.moba_attn_func(q, k, v, 6, 2, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", *usable_backends("cpu", exclude=())])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_shape_and_dtype(backend, dtype):
    if backend == "triton" and dtype in (torch.bfloat16, torch.float64):
        pytest.skip("the Triton interpreter has no bfloat16/float64 tl.dot")
    q, k, v = random_qkv(2, 21, 4, 1, 8, dtype)
    out = moba.moba_attn_func(q, k, v, 5, 2, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert torch.isfinite(out).all()
    qv, kv, vv, cu, m = random_varlen([3, 0, 18], 4, 2, 16, dtype)
    out = moba.moba_attn_varlen_func(qv, kv, vv, cu, m, 5, 2, backend=backend)
    assert out.shape == qv.shape and out.dtype == dtype
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- arguments


def test_default_softmax_scale():
    q, k, v = random_qkv(1, 24, 2, 1, 16, torch.float64)
    a = moba.moba_attn_func(q, k, v, 6, 2, backend="torch")
    b = moba.moba_attn_func(q, k, v, 6, 2, softmax_scale=16**-0.5, backend="torch")
    c = moba.moba_attn_func(q, k, v, 6, 2, softmax_scale=1.0, backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    assert (a - c).abs().max() > 1e-3


def test_given_block_indices_override_top_k():
    q, k, v = random_qkv(1, 30, 2, 1, 8, torch.float64)
    idx = moba.select_blocks(q, k, 5, 3)
    a = moba.moba_attn_func(q, k, v, 5, 1, block_indices=idx, backend="torch")
    b = moba.moba_attn_func(q, k, v, 5, 6, block_indices=idx, backend="torch")
    c = moba.moba_attn_func(q, k, v, 5, 3, backend="torch")
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-14)


def test_block_indices_int64_and_non_canonical_rows_accepted():
    """int64 indices, and rows in any order with PAD_INDEX anywhere, mean the same set."""
    q, k, v = random_qkv(1, 20, 2, 1, 8, torch.float64)
    idx = moba.select_blocks(q, k, 4, 3)
    ref = moba.moba_attn_func(q, k, v, 4, 3, block_indices=idx, backend="torch")
    shuffled = torch.cat([moba.PAD_INDEX * torch.ones_like(idx[..., :1]), idx.flip(-1)], dim=-1).long()
    for backend in ("torch", "reference"):
        out = moba.moba_attn_func(q, k, v, 4, 3, block_indices=shuffled, backend=backend)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_block_indices_with_extra_blocks_non_causal():
    """Non-causal given indices may name any block of the sequence, e.g. all of them."""
    q, k, v = random_qkv(1, 18, 2, 2, 8, torch.float64)
    all_blocks = torch.arange(4, dtype=torch.int32).expand(1, 18, 2, 4).contiguous()
    out = moba.moba_attn_func(q, k, v, 5, 1, causal=False, block_indices=all_blocks, backend="torch")
    torch.testing.assert_close(out, dense_sdpa_causal(q, k, v, causal=False), rtol=0, atol=1e-12)


def test_non_contiguous_inputs():
    q, k, v = random_qkv(2, 25, 4, 2, 8, torch.float64)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    kt = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    for backend in ("torch", "reference"):
        a = moba.moba_attn_func(q, k, v, 5, 2, backend=backend)
        b = moba.moba_attn_func(qt, kt, v, 5, 2, backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_same_tensor_for_k_and_v_and_expanded_grad():
    """k is v (one tensor), and out.sum().backward() (an expanded, stride-0 gradient)."""
    q, kv, _ = random_qkv(1, 16, 2, 1, 8, torch.float64, requires_grad=True)
    out = moba.moba_attn_func(q, kv, kv, 4, 2, backend="torch")
    out.sum().backward()
    g_q, g_kv = q.grad.clone(), kv.grad.clone()
    q2, kv2 = q.detach().clone().requires_grad_(), kv.detach().clone().requires_grad_()
    out2 = moba.moba_attn_func(q2, kv2, kv2, 4, 2, backend="reference")
    out2.backward(torch.ones_like(out2))
    torch.testing.assert_close(g_q, q2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_kv, kv2.grad, rtol=0, atol=1e-12)


def test_gate_carries_no_gradient_and_no_grad_mode():
    q, k, v = random_qkv(1, 16, 2, 1, 8, requires_grad=True)
    idx = moba.select_blocks(q, k, 4, 2)
    assert not idx.requires_grad and idx.dtype == torch.int32
    with torch.no_grad():
        out = moba.moba_attn_func(q, k, v, 4, 2, backend="torch")
    assert not out.requires_grad
    out = moba.moba_attn_func(q, k, v, 4, 2, backend="torch")
    assert out.requires_grad
    # only the differentiable inputs receive gradients
    (out * torch.randn_like(out)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_deterministic_on_cpu():
    q, k, v = random_qkv(2, 40, 4, 2, 8, requires_grad=True)
    results = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        out = moba.moba_attn_func(q, k, v, 6, 3, backend="torch")
        out.backward(torch.ones_like(out))
        results.append([out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_varlen_max_seqlen_upper_bound_gives_same_result():
    q, k, v, cu, m = random_varlen([9, 14], 2, 1, 8, torch.float64)
    a = moba.moba_attn_varlen_func(q, k, v, cu, m, 4, 2, backend="torch")
    b = moba.moba_attn_varlen_func(q, k, v, cu, 1000, 4, 2, backend="torch")
    assert torch.equal(a, b)


def test_varlen_blocks_restart_at_each_sequence():
    """Two copies of the same sequence packed back to back give identical outputs, even when
    the first length is not a multiple of block_size (blocks start at each sequence)."""
    q1, k1, v1 = (x[0] for x in random_qkv(1, 13, 2, 1, 8, torch.float64))
    q, k, v = (torch.cat([x, x]) for x in (q1, k1, v1))
    cu = cu_seqlens_of([13, 13])
    for top_k in (1, 2, 3):
        out = moba.moba_attn_varlen_func(q, k, v, cu, 13, 5, top_k, backend="torch")
        torch.testing.assert_close(out[:13], out[13:], rtol=0, atol=1e-14)
        single = moba.moba_attn_func(q1[None], k1[None], v1[None], 5, top_k, backend="torch")[0]
        torch.testing.assert_close(out[13:], single, rtol=0, atol=1e-14)


@pytest.mark.gpu
def test_gpu_marker_is_skipped_without_cuda():
    """conftest skips ``gpu`` tests without CUDA: on a CPU-only machine this never runs (if
    the hook broke, it would run and fail); with CUDA it checks a CUDA round trip."""
    assert torch.cuda.is_available()
    q, k, v = random_qkv(1, 16, 2, 1, 8)
    out = moba.moba_attn_func(q.cuda(), k.cuda(), v.cuda(), 4, 2, backend="torch")
    torch.testing.assert_close(
        out.cpu(), moba.moba_attn_func(q, k, v, 4, 2, backend="torch"), rtol=1e-5, atol=1e-5
    )


def test_auto_skips_triton_for_inputs_it_does_not_handle():
    """"auto" must never pick a backend that would reject the input (float64, head dim > 256)."""
    from moba.ops.registry import _BACKENDS, Backend, resolve_backend

    fake = Backend(
        name="triton",
        attention=None,
        select=None,
        unavailable_reason=lambda device: None,  # pretend it runs on this device
        unsupported_input=lambda q: None if q.dtype == torch.float32 else "float32 only",
    )
    saved = _BACKENDS.get("triton")
    _BACKENDS["triton"] = fake
    try:
        cuda = torch.device("cuda")
        assert resolve_backend("auto", cuda, torch.empty(1, 1, 8, dtype=torch.float32)).name == "triton"
        assert resolve_backend("auto", cuda, torch.empty(1, 1, 8, dtype=torch.float64)).name == "torch"
    finally:
        if saved is None:
            _BACKENDS.pop("triton")
        else:
            _BACKENDS["triton"] = saved
