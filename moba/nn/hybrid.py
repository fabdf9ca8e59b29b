"""The hybrid rule: which layers of an ``n_layers`` model run full attention.

One function, used by every caller that turns "these layers are full" into per-layer modes:
``moba.nn.set_attention_mode`` / ``HybridSchedule``, the transformers integration
(``full_attention_layers``), ``scaling_runs``' ``ModelConfig.layer_modes`` (the last
``n_full_layers``) and its budget evaluation (which re-points the MoBA layers only).

Indices count from 0; negative indices count from the end (``-1`` is the last layer), as in
Python. ``last_n`` adds the last ``last_n`` layers (the paper keeps its last 3 layers full).
"""

from __future__ import annotations

from collections.abc import Iterable


def full_layers(n_layers: int, layers: Iterable[int] = (), last_n: int = 0, *, what: str = "full_layers") -> set[int]:
    """The layers (each in ``[0, n_layers)``) that run full attention.

    Args:
        n_layers: attention layers in the model.
        layers: layer indices; negative ones count from the end.
        last_n: also the last ``last_n`` layers (``0 <= last_n <= n_layers``).
        what: the caller's argument name, for the error message.

    Raises:
        ValueError: an index outside ``[-n_layers, n_layers)`` or ``last_n > n_layers``.
    """
    layers = list(layers)
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(
            f"{what} {bad} out of range for a model with {n_layers} attention layers "
            f"(expected indices in [{-n_layers}, {n_layers - 1}])"
        )
    if not 0 <= last_n <= n_layers:
        raise ValueError(f"full_last_n={last_n} but the model has {n_layers} attention layers")
    return {i % n_layers for i in layers} | set(range(n_layers - last_n, n_layers))


def layer_modes(n_layers: int, layers: Iterable[int] = (), last_n: int = 0, *, what: str = "full_layers") -> list[str]:
    """The mode ("moba" or "full") of every layer, first to last (see ``full_layers``)."""
    full = full_layers(n_layers, layers, last_n, what=what)
    return ["full" if i in full else "moba" for i in range(n_layers)]
