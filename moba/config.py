"""MoBAConfig: the settings of one MoBA attention, in one place.

One object is accepted everywhere: ``moba_attn_func(..., config=cfg)``,
``moba_attn_varlen_func(..., config=cfg)``, ``moba.nn.MoBAAttention(config=cfg)``,
``moba.nn.MoBASelfAttention(..., config=cfg)`` and ``register_moba(cfg)``.

Explicit arguments next to a config: an argument that is given (not None) must equal the
config's value, otherwise a ``ValueError`` names both. So ``moba_attn_func(q, k, v,
config=cfg, backend="torch")`` runs when ``cfg.backend == "torch"`` and raises otherwise: a
config never silently overrides an argument, nor is silently overridden by one. To change one
setting, make a new config: ``dataclasses.replace(cfg, backend="torch")``.

The official MoonshotAI package's names are accepted as aliases: ``MoBAConfig(moba_chunk_size=
4096, moba_topk=12)`` (or positionally, ``MoBAConfig(4096, 12)``) is ``MoBAConfig(block_size=
4096, top_k=12)``, and ``cfg.moba_chunk_size`` / ``cfg.moba_topk`` read the same values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from ._core.checks import MAX_INT, check_bool, check_positive_int, check_softmax_scale

#: Backend names a config may hold (``moba.ops.registry`` may register more at run time).
KNOWN_BACKENDS = ("auto", "torch", "triton", "reference")

# The official MoonshotAI/MoBA field names -> ours.
ALIASES = {"moba_chunk_size": "block_size", "moba_topk": "top_k"}

_UNSET: Any = object()


def _check_backend(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"backend must be a str, got {type(value).__name__} {value!r}")
    from .ops.registry import known_backend_names  # lazy: backends imports the kernels' glue

    known = known_backend_names()
    if value not in known:
        raise ValueError(f"unknown backend {value!r}; expected one of: {', '.join(known)}")
    return str(value)  # a numpy str_ becomes a plain str (JSON)


def _check_scale(value) -> float | None:
    return check_softmax_scale(value)


def _as_bool(name: str, value) -> bool:
    # numpy.bool_ is not a bool subclass; accept it (configs are often built from arrays / argparse).
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        value = bool(value)
    return check_bool(name, value)


@dataclass(frozen=True, init=False)
class MoBAConfig:
    """Settings of MoBA attention.

    Attributes:
        block_size: tokens per key block (any integer >= 1). Alias: ``moba_chunk_size``.
        top_k: blocks each query attends to, its own block included (>= 1; ``top_k=1`` is
            local block attention, also in the official package's names). Alias: ``moba_topk``.
        causal: causal attention (decoder) or not.
        backend: "auto", "torch", "triton" or "reference" (see ``moba.available_backends``).
        softmax_scale: None (``head_dim ** -0.5``) or a finite positive float.
        deterministic: require bitwise-reproducible gradients; backends that cannot give them
            on the inputs' device raise instead of running (see ``moba_attn_func``).

    Integers from numpy (``np.int64(512)``) are converted to ``int``; every field is checked
    when the config is built, so a bad config never reaches a kernel. ``block_size`` and
    ``top_k`` above ``2**63 - 1`` are stored as ``2**63 - 1`` (the same selection).

    Example:
        >>> cfg = MoBAConfig(block_size=512, top_k=3)
        >>> MoBAConfig.from_json(cfg.to_json()) == cfg
        True
    """

    block_size: int
    top_k: int
    causal: bool
    backend: str
    softmax_scale: float | None
    deterministic: bool

    def __init__(
        self,
        block_size: int | None = None,
        top_k: int | None = None,
        causal: bool = True,
        backend: str = "auto",
        softmax_scale: float | None = None,
        deterministic: bool = False,
        *,
        moba_chunk_size: int | None = None,
        moba_topk: int | None = None,
    ):
        block_size = _merge_alias("block_size", block_size, "moba_chunk_size", moba_chunk_size)
        top_k = _merge_alias("top_k", top_k, "moba_topk", moba_topk)
        values = dict(
            # Any integer is legal; above 2**63 - 1 it is stored as 2**63 - 1, which selects the
            # same blocks (one block per sequence / every block) and keeps to_json() working.
            block_size=min(check_positive_int("block_size", 512 if block_size is None else block_size), MAX_INT),
            top_k=min(check_positive_int("top_k", 3 if top_k is None else top_k), MAX_INT),
            causal=_as_bool("causal", causal),
            backend=_check_backend(backend),
            softmax_scale=_check_scale(softmax_scale),
            deterministic=_as_bool("deterministic", deterministic),
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    # -- the official package's attribute names ------------------------------------------
    @property
    def moba_chunk_size(self) -> int:
        return self.block_size

    @property
    def moba_topk(self) -> int:
        return self.top_k

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain dict of every field (our names), JSON-serialisable."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> MoBAConfig:
        """Inverse of ``to_dict``; also takes the official names. Unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"MoBAConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} | set(ALIASES)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoBAConfig field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    def to_json(self, **json_kwargs) -> str:
        return json.dumps(self.to_dict(), **json_kwargs)

    @classmethod
    def from_json(cls, text: str) -> MoBAConfig:
        """Inverse of ``to_json``; a text that is not a JSON object of fields raises ``ValueError``."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise TypeError(f"MoBAConfig.from_json needs a JSON str, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("MoBAConfig.from_json: text is nested too deeply; expected a JSON object of "
                             "MoBAConfig fields") from None
        except ValueError as exc:
            raise ValueError(f"MoBAConfig.from_json: text is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"MoBAConfig.from_json: expected a JSON object of MoBAConfig fields, got "
                             f"{type(data).__name__}")
        return cls.from_dict(data)


def _merge_alias(name: str, value, alias: str, alias_value):
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise ValueError(f"{name}={value!r} and its alias {alias}={alias_value!r} disagree; pass one of them")
    return alias_value


def resolve_config(config: MoBAConfig | None, **given) -> MoBAConfig:
    """The settings of one call: ``config`` merged with the explicitly given arguments.

    ``given`` maps field names (or the official aliases) to values, None meaning "not given".
    Without a config, the given values (defaults for the rest) build one; with a config, a
    given value that differs from the config's raises ``ValueError`` naming both.
    """
    for alias, name in ALIASES.items():
        if alias in given:
            given[name] = _merge_alias(name, given.get(name), alias, given.pop(alias))
    given = {name: value for name, value in given.items() if value is not None}
    if config is None:
        return MoBAConfig(**given)
    if not isinstance(config, MoBAConfig):
        raise TypeError(f"config must be a moba.MoBAConfig or None, got {type(config).__name__}")
    for name, value in given.items():
        # Validate through a config so that e.g. np.int64(64) equals 64 and bad values raise as usual.
        checked = getattr(MoBAConfig(**{name: value}), name)
        if checked != getattr(config, name):
            raise ValueError(
                f"{name}={value!r} conflicts with config.{name}={getattr(config, name)!r}; pass the "
                f"setting once (in the config, or as an argument without a config)"
            )
    return config
