"""The backend registry: one place that knows the backends, no import cycle, honest errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import moba
from moba.ops import registry
from tests._helpers import ROOT


def _relative_imports(path: Path) -> set[str]:
    return {node.module or "" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level > 0}


def test_backends_do_not_import_the_registry():
    """The registry imports the implementations; no implementation imports the registry back."""
    for name in ("naive", "torch_impl", "triton_impl", "gate", "backend"):
        assert "registry" not in _relative_imports(ROOT / "moba" / "ops" / f"{name}.py"), name


def test_a_missing_package_is_reported_as_missing(monkeypatch):
    monkeypatch.setitem(registry.OPTIONAL_BACKENDS, "fake", ("no_such_package_xyz", "moba.ops.no_such_module"))
    monkeypatch.setattr(registry, "_MISSING", {})
    status = moba.available_backends("cpu")
    assert status["fake"] == "no_such_package_xyz is not installed"
    with pytest.raises(RuntimeError, match="no_such_package_xyz is not installed"):
        registry.resolve_backend("fake", torch.device("cpu"))


def test_a_packaging_bug_raises_the_real_import_error(monkeypatch):
    """The package is there but moba's own glue module is not: that is a bug in moba, and the
    ImportError says so instead of "is triton installed?"."""
    monkeypatch.setitem(registry.OPTIONAL_BACKENDS, "fake", ("torch", "moba.ops.no_such_module"))
    monkeypatch.setattr(registry, "_MISSING", {})
    with pytest.raises(ModuleNotFoundError, match="moba.ops.no_such_module"):
        moba.available_backends("cpu")


def test_decode_backend_follows_the_op_rule():
    cpu = torch.device("cpu")
    assert registry.resolve_decode_backend("auto", cpu) == "torch"
    assert registry.resolve_decode_backend("torch", cpu) == "torch"
    assert registry.resolve_decode_backend("reference", cpu) == "torch"  # no dense-mask decode path
    with pytest.raises(ValueError, match="decode backend must be 'auto', 'torch' or 'triton'"):
        registry.resolve_decode_backend("cuda-magic", cpu)
    with pytest.raises(TypeError, match="backend must be a str"):
        registry.resolve_decode_backend(None, cpu)
    # "triton" asks for the kernel (its launcher checks the device); without Triton: a clear error
    assert registry.resolve_decode_backend("triton", cpu) == "triton"


def test_decode_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(registry.OPTIONAL_BACKENDS, "triton", ("no_such_package_xyz", "moba.ops.triton_impl"))
    monkeypatch.setattr(registry, "_MISSING", {})
    monkeypatch.delitem(registry._BACKENDS, "triton", raising=False)
    with pytest.raises(RuntimeError, match="needs triton: no_such_package_xyz is not installed"):
        registry.resolve_decode_backend("triton", torch.device("cpu"))
    assert registry.resolve_decode_backend("auto", torch.device("cpu")) == "torch"
