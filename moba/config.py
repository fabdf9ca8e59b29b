"""MoBAConfig: the settings of one MoBA attention, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._checks import check_bool, check_positive_int


@dataclass(frozen=True)
class MoBAConfig:
    """Settings of MoBA attention.

    Attributes:
        block_size: tokens per key block (any integer >= 1).
        top_k: blocks each query attends to, its own block included (>= 1).
        causal: causal attention (decoder) or not.
        backend: "auto", "torch", "triton" or "reference" (see ``moba.available_backends``).
    """

    block_size: int = 512
    top_k: int = 3
    causal: bool = True
    backend: str = "auto"

    def __post_init__(self):
        check_positive_int("block_size", self.block_size)
        check_positive_int("top_k", self.top_k)
        check_bool("causal", self.causal)
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a str, got {type(self.backend).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)
