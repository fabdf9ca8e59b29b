"""What an install brings: Triton is an optional extra, and moba works without it.

A plain ``pip install moba-attn`` on a CPU-only Linux machine must not pull Triton (a large
download the PyTorch path never uses); ``moba-attn[triton]`` adds it, and the development
environment (``make venv`` / ``make test``) installs that extra so the interpreter tests run.
The second part runs ``moba`` in a fresh interpreter where ``import triton`` fails, as on a
machine without it.
"""

from __future__ import annotations

import re
import sys
import textwrap

from tests._helpers import ROOT, pyproject
from tests._subprocess import run_child


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements]


def test_triton_is_an_optional_extra():
    project = pyproject()["project"]
    assert "triton" not in _names(project["dependencies"]), "triton must not be a hard dependency"
    extras = project["optional-dependencies"]
    assert "triton" in _names(extras["triton"])
    assert "moba-attn[" in extras["dev"][0] and "triton" in extras["dev"][0], extras["dev"]


def test_the_development_environment_installs_the_triton_extra():
    """Every Makefile line that installs the package with extras includes ``triton``, so the
    Triton interpreter tests keep running under ``make test``."""
    installs = [line for line in (ROOT / "Makefile").read_text().splitlines() if re.search(r'-e "\.\[', line)]
    assert installs, "no editable install with extras found in the Makefile"
    for line in installs:
        extras = re.search(r'-e "\.\[([^\]]*)\]"', line).group(1).split(",")
        assert "triton" in extras, f"Makefile installs without the triton extra: {line.strip()}"


# Run in a fresh interpreter: sys.modules["triton"] = None makes every ``import triton`` (and
# importlib.util.find_spec("triton")) behave as when the package is not installed.
WITHOUT_TRITON = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None
    import importlib.util
    assert importlib.util.find_spec("triton") is None

    import torch
    import moba
    from moba.nn import MoBASelfAttention

    assert moba.available_backends()["triton"] == "triton is not installed", moba.available_backends()
    torch.manual_seed(0)
    q = torch.randn(1, 256, 4, 32, requires_grad=True)
    k = torch.randn(1, 256, 2, 32, requires_grad=True)
    v = torch.randn(1, 256, 2, 32, requires_grad=True)
    ref = moba.moba_attn_func(q, k, v, 64, 2, backend="reference")
    for backend in ("auto", "torch"):
        out = moba.moba_attn_func(q, k, v, 64, 2, backend=backend)
        assert torch.allclose(out, ref, atol=1e-5), backend
    out.sum().backward()
    assert q.grad is not None and k.grad is not None

    idx = moba.select_blocks(q, k, block_size=64, top_k=2)
    assert idx.shape == (1, 256, 4, 2)

    state = moba.BlockMeanState(block_size=64)
    step = moba.moba_decode(q[:, -1:].detach(), k.detach(), v.detach(), state, block_size=64, top_k=2)
    assert torch.allclose(step, ref[:, -1:], atol=1e-5)

    layer = MoBASelfAttention(hidden_size=64, num_heads=4, num_kv_heads=2, block_size=32, top_k=2)
    layer(torch.randn(2, 128, 64)).sum().backward()

    try:
        moba.moba_attn_func(q, k, v, 64, 2, backend="triton")
    except RuntimeError as err:
        assert "triton is not installed" in str(err), err
    else:
        raise AssertionError("backend='triton' ran without triton")
    try:
        import moba.ops.triton_impl
    except ModuleNotFoundError as err:
        assert err.name == "triton", err
    else:
        raise AssertionError("moba.ops.triton_impl imported without triton")
    assert sys.modules["triton"] is None  # nothing brought a real triton in
    print("ok")
    """
)


def test_moba_works_without_triton():
    result = run_child([sys.executable, "-c", WITHOUT_TRITON], cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
