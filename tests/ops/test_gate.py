"""The MoBA gate (``moba.select_blocks`` / ``select_blocks_varlen``) against a brute-force
gate written in plain Python loops (docs/design.md section 1, steps 1-5), and its invariants."""

from __future__ import annotations

import math

import pytest
import torch

import moba
from tests._helpers import assert_gate_matches_brute_force, cu_seqlens_of, random_qkv, random_varlen

# (B, S, Hq, Hkv, D, block_size, top_k)
GATE_CASES = [
    pytest.param(2, 30, 4, 2, 8, 4, 3, id="gqa-bs4-k3"),
    pytest.param(1, 41, 4, 1, 8, 7, 2, id="mqa-bs7-k2"),
    pytest.param(2, 25, 2, 2, 4, 5, 1, id="mha-bs5-k1"),
    pytest.param(1, 23, 4, 2, 8, 3, 4, id="gqa-bs3-k4"),
    pytest.param(1, 26, 2, 1, 8, 12, 5, id="bs12-kall"),
    pytest.param(1, 13, 2, 1, 4, 1, 3, id="bs1"),
    pytest.param(1, 6, 2, 2, 4, 10, 3, id="one-block"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("b,s,hq,hkv,d,bs,top_k", GATE_CASES)
def test_select_blocks_matches_brute_force(causal, b, s, hq, hkv, d, bs, top_k):
    q, k, _ = random_qkv(b, s, hq, hkv, d, torch.float32)
    idx = moba.select_blocks(q, k, bs, top_k, causal)
    n_blocks = math.ceil(s / bs)
    width = min(top_k, n_blocks)
    assert idx.dtype == torch.int32
    assert idx.shape == (b, s, hq, width)
    for i in range(b):
        assert_gate_matches_brute_force(idx[i], q[i], k[i], bs, top_k, causal, width)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "lengths,hq,hkv,bs,top_k",
    [
        pytest.param([17, 0, 1, 26, 9], 4, 2, 5, 3, id="gqa-bs5-k3"),
        pytest.param([0, 1, 0, 33], 2, 1, 7, 2, id="mqa-bs7-k2"),
        pytest.param([8, 19], 4, 4, 3, 9, id="mha-bs3-kall"),
    ],
)
def test_select_blocks_varlen_matches_brute_force(causal, lengths, hq, hkv, bs, top_k):
    q, k, _, cu, max_s = random_varlen(lengths, hq, hkv, 8, torch.float32)
    idx = moba.select_blocks_varlen(q, k, cu, max_s, bs, top_k, causal)
    width = min(top_k, math.ceil(max(lengths) / bs))
    assert idx.dtype == torch.int32
    assert idx.shape == (q.shape[0], hq, width)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:  # block indices are local to each sequence
            assert_gate_matches_brute_force(idx[a:b], q[a:b], k[a:b], bs, top_k, causal, width)


@pytest.mark.parametrize("top_k", [1, 2, 3, 100])
def test_causal_gate_never_selects_future_or_incomplete_blocks(top_k):
    q, k, _ = random_qkv(2, 47, 4, 2, 8)
    bs = 6
    idx = moba.select_blocks(q, k, bs, top_k, causal=True)
    own = (torch.arange(47) // bs)[None, :, None, None]
    valid = idx != moba.PAD_INDEX
    assert not (valid & (idx > own)).any()
    assert (idx == own).any(dim=-1).all()  # own block always present
    # every selected block other than the own block is complete and before t
    complete_before = valid & (idx < own)
    assert ((idx[complete_before].long() + 1) * bs <= 47).all()


def test_top_k_1_selects_only_own_block():
    q, k, _ = random_qkv(2, 30, 4, 1, 8)
    for causal in (True, False):
        idx = moba.select_blocks(q, k, 7, 1, causal)
        assert idx.shape == (2, 30, 4, 1)
        expected = (torch.arange(30) // 7).to(torch.int32)[None, :, None, None].expand(2, 30, 4, 1)
        assert torch.equal(idx, expected)


def test_gate_padding_layout():
    """Causal, early queries have fewer candidates than top_k - 1: PAD_INDEX fills the tail."""
    q, k, _ = random_qkv(1, 20, 2, 1, 4)
    idx = moba.select_blocks(q, k, 4, 4, causal=True)  # 5 blocks, width 4
    assert idx.shape == (1, 20, 2, 4)
    # query 0 (block 0): only the own block
    assert idx[0, 0, 0].tolist() == [0, -1, -1, -1]
    # query 5 (block 1): own block + block 0
    assert idx[0, 5, 0].tolist() == [0, 1, -1, -1]
    # query 19 (block 4): own + 3 of the 4 past blocks
    row = idx[0, 19, 0].tolist()
    assert row[-1] == 4 and len(set(row)) == 4 and -1 not in row


def test_gqa_head_mapping():
    """Query head h reads KV head h // (Hq // Hkv): steer each KV head to a different block."""
    s, bs, d = 40, 8, 4  # 5 blocks
    q = torch.zeros(1, s, 4, d)
    q[..., 0] = 1.0  # every query head looks along dimension 0
    k = torch.zeros(1, s, 2, d)
    k[0, 0:8, 0, 0] = 5.0  # KV head 0: block 0 is the best past block
    k[0, 16:24, 1, 0] = 5.0  # KV head 1: block 2 is the best past block
    idx = moba.select_blocks(q, k, bs, 2, causal=True)
    last = idx[0, s - 1]  # own block 4
    assert last[0].tolist() == [0, 4] and last[1].tolist() == [0, 4]  # heads 0, 1 -> KV head 0
    assert last[2].tolist() == [2, 4] and last[3].tolist() == [2, 4]  # heads 2, 3 -> KV head 1


def test_tail_block_mean_over_actual_tokens():
    """The tail block's representative is the mean over the tokens it has (not / block_size)."""
    bs, d = 8, 2
    s = 2 * bs + 2  # blocks 0, 1 complete, block 2 has 2 tokens
    q = torch.zeros(1, s, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, s, 1, d)
    k[0, bs : 2 * bs, 0, 0] = 1.0  # block 1 mean = 1.0
    k[0, 2 * bs :, 0, 0] = 3.0  # block 2 mean = 3.0 (3 * 2 / 8 = 0.75 if divided by block_size)
    idx = moba.select_blocks(q, k, bs, 2, causal=False)
    assert idx[0, 0, 0].tolist() == [0, 2]


def test_gate_scores_in_float32_for_half_inputs():
    """The gate scores in float32: half inputs select exactly as their float32 upcast."""
    q, k, _ = random_qkv(2, 40, 4, 2, 16, torch.float16)
    for causal in (True, False):
        a = moba.select_blocks(q, k, 6, 3, causal)
        b = moba.select_blocks(q.float(), k.float(), 6, 3, causal)
        assert torch.equal(a, b)


def test_gate_of_a_sequence_ignores_other_sequences():
    """Selection of a sequence depends on its own q and k only."""
    q, k, _, cu, max_s = random_varlen([15, 22, 9], 2, 1, 8)
    idx = moba.select_blocks_varlen(q, k, cu, max_s, 4, 3, causal=False)
    k2 = k.clone()
    k2[:15] = torch.randn(15, 1, 8) * 10  # change sequence 0's keys only
    q2 = q.clone()
    q2[:15] = torch.randn(15, 2, 8)
    idx2 = moba.select_blocks_varlen(q2, k2, cu, max_s, 4, 3, causal=False)
    assert torch.equal(idx[15:], idx2[15:])
    assert not torch.equal(idx[:15], idx2[:15])  # the change did matter to sequence 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_key_does_not_leak_into_other_batch_elements(bad):
    """A NaN/inf key in batch element 0 must not change the gate of batch element 1.

    Regression: padding slots of a tail block gather key token 0; removing them by
    multiplying with the validity mask turned NaN/inf into NaN in every tail block's mean.
    """
    torch.manual_seed(0)
    q = torch.randn(2, 10, 1, 4)
    k = torch.randn(2, 10, 1, 4)
    clean = moba.select_blocks(q, k, 4, 2, causal=False)
    k_bad = k.clone()
    k_bad[0, 0, 0, 0] = bad
    dirty = moba.select_blocks(q, k_bad, 4, 2, causal=False)
    assert torch.equal(clean[1], dirty[1])


def test_select_blocks_varlen_on_fixed_equals_select_blocks():
    q, k, _ = random_qkv(3, 21, 4, 2, 8)
    a = moba.select_blocks(q, k, 5, 3, causal=False)
    cu = cu_seqlens_of([21, 21, 21])
    b = moba.select_blocks_varlen(q.reshape(63, 4, 8), k.reshape(63, 2, 8), cu, 21, 5, 3, causal=False)
    assert torch.equal(a.reshape(63, 4, 3), b)


def test_gate_empty_inputs():
    q, k, _, cu, max_s = random_varlen([0, 0], 2, 1, 4)
    idx = moba.select_blocks_varlen(q, k, cu, max_s, 4, 3)
    assert idx.shape[:2] == (0, 2) and idx.dtype == torch.int32
