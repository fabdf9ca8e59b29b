"""Differential fuzzing of the API surfaces around the op (``tests._helpers`` fuzz section):

* invalid input: wherever the reference raises a ValueError, every backend does;
* ``moba_decode`` step by step (chunks, crops, left padding, another cache) vs a prefill;
  ``BlockMeanState`` means vs means recomputed from the cache;
* ``flex_block_mask`` + FlexAttention vs the op;
* the transformers attention function (padding, packed rows, decoding) vs ``MoBAAttention``.

Each compares with the float64 reference by the tolerance rule; a failure prints a one-line
reproducer. Example counts, not time, bound the run (``make fuzz`` runs more).
"""

from __future__ import annotations

from hypothesis import assume, given

from tests._helpers import (
    fuzz_decode_problems,
    fuzz_error_problems,
    fuzz_flex_problems,
    fuzz_replay,
    fuzz_settings,
    fuzz_transformers_problems,
)


@fuzz_settings(60)
@given(p=fuzz_error_problems())
def test_invalid_input_raises_on_every_backend(p):
    assume(fuzz_replay("errors", p))


@fuzz_settings(40)
@given(p=fuzz_decode_problems())
def test_decode_matches_prefill_and_block_means(p):
    assume(fuzz_replay("decode", p))


@fuzz_settings(30)
@given(p=fuzz_flex_problems())
def test_flex_block_mask_matches_the_op(p):
    assume(fuzz_replay("flex", p))


@fuzz_settings(40)
@given(p=fuzz_transformers_problems())
def test_transformers_attention_matches_the_module(p):
    assume(fuzz_replay("hf", p))
