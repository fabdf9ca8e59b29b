"""Attention backends and how ``backend=`` picks one.

A backend turns (packed q, k, v, block layout, block indices) into the MoBA output. The
gate (``select``) is part of a backend too, so a GPU backend can run a fused gate kernel.

* ``"reference"``: dense mask, obviously right, O(S^2) memory: small sizes only.
* ``"torch"``: the PyTorch path (``moba.ops.torch_impl``), any device, autograd.
* ``"triton"``: fused Triton kernels, CUDA tensors (``TRITON_INTERPRET=1`` runs them on CPU).
* ``"auto"``: ``"triton"`` for CUDA tensors when it is available, else ``"torch"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .._core.layout import BlockLayout
from .backend import Backend
from .gate import select_packed
from .naive import reference_attention_packed
from .torch_impl import moba_attention_packed, sparse_attention_packed

# The dense reference builds (Hq, S, S) per sequence; beyond this it is the wrong tool.
REFERENCE_MAX_SEQLEN = 16384


def _always(_device) -> None:
    return None


def _reference_attention(q, k, v, layout: BlockLayout, block_indices, causal, scale, return_lse=False):
    longest = max((b - a for a, b in zip(layout.cu_k[:-1], layout.cu_k[1:], strict=True)), default=0)
    if longest > REFERENCE_MAX_SEQLEN:
        raise ValueError(
            f'backend="reference" builds an S x S mask and is limited to sequences of '
            f"{REFERENCE_MAX_SEQLEN} tokens (got {longest}); use backend=\"torch\" or \"triton\""
        )
    return reference_attention_packed(q, k, v, layout, block_indices, causal, scale, return_lse=return_lse)


def _torch_attention(q, k, v, layout, block_indices, causal, scale):
    return sparse_attention_packed(q, k, v, layout, block_indices, causal, scale)[0]


def _torch_nondeterministic(device: torch.device) -> str | None:
    # dK / dV are summed with index_add_, which uses atomics on CUDA unless PyTorch's
    # deterministic mode is on (then it takes a sorted, deterministic path).
    if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        return ("its CUDA backward sums dK/dV with atomic index_add_; call "
                "torch.use_deterministic_algorithms(True) first, or use backend=\"triton\"")
    return None


_BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        "reference", _reference_attention, select_packed, _always,
        attention_lse=lambda *a: _reference_attention(*a, return_lse=True),
    ),
    "torch": Backend(
        "torch", _torch_attention, select_packed, _always,
        attention_lse=sparse_attention_packed, nondeterministic_reason=_torch_nondeterministic,
        gated_attention=moba_attention_packed,
    ),
}


#: Backends that need an optional package: name -> (package it needs, module whose ``BACKEND``
#: it is). They are imported on first use, so ``import moba`` never imports Triton.
OPTIONAL_BACKENDS: dict[str, tuple[str, str]] = {"triton": ("triton", "moba.ops.triton_impl")}
#: name -> why an optional backend is missing (its package is not installed / not importable)
_MISSING: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    """Add or replace a backend (tests register stand-ins; see CONTRIBUTING.md for a new one)."""
    _BACKENDS[backend.name] = backend


def _load_optional_backends() -> None:
    """Import the optional backends whose package is installed, once.

    A missing package is recorded as the backend's unavailable reason. An ImportError from
    anything else (a module of moba itself, say) is a packaging bug and is raised as it is,
    not reported as "is triton installed?".
    """
    for name, (package, module) in OPTIONAL_BACKENDS.items():
        if name in _BACKENDS or name in _MISSING:
            continue
        if importlib.util.find_spec(package) is None:
            _MISSING[name] = f"{package} is not installed"
            continue
        try:
            backend = importlib.import_module(module).BACKEND
        except ImportError as err:
            if err.name is None or not (err.name == package or err.name.startswith(package + ".")):
                raise
            _MISSING[name] = f"{package} is installed but could not be imported: {err}"
            continue
        register_backend(backend)


def known_backend_names() -> tuple[str, ...]:
    """Every name ``backend=`` accepts ("auto" first), whether or not usable here."""
    return ("auto",) + tuple(sorted(set(_BACKENDS) | set(OPTIONAL_BACKENDS)))


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Every known backend name -> None if usable on ``device``, else why not."""
    _load_optional_backends()
    device = torch.device(device)
    status = {name: b.unavailable_reason(device) for name, b in _BACKENDS.items()}
    for name in OPTIONAL_BACKENDS:
        status.setdefault(name, _MISSING.get(name, f"the {name} backend is not registered"))
    return status


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(name, device: torch.device, q: torch.Tensor | None = None) -> Backend:
    """The backend that ``backend=name`` means for tensors on ``device``; clear error otherwise.

    With ``q`` given, ``"auto"`` also skips Triton for inputs it does not handle (float64,
    head dims above 256) and uses the PyTorch path for them.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    # Resolved without importing optional backends when none can be meant: an import while
    # torch.compile traces this function changes _BACKENDS mid-trace and aborts the trace.
    if name == "auto" and device.type != "cuda":
        return _BACKENDS["torch"]
    if name in ("torch", "reference") and _BACKENDS[name].unavailable_reason(device) is None:
        return _BACKENDS[name]
    _load_optional_backends()
    if name == "auto":
        triton = _BACKENDS.get("triton")
        if (
            device.type == "cuda"
            and triton is not None
            and triton.unavailable_reason(device) is None
            and (q is None or triton.unsupported_input(q) is None)
        ):
            return triton
        return _BACKENDS["torch"]
    if name not in _BACKENDS and name not in OPTIONAL_BACKENDS:
        known = ", ".join(known_backend_names())
        raise ValueError(f"unknown backend {name!r}; expected one of: {known}")
    reason = available_backends(device)[name]
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available on {device}: {reason}")
    return _BACKENDS[name]


def resolve_decode_backend(name, device: torch.device, q: torch.Tensor | None = None) -> str:
    """The decode path ("torch" or "triton") that ``backend=name`` means for tensors on ``device``.

    Used by ``moba_decode``, ``MoBAAttention`` and the transformers integration. "auto" follows
    ``resolve_backend``: Triton for CUDA tensors when it is available (and handles ``q``), else
    PyTorch. "triton" asks for the Triton decode kernel: ``RuntimeError`` when Triton is not
    installed; the kernel checks the device at launch (``bench.kernel_report`` captures its
    launches with a fake driver on CPU tensors). Decoding has no dense-mask path: "reference"
    decodes with the PyTorch path.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name not in ("auto", "torch", "triton", "reference"):
        raise ValueError(
            f"decode backend must be 'auto', 'torch' or 'triton' (or 'reference', which decodes with the "
            f"PyTorch path), got {name!r}"
        )
    if name in ("torch", "reference") or (name == "auto" and device.type != "cuda"):
        return "torch"
    if name == "triton":
        _load_optional_backends()
        if "triton" not in _BACKENDS:
            raise RuntimeError(f"backend='triton' needs triton: {_MISSING.get('triton', 'not registered')}")
        return "triton"
    return resolve_backend(name, device, q).name


__all__ = [
    "Backend",
    "available_backends",
    "known_backend_names",
    "register_backend",
    "resolve_backend",
    "resolve_decode_backend",
]
