"""One replayed fuzz problem per bug the fuzzers found or were built to find: a regression test
for the fixed ones, an ``xfail(strict=False)`` for those still in ``tests._helpers.KNOWN_BUGS``
(the regions the fuzzers stay out of); once a fix lands and the name is deleted, its case must
pass (and the fuzzers cover the region again). The Triton bfloat16 case runs in ``test_fuzz_triton_interpret_cases.py``."""

from __future__ import annotations

import pytest

from tests._helpers import KNOWN_BUGS, fuzz_replay

OP = {"backends": ["reference", "torch"], "dtype": "float32", "hkv": 4, "group": 1, "d": 16, "form": "fixed",
      "b": 1, "sq": 48, "sk": 48, "block_size": 8, "top_k": 2, "width": 2, "causal": True, "scale": None,
      "return_lse": False, "backward": True, "indices": "gate", "layouts": ["contiguous"] * 3, "mag": 1.0, "seed": 0}
FLEX = {"b": 1, "sq": 24, "sk": 24, "hkv": 1, "group": 1, "d": 8, "dtype": "float32", "block_size": 4, "top_k": 2,
        "width": 1, "causal": True, "q_block": 8, "layout": "bshd", "indices": "gate", "scale": None, "seed": 0}

CASES = {
    "torch_strided_last_dim": [("op", dict(OP, layouts=["last2", "last3", "expand_last"]))],
    "lse_zero_queries": [("op", dict(OP, b=0, return_lse=True)), ("op", dict(OP, sq=0, return_lse=True))],
    "reference_fp16_overflow": [("op", dict(OP, dtype="float16", d=256, mag=40.0, backward=False))],
    "softmax_scale_overflow": [("op", dict(OP, scale=1e300))],
    "torch_lowp_large_logits": [("op", dict(OP, dtype="float16", hkv=3, group=4, d=1, form="varlen", lens_q=[29],
                                            lens_k=[29], block_size=1, top_k=10**9, causal=False, scale=3.0,
                                            mag=4.0, seed=453))],
    "varlen_lq_gt_lk_dense": [("errors", {"backends": ["torch"], "bad": "lq_gt_lk", "lens_q": [6, 6], "lens_k": [5, 7],
                                          "hkv": 1, "group": 1, "d": 8, "block_size": 4, "top_k": 10, "width": 1,
                                          "causal": True, "where": 0, "seed": 0})],
    "block_mean_state_reuse": [("decode", {"b": 1, "hkv": 1, "group": 1, "d": 8, "dtype": "float32", "block_size": 4,
                                           "top_k": 2, "scale": None, "starts": [0], "prompt": 12,
                                           "prefill_update": True, "steps": [["chunk", 1], ["other", 1], ["chunk", 1]],
                                           "cache": "contiguous", "seed": 0})],
    "flex_huge_sizes": [("flex", dict(FLEX, block_size=2**63)), ("flex", dict(FLEX, block_size=2**64 + 1)),
                        ("flex", dict(FLEX, q_block=10**6))],
}


def _params():
    for name, cases in CASES.items():
        marks = [pytest.mark.xfail(strict=False, reason=f"known bug: {name}")] if name in KNOWN_BUGS else []
        for i, (kind, problem) in enumerate(cases):
            yield pytest.param(name, kind, problem, id=f"{name}-{i}", marks=marks)


def test_every_known_bug_has_a_case():
    assert set(CASES) | {"triton_interpreter_bf16"} >= KNOWN_BUGS


@pytest.mark.parametrize("name,kind,problem", list(_params()))
def test_known_bug_region(name, kind, problem, monkeypatch):
    # the region is open for this case: every other known bug stays excluded
    monkeypatch.setenv("MOBA_FUZZ_KNOWN_BUGS", ",".join(sorted(KNOWN_BUGS - {name})) or "none")
    assert fuzz_replay(kind, problem)
