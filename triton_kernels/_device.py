"""Launch on the inputs' device: every launcher runs under ``on_inputs_device``.

Triton launches on the *current* CUDA device and takes its scratch memory (the TMA descriptors'
global scratch, ``attention._scratch_allocator``) there too. Tensors on ``cuda:1`` while the
current device is 0 (a model split over GPUs, e.g. ``device_map="auto"``) would otherwise launch
on the wrong GPU. The guard makes the first tensor argument's device current for the launcher's
duration; for CPU tensors (the interpreter) it does nothing.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def device_guard(device) -> contextlib.AbstractContextManager:
    """A context in which ``device`` is the current CUDA device (``torch.cuda.device``); a no-op
    context for any other device type."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_inputs_device(fn):
    """Decorator: run ``fn`` under ``device_guard`` of its first tensor argument's device."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            return fn(*args, **kwargs)
        with device_guard(first.device):
            return fn(*args, **kwargs)

    return wrapper
