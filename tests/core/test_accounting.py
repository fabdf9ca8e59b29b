"""moba._core.accounting: the one count of attended pairs (bench and scaling_runs import it),
checked against a brute-force count from the contract and against the gate's real selections."""

from __future__ import annotations

import pytest
import torch

import moba
from moba._core import accounting as acc
from moba._core import hardware


def _brute_keys(seqlen: int, block_size: int, top_k: int) -> tuple[int, int]:
    """Sum over causal queries of the keys attended and of the gate's candidate blocks."""
    keys = cands = 0
    for t in range(seqlen):
        own = t // block_size
        keys += t - own * block_size + 1 + min(top_k - 1, own) * block_size
        cands += own
    return keys, cands


@pytest.mark.parametrize("seqlen,block_size,top_k", [(1, 4, 1), (8, 4, 1), (10, 4, 2), (37, 5, 3), (64, 8, 16)])
def test_pair_counts_match_brute_force(seqlen, block_size, top_k):
    keys, cands = _brute_keys(seqlen, block_size, top_k)
    assert acc.moba_pairs(seqlen, block_size, top_k) == keys
    assert acc.gate_candidates(seqlen, block_size) == cands
    assert acc.dense_pairs(seqlen) == seqlen * (seqlen + 1) // 2


def test_counts_from_selections_match_the_structure():
    """Complete past blocks only (causal): the selections' count equals the analytic one."""
    q = torch.randn(2, 37, 4, 8)
    k = torch.randn(2, 37, 2, 8)
    idx = moba.select_blocks(q, k, 5, 3, causal=True)
    per_query = acc.attended_keys_from_indices(idx, 5)
    assert per_query.shape == (2, 37, 4)
    assert int(per_query.sum()) == 2 * 4 * acc.moba_pairs(37, 5, 3)
    # a slice of queries with its offset counts the same
    tail = acc.attended_keys_from_indices(idx[:, 30:], 5, offset=30, seqlen=37)
    assert torch.equal(tail, per_query[:, 30:])


def test_attention_flops_modes():
    assert acc.attention_flops(10, 64) == 4 * 64 * 10
    assert acc.attention_flops(10, 64, "fwd+bwd") == 3.5 * acc.attention_flops(10, 64)


def test_hardware_table_lookup():
    assert hardware.find_device("NVIDIA H100 80GB HBM3").label == "H100 SXM"
    assert hardware.find_device("NVIDIA L40S").key == "L40S"  # not the L4 row
    assert hardware.peak_flops("Some Other GPU") is None
    assert hardware.caveat("NVIDIA H100 PCIe")
