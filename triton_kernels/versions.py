"""The Triton releases the kernels are checked on, and one warning for any other.

The kernels' tiles (the config tables in ``attention.py``) are chosen from the static report
(``bench/kernel_report.py``) and its tests assert, per release: no spills, no local memory,
wgmma for every attention matmul and software-pipelined main loops on sm_90. Those checks run on
the locked Triton (``constraints.txt``) and on the Triton of the torch 2.11 line, the one most
GPU installs have (``make kernel-matrix``). ``pyproject.toml`` declares the same list under
``[tool.moba] checked-triton``; a test keeps the two in step. Another release still runs the
kernels correctly (the interpreter and GPU tests do not depend on it), but its register
allocation may spill or serialise the loops: it warns once, at import of the kernels.
"""

from __future__ import annotations

import re
import warnings

#: Triton minor releases ("major.minor") the static kernel checks run on.
CHECKED_TRITON = ("3.6", "3.9")


class UncheckedTritonWarning(UserWarning):
    """The installed Triton is not one of ``CHECKED_TRITON``."""


_warned = False


def triton_minor(version: str) -> str:
    """``"3.6.0"``, ``"3.6.0+git1234"`` -> ``"3.6"``; a string without major.minor is returned as is."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else version


def check_triton_version(version: str | None = None) -> bool:
    """Whether Triton ``version`` (the installed one when None) is a checked release; warns
    ``UncheckedTritonWarning`` the first time (per process) it is not."""
    global _warned
    if version is None:
        import triton

        version = triton.__version__
    checked = triton_minor(version) in CHECKED_TRITON
    if not checked and not _warned:
        _warned = True
        warnings.warn(
            f"moba: Triton {version} is not a release the MoBA kernels are checked on "
            f"({', '.join(CHECKED_TRITON)}); they compute the same results, but their tiles may spill "
            f"registers or lose software pipelining there (see bench/kernel_report.py)",
            UncheckedTritonWarning, stacklevel=2,
        )
    return checked
