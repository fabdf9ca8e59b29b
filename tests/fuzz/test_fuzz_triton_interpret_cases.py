"""Differential fuzzing of the Triton backend in the Triton interpreter (CPU), against the float64
reference by the tolerance rule, as ``test_fuzz_op.py`` does for the other backends.

Runs only with TRITON_INTERPRET=1 set before Triton is imported (the interpreter is chosen when
a kernel is decorated): ``test_fuzz_triton_interpret.py`` starts it in such a subprocess; in any
other session it skips itself. The interpreter is slow, so the budget is smaller, the sequences
shorter, and the dtypes float16 / float32 (it has no bfloat16 ``tl.dot``: refused, see the bfloat16 case).
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 at import; run through test_fuzz_triton_interpret.py", allow_module_level=True)

from hypothesis import assume, given  # noqa: E402

from tests._helpers import fuzz_known_bugs, fuzz_op_problems, fuzz_replay, fuzz_settings  # noqa: E402

DTYPES = ("float16", "float32") + (() if "triton_interpreter_bf16" in fuzz_known_bugs() else ("bfloat16",))


@fuzz_settings(3)
@given(p=fuzz_op_problems(backends=("triton",), dtypes=DTYPES, max_len=16, long_sequences=False))
def test_triton_matches_the_float64_reference(p):
    assume(fuzz_replay("op", p))


def test_known_bug_region_bfloat16(monkeypatch):
    """bfloat16 under the interpreter: refused with an error naming bfloat16, or right."""
    monkeypatch.setenv("MOBA_FUZZ_KNOWN_BUGS", "none")
    p = {"backends": ["triton"], "dtype": "bfloat16", "hkv": 1, "group": 2, "d": 16, "form": "fixed", "b": 1, "sq": 20,
         "sk": 20, "block_size": 4, "top_k": 2, "width": 2, "causal": True, "scale": None, "return_lse": False,
         "backward": False, "indices": "gate", "layouts": ["contiguous"] * 3, "mag": 1.0, "seed": 0}
    assert fuzz_replay("op", p)
