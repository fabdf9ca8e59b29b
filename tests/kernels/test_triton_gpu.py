"""The Triton backend on a CUDA GPU: bf16 and fp16, up to 64K tokens.

Skipped without CUDA (no CUDA call at import time). Tolerance rule (docs/design.md): truth =
float64 reference, kernel max error <= 2x (outputs) / 3x (gradients) the error of the same
reference run in the low precision, plus a tiny absolute floor. The dense reference is
O(S^2), so beyond a few thousand tokens the truth is the PyTorch path run on float32 copies
of the inputs (it computes in float32) and the low-precision baseline is the same path on
the low-precision inputs; the floor there is larger (see ``_LONG_FLOOR``), because that
baseline only rounds its output while the kernel also rounds probabilities to 16 bits.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="GPU tests need compiled kernels"),
]

_FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
_LONG_FLOOR = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float16, torch.bfloat16]


def _make(cu_q, cu_k, hq, hkv, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(cu_q[-1], hq, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(cu_k[-1], hkv, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(cu_k[-1], hkv, d, device="cuda", generator=gen).to(dtype)
    return q, k, v


def _run(fn, q, k, v, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _assert_rule(got, low, truth, floor):
    for i, (name, g, lo, tr) in enumerate(zip(["out", "dq", "dk", "dv"], got, low, truth, strict=True)):
        err = (g.double() - tr.double()).abs().max().item()
        ref_err = (lo.double() - tr.double()).abs().max().item()
        factor = 2.0 if i == 0 else 3.0
        assert err <= factor * ref_err + floor, f"{name}: kernel error {err:.3g} > {factor} x reference error {ref_err:.3g}"


CASES = [
    # cu, hq, hkv, d, block_size, top_k, causal
    pytest.param([0, 1024, 2048], 8, 2, 64, 128, 3, True, id="fixed-gqa-d64"),
    pytest.param([0, 2048], 4, 4, 128, 256, 3, True, id="d128"),
    pytest.param([0, 2048], 4, 1, 128, 256, 3, False, id="mqa-noncausal-d128"),
    pytest.param([0, 300, 300, 1500, 2000], 4, 2, 64, 100, 4, True, id="varlen-empty-bs100"),
    pytest.param([0, 1000], 2, 1, 32, 64, 1, True, id="top1-d32"),
    pytest.param([0, 1000], 2, 2, 96, 60, 100, True, id="dense-d96"),
    pytest.param([0, 1000], 2, 1, 256, 128, 3, True, id="d256"),
]


@pytest.mark.parametrize("decomposition", ["union", "gather"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cu,hq,hkv,d,block_size,top_k,causal", CASES)
def test_matches_reference(cu, hq, hkv, d, block_size, top_k, causal, dtype, decomposition):
    from moba._core.layout import build_layout
    from moba.ops.gate import select_packed
    from moba.ops.naive import reference_attention_packed
    from moba.ops.triton_impl import triton_attention_packed

    q, k, v = _make(cu, cu, hq, hkv, d, dtype)
    layout = build_layout(cu, cu, block_size, "cuda")
    idx = select_packed(q, k, layout, top_k, causal)
    scale = d**-0.5
    dout = torch.randn_like(q)
    ref = lambda a, b, c: reference_attention_packed(a, b, c, layout, idx, causal, scale)  # noqa: E731
    truth = _run(ref, q, k, v, dout, torch.float64)
    low = _run(ref, q, k, v, dout, dtype)
    attn = lambda a, b, c: triton_attention_packed(a, b, c, cu, cu, block_size, idx, causal, scale, decomposition)[0]  # noqa: E731
    got = _run(attn, q, k, v, dout, dtype)
    _assert_rule(got, low, truth, _FLOOR[dtype])


@pytest.mark.parametrize("decomposition", ["union", "gather"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen", [16384, 65536])
def test_long_sequence(seqlen, dtype, decomposition):
    from moba._core.layout import build_layout
    from moba.ops.gate import select_packed
    from moba.ops.torch_impl import sparse_attention_packed
    from moba.ops.triton_impl import triton_attention_packed

    cu, block_size, top_k, d = [0, seqlen], 512, 3, 128
    q, k, v = _make(cu, cu, 4, 1, d, dtype)
    layout = build_layout(cu, cu, block_size, "cuda")
    idx = select_packed(q, k, layout, top_k, True)
    scale = d**-0.5
    dout = torch.randn_like(q)
    ref = lambda a, b, c: sparse_attention_packed(a, b, c, layout, idx, True, scale)[0]  # noqa: E731
    truth = _run(ref, q, k, v, dout, torch.float32)
    low = _run(ref, q, k, v, dout, dtype)
    attn = lambda a, b, c: triton_attention_packed(a, b, c, cu, cu, block_size, idx, True, scale, decomposition)[0]  # noqa: E731
    got = _run(attn, q, k, v, dout, dtype)
    _assert_rule(got, low, truth, _LONG_FLOOR[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen,block_size,top_k", [(4096, 128, 3), (65536, 512, 3), (65536, 1000, 12)])
def test_gate_matches_torch_gate(seqlen, block_size, top_k, causal, dtype):
    from moba._core.layout import build_layout
    from moba.ops.gate import select_packed
    from moba.ops.triton_impl import triton_gate

    cu = [0, seqlen // 4, seqlen]
    q, k, _ = _make(cu, cu, 4, 2, 64, dtype, seed=1)
    layout = build_layout(cu, cu, block_size, "cuda")
    expected = select_packed(q, k, layout, top_k, causal)
    got = triton_gate(q, k, cu, cu, block_size, top_k, causal)
    assert got.shape == expected.shape
    # Scores are float32 in both, but summed in a different order: only near-ties may flip.
    differing_rows = (got != expected).any(-1).float().mean().item()
    assert differing_rows <= 1e-3, differing_rows


@pytest.mark.parametrize("decomposition", ["union", "gather"])
def test_backward_is_deterministic(decomposition):
    from moba._core.layout import build_layout
    from moba.ops.gate import select_packed
    from moba.ops.triton_impl import triton_attention_packed

    cu = [0, 4096, 8192]
    q, k, v = _make(cu, cu, 8, 2, 64, torch.bfloat16)
    idx = select_packed(q, k, build_layout(cu, cu, 256, "cuda"), 3, True)
    dout = torch.randn_like(q)
    attn = lambda a, b, c: triton_attention_packed(a, b, c, cu, cu, 256, idx, True, 0.125, decomposition)[0]  # noqa: E731
    first = _run(attn, q, k, v, dout, torch.bfloat16)
    second = _run(attn, q, k, v, dout, torch.bfloat16)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decomposition", ["union", "gather", "auto"])
def test_no_host_sync_under_sync_debug_mode(decomposition):
    """Layout, Triton gate, forward and backward raise under torch's sync debug mode "error"
    on any synchronizing CUDA call (item, nonzero, pageable copies, size-dependent ops), "auto"
    included (its choice stays a device flag). A warm-up call compiles the kernels first."""
    from moba._core.layout import build_layout
    from moba.ops.triton_impl import BACKEND, triton_attention_packed

    cu = [0, 1024, 3072]
    q, k, v = _make(cu, cu, 8, 2, 64, torch.bfloat16, seed=3)
    dout = torch.randn_like(q)

    def step():
        layout = build_layout(cu, cu, 128, "cuda")
        idx = BACKEND.select(q, k, layout, 3, True)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = triton_attention_packed(*leaves, cu, cu, 128, idx, True, 0.125, decomposition)
        out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    expected = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_public_api_and_auto_backend():
    import moba

    assert moba.available_backends("cuda")["triton"] is None
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(2, 2048, 8, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(2, 2048, 2, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(2, 2048, 2, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx = moba.select_blocks(q, k, 256, 3)
    out = moba.moba_attn_func(q, k, v, 256, 3, backend="auto", block_indices=idx)
    ref = moba.moba_attn_func(q, k, v, 256, 3, backend="torch", block_indices=idx)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)


def test_torch_compile_inductor():
    from moba._core.layout import build_layout
    from moba.ops.gate import select_packed
    from moba.ops.triton_impl import triton_attention_packed

    cu = [0, 1024, 2048]
    q, k, v = _make(cu, cu, 4, 2, 64, torch.float16)
    idx = select_packed(q, k, build_layout(cu, cu, 128, "cuda"), 3, True)

    def f(q, k, v):
        return triton_attention_packed(q, k, v, cu, cu, 128, idx, True, 0.125)[0].float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    grads = []
    for fn in (f, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_float32_inputs():
    from moba._core.layout import build_layout
    from moba.ops.gate import select_packed
    from moba.ops.naive import reference_attention_packed
    from moba.ops.triton_impl import triton_attention_packed

    cu = [0, 1000]
    q, k, v = _make(cu, cu, 2, 1, 64, torch.float32)
    layout = build_layout(cu, cu, 64, "cuda")
    idx = select_packed(q, k, layout, 3, True)
    out, _ = triton_attention_packed(q, k, v, cu, cu, 64, idx, True, 0.125)
    ref = reference_attention_packed(q.double(), k.double(), v.double(), layout, idx, True, 0.125)
    # float32 tl.dot uses TF32 on tensor cores: fp16-like accuracy.
    assert (out.double() - ref).abs().max().item() < 5e-3
