"""Silent wrong results found by an adversarial pass, each pinned: strided inputs, layouts the
dense shortcut skipped, block sizes past int64, empty lse, float16 overflow in the reference,
float32-infinite scales, q_block memory, and the layout cache under threads."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import pytest
import torch

import moba
from moba.ops import torch_impl
from tests._helpers import cu_seqlens_of, random_qkv

BACKENDS = ("torch", "reference")


def _strided(shape, step, seed):
    """A (B, S, H, D) view whose last-dim stride is ``step`` (x[..., ::step] of a wider tensor)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(*shape[:-1], shape[-1] * step, generator=g, dtype=torch.float64).float()
    return wide[..., ::step].requires_grad_()


def _run(q, k, v, **kw):
    out = moba.moba_attn_func(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return out, grads


# (seqlen, block_size, top_k): the torch path's CPU formulations (torch_impl.gated_path): dense
# mask, the flash tile path, the plain tile path, the dense shortcut
FORMULATIONS = [(48, 16, 2), (1024, 64, 3), (300, 16, 1), (48, 16, 99)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen, block_size, top_k", FORMULATIONS)
def test_last_dim_stride_is_not_read_as_one(backend, seqlen, block_size, top_k):
    """q[..., ::2] gives the same output and gradients as its contiguous copy."""
    q, k, v = (_strided((1, seqlen, 4, 32), 2, s) for s in range(3))
    assert q.stride(-1) == 2
    kw = dict(block_size=block_size, top_k=top_k, backend=backend)
    out, grads = _run(q, k, v, **kw)
    leaves = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    ref, ref_grads = _run(*leaves, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_fused_qkv_split_with_last_dim_stride_three():
    """The einops split of a fused projection (b s (h d three) -> three b s h d): stride 3."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 64, 4 * 16 * 3, generator=g)
    q, k, v = qkv.view(2, 64, 4, 16, 3).permute(4, 0, 1, 2, 3)
    assert q.stride(-1) == 3
    for top_k in (2, 99):
        out = moba.moba_attn_func(q, k, v, block_size=8, top_k=top_k, backend="torch")
        ref = moba.moba_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), block_size=8, top_k=top_k,
                                  backend="torch")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 99])
def test_more_queries_than_keys_raises_on_every_path(backend, top_k):
    """The dense shortcut (top_k covering every block) checks the layout like the reference."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 2, 8, generator=g)
    k, v = torch.randn(12, 2, 8, generator=g), torch.randn(12, 2, 8, generator=g)
    cu_q, cu_k = cu_seqlens_of([6, 6]), cu_seqlens_of([5, 7])
    with pytest.raises(ValueError, match=r"sequence 0 has more queries \(6\) than keys \(5\)"):
        moba.moba_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 7, block_size=4, top_k=top_k, backend=backend)


def test_flex_block_mask_huge_block_size():
    """A block size above Sk is one block per sequence (as block_size = Sk): 2**63 - 1 overflowed
    int64 silently, 2**64 raised OverflowError."""
    q, k, _ = random_qkv(1, 24, 2, 2, 8, torch.float32)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    same = _dense_mask(moba.flex_block_mask(q, k, block_size=24, top_k=2), 24, 24)
    assert torch.equal(same, torch.ones(24, 24, dtype=torch.bool).tril().expand_as(same))  # dense causal
    for block_size in (2**63 - 1, 2**64, 10**40):
        huge = moba.flex_block_mask(q, k, block_size=block_size, top_k=2)
        assert torch.equal(_dense_mask(huge, 24, 24), same)


def _dense_mask(mask, sq, sk) -> torch.Tensor:
    """(B, H, Sq, Sk) bool: the BlockMask's mask_mod evaluated where its blocks are attended."""
    b, h = mask.kv_num_blocks.shape[:2]
    bi, hi, qi, ki = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(sq), torch.arange(sk), indexing="ij")
    keep = mask.mask_mod(bi, hi, qi, ki)
    block = mask.to_dense()  # (B, H, nq, nk) block-level
    qb, kb = mask.BLOCK_SIZE
    return keep & block[bi, hi, qi // qb, ki // kb].bool()


def test_flex_block_mask_q_block_does_not_grow_memory():
    """q_block far beyond Sq builds the same mask (one query tile) without a q_block-sized buffer."""
    q, k, _ = random_qkv(1, 24, 2, 2, 8, torch.float32)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    big = moba.flex_block_mask(q, k, block_size=4, top_k=2, q_block=10**12)  # 10**12 rows could not be allocated
    ref = moba.flex_block_mask(q, k, block_size=4, top_k=2, q_block=32)
    assert torch.equal(_dense_mask(big, 24, 24), _dense_mask(ref, 24, 24))


@pytest.mark.parametrize("shape", [(0, 8, 4, 16), (2, 0, 4, 16)])
def test_return_lse_with_no_queries(shape):
    b, sq, hq, d = shape
    q = torch.randn(b, sq, hq, d)
    k = v = torch.randn(b, 8, 2, d)
    for backend in BACKENDS:
        out, lse = moba.moba_attn_func(q, k, v, block_size=4, top_k=2, backend=backend, return_lse=True)
        assert out.shape == q.shape and lse.shape == (b, hq, sq)


def test_reference_float16_scores_do_not_overflow():
    """|q.k| beyond float16's range: the reference stays finite, like the float64 truth."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 16, 2, 8, generator=g) * 150).half()
    k = (torch.randn(1, 16, 2, 8, generator=g) * 150).half()
    v = torch.randn(1, 16, 2, 8, generator=g).half()
    assert bool((q.float()[0, :, 0] @ k.float()[0, :, 0].T).abs().max() > 65504)
    truth = moba.moba_attn_func(q.double(), k.double(), v.double(), block_size=4, top_k=2, backend="reference")
    out = moba.moba_attn_func(q, k, v, block_size=4, top_k=2, backend="reference")
    assert bool(torch.isfinite(truth).all()) and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=2e-2)


@pytest.mark.parametrize("scale", [1e300, 1e-300, float("inf")])
def test_softmax_scale_outside_float32_is_refused(scale):
    q, k, v = random_qkv(1, 8, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="softmax_scale"):
        moba.moba_attn_func(q, k, v, block_size=4, top_k=2, softmax_scale=scale)
    with pytest.raises(ValueError, match="softmax_scale"):
        moba.MoBAConfig(block_size=4, top_k=2, softmax_scale=scale)


def test_layout_cache_is_thread_safe(monkeypatch):
    """Threads that share the layout LRU cache (more layouts than it holds) never see a KeyError.

    The cache's lookup yields the thread after reading, so that another thread can evict the
    entry before it is moved to the end: the interleaving that raised at random before.
    """

    class YieldingCache(OrderedDict):
        def get(self, key, default=None):
            value = super().get(key, default)
            time.sleep(0)  # give up the GIL: widens the window between lookup and reorder
            return value

    monkeypatch.setattr(torch_impl, "_LAYOUT_CACHE", YieldingCache())
    errors: list[BaseException] = []
    lengths = [[4 + i, 3] for i in range(torch_impl._LAYOUT_CACHE_SIZE + 4)]

    def work(seed):
        try:
            for i in range(200):
                cu = lengths[(seed * 7 + i) % len(lengths)]
                bounds = [0, cu[0], cu[0] + cu[1]]
                torch_impl._static_layout(bounds, bounds, 2, "cpu")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, repr(errors[0])
    assert len(torch_impl._LAYOUT_CACHE) <= torch_impl._LAYOUT_CACHE_SIZE


def test_threaded_calls_equal_single_threaded_ones(monkeypatch):
    """The promise behind the lock: several threads calling the op at once (more sequence
    layouts than the layout cache holds) get exactly the single-threaded results."""

    class YieldingCache(OrderedDict):
        def get(self, key, default=None):
            value = super().get(key, default)
            time.sleep(0)
            return value

    monkeypatch.setattr(torch_impl, "_LAYOUT_CACHE", YieldingCache())
    g = torch.Generator().manual_seed(3)
    cases = []
    for i in range(torch_impl._LAYOUT_CACHE_SIZE + 4):
        lengths = [9 + i, 5]
        cu = cu_seqlens_of(lengths)
        q, k, v = (torch.randn(sum(lengths), 2, 8, generator=g) for _ in range(3))
        cases.append((q, k, v, cu, max(lengths)))

    def call(case):
        q, k, v, cu, m = case
        return moba.moba_attn_varlen_func(q, k, v, cu, m, block_size=2, top_k=2, backend="torch")

    expected = [call(c) for c in cases]
    errors: list[BaseException] = []

    def work(seed):
        try:
            for i in range(60):
                j = (seed * 5 + i) % len(cases)
                if not torch.equal(call(cases[j]), expected[j]):
                    raise AssertionError(f"case {j} differs under threads")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, repr(errors[0])
