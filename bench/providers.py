"""attn_speed's providers: one registry, name -> ``Provider`` (how to build its forward, what
it needs, why it would be skipped).

A provider's ``forward(cfg)`` returns ``(q, k, v) -> out`` in flash-attn layout (B, S, H, D);
``skip(cfg)`` says why it cannot run a configuration (None: it can), ``backward_skip(cfg)``
why it has no backward there. ``cfg`` is ``bench.attn_speed.Config`` (device, block_size,
top_k, causal, official_moba_src are read). To add one: write its forward, add a
``Provider`` to ``PROVIDERS`` (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import moba

from ._common import sdpa
from ._moba_impls import (
    flash_attn_usable,
    flex_attention_status,
    flex_moba,
    load_official_moba,
    official_moba,
    paper_reimpl_moba,
)


class Skip(Exception):
    """A provider cannot run this configuration; the message says why."""


def _never(cfg) -> None:
    return None


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str  #: "moba" (sparse) or "dense" (a baseline)
    requires: str  #: what it needs, for --help and the docs
    forward: Callable[..., Callable]  #: cfg -> (q, k, v) -> out
    skip: Callable[..., str | None] = _never  #: cfg -> None when it can run, else why not
    backward_skip: Callable[..., str | None] = _never  #: cfg -> None when it has a backward, else why not
    label: str | None = None  #: how plots name it as a dense baseline


def _device(cfg) -> torch.device:
    return torch.device(cfg.device)


def _ours(backend: str) -> Provider:
    def skip(cfg):
        return moba.available_backends(_device(cfg)).get(backend, f"moba has no backend {backend!r}")

    return Provider(
        f"moba-{backend}", "moba", f'moba backend="{backend}"',
        lambda cfg: lambda q, k, v: moba.moba_attn_func(q, k, v, cfg.block_size, cfg.top_k, causal=cfg.causal,
                                                        backend=backend),
        skip=skip,
    )


def _cuda_only(what: str):
    return lambda cfg: None if _device(cfg).type == "cuda" else what


def _sdpa_provider(name: str, backend: str | None, label: str, cuda: bool = True) -> Provider:
    return Provider(
        name, "dense", f"torch SDPA{' ' + backend + ' backend' if backend else ''}{' on CUDA' if cuda else ''}",
        lambda cfg: lambda q, k, v: sdpa(q, k, v, cfg.causal, backend),
        skip=_cuda_only(f"{name} is a CUDA SDPA backend") if cuda else _never, label=label,
    )


def _flash_attn_skip(cfg) -> str | None:
    if _device(cfg).type != "cuda":
        return "flash-attn needs CUDA"
    if not flash_attn_usable(_device(cfg)):
        return "flash_attn is not installed (pip install flash-attn)"
    return None


def _flash_attn_forward(cfg):
    from flash_attn import flash_attn_func

    return lambda q, k, v: flash_attn_func(q, k, v, causal=cfg.causal)


def _causal_only(what: str):
    return lambda cfg: None if cfg.causal else what


def _official_forward(cfg):
    fn, reason = load_official_moba(cfg.official_moba_src, _device(cfg))
    if fn is None:
        raise Skip(reason)
    return lambda q, k, v: official_moba(fn, q, k, v, cfg.block_size, cfg.top_k)


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    _ours("triton"),
    _ours("torch"),
    Provider("moba-full", "dense", "moba.full_attn_func (flash-attn or SDPA)",
             lambda cfg: lambda q, k, v: moba.full_attn_func(q, k, v, causal=cfg.causal), label="moba.full_attn_func"),
    Provider("flash-attn", "dense", "CUDA + flash-attn", _flash_attn_forward, skip=_flash_attn_skip, label="flash-attn"),
    _sdpa_provider("sdpa-flash", "FLASH_ATTENTION", "SDPA flash backend"),
    _sdpa_provider("sdpa-cudnn", "CUDNN_ATTENTION", "SDPA cuDNN backend"),
    _sdpa_provider("sdpa-efficient", "EFFICIENT_ATTENTION", "SDPA efficient backend"),
    _sdpa_provider("sdpa", None, "SDPA", cuda=False),
    _sdpa_provider("sdpa-math", "MATH", "SDPA math backend", cuda=False),
    Provider("flex-moba", "moba", "torch FlexAttention with MoBA's block mask",
             lambda cfg: lambda q, k, v: flex_moba(q, k, v, cfg.block_size, cfg.top_k, causal=cfg.causal),
             skip=lambda cfg: flex_attention_status(_device(cfg)),
             backward_skip=lambda cfg: "FlexAttention has no backward on CPU" if _device(cfg).type == "cpu" else None),
    Provider("moba-paper-reimpl", "moba", "causal; flash-attn on CUDA, else torch",
             lambda cfg: lambda q, k, v: paper_reimpl_moba(q, k, v, cfg.block_size, cfg.top_k, causal=cfg.causal),
             skip=_causal_only("the paper's MoBA algorithm is causal only"),
             backward_skip=lambda cfg: ("moba-paper-reimpl: forward only on the flash-attn path (no custom backward "
                                        "re-implemented)") if flash_attn_usable(_device(cfg)) else None),
    Provider("moba-official", "moba", "causal; a checkout of MoonshotAI/MoBA (--official_moba_src)", _official_forward,
             skip=_causal_only("the official MoBA code is causal only")),
    Provider("reference", "moba", 'moba backend="reference", CPU, short sequences',
             lambda cfg: lambda q, k, v: moba.moba_attn_func(q, k, v, cfg.block_size, cfg.top_k, causal=cfg.causal,
                                                             backend="reference"),
             skip=lambda cfg: None if _device(cfg).type == "cpu" else "the dense-mask reference is for CPU small sizes only"),
)}


def provider_forward(name: str, cfg) -> Callable:
    """The provider's forward ``(q, k, v) -> out`` for ``cfg``, or raise ``Skip(reason)``."""
    provider = PROVIDERS.get(name)
    if provider is None:
        raise Skip(f"unknown provider {name}")
    reason = provider.skip(cfg)
    if reason:
        raise Skip(reason)
    return provider.forward(cfg)


def backward_skip_reason(name: str, cfg) -> str | None:
    """Why the provider has no backward for ``cfg``, or None."""
    provider = PROVIDERS.get(name)
    return None if provider is None else provider.backward_skip(cfg)
