"""Differential fuzzing of the Triton backend in the Triton interpreter (CPU), against the float64
reference by the tolerance rule, as ``test_fuzz_op.py`` does for the other backends.

Runs only with TRITON_INTERPRET=1 set before Triton is imported (the interpreter is chosen when
a kernel is decorated): ``test_fuzz_triton_interpret.py`` starts it in such a subprocess; in any
other session it skips itself. The interpreter is slow, so the budget is smaller, the sequences
shorter, and the dtypes float16 / float32 (it has no bfloat16 ``tl.dot``; see KNOWN_BUGS).
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 at import; run through test_fuzz_triton_interpret.py", allow_module_level=True)

from hypothesis import assume, given  # noqa: E402

from tests._helpers import fuzz_known_bugs, fuzz_op_problems, fuzz_replay, fuzz_settings  # noqa: E402

DTYPES = ("float16", "float32") + (() if "triton_interpreter_bf16" in fuzz_known_bugs() else ("bfloat16",))


@fuzz_settings(12)
@given(p=fuzz_op_problems(backends=("triton",), dtypes=DTYPES, max_len=20, long_sequences=False))
def test_triton_matches_the_float64_reference(p):
    assume(fuzz_replay("op", p))
