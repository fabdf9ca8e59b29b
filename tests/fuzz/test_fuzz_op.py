"""Differential fuzzing of the op: ``moba_attn_func`` / ``moba_attn_varlen_func`` on every CPU
backend against the float64 reference, by the tolerance rule (docs/design.md section 3).

Each example is a random problem (``tests._helpers.fuzz_op_problems``): shapes, GQA ratios, head
dims 1..256, dtypes, packs with empty and one-token sequences, fewer queries than keys, strided
and expanded q/k/v, causal or not, top_k and block sizes from 1 to beyond the sequence,
return_lse, the gate or explicit block indices. A failure prints a one-line reproducer.
``make test`` runs a fixed set of examples (a count, not a time); ``make fuzz`` runs fresh
ones for as long as asked. The Triton backend runs in ``test_fuzz_triton_interpret.py``.
"""

from __future__ import annotations

from hypothesis import assume, given

from tests._helpers import fuzz_op_problems, fuzz_replay, fuzz_settings


@fuzz_settings(400)
@given(p=fuzz_op_problems())
def test_backends_match_the_float64_reference(p):
    assume(fuzz_replay("op", p))
