"""Typed configs for the scaling runs: the model, the data and the training loop.

Presets are small dataclasses; every field can be overridden from the command line with
``--key value`` (``--n_layer 4 --attention moba --lr 1e-3``). Booleans take
``true/false/1/0``; ``None``-able fields take ``none``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from dataclasses import dataclass, field

ATTENTION_KINDS = ("moba", "full", "hybrid")


@dataclass
class ModelConfig:
    """A small GPT (see ``scaling_runs.model``).

    ``attention``: "moba" (every layer MoBA), "full" (every layer dense causal attention) or
    "hybrid" (MoBA except the last ``n_full_layers`` layers, which are full; the paper's
    Llama-8B-1M model keeps its last 3 layers full).
    """

    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # GQA when < n_head (must divide n_head)
    n_embd: int = 128
    context: int = 256  # training sequence length
    vocab_size: int = 256  # byte-level default
    mlp_ratio: float = 4.0
    attention: str = "moba"
    block_size: int = 32  # MoBA key-block size
    top_k: int = 3  # MoBA blocks per query (own block included)
    n_full_layers: int = 0  # hybrid only: how many of the last layers are full attention
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix
    rope_theta: float = 10000.0
    backend: str = "auto"  # MoBA backend (moba.moba_attn_func backend=)
    # MoBA layers: "gate" (MoBA) or "random" (own block + top_k - 1 random past blocks, a control arm)
    block_selection: str = "gate"

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head_dim (n_embd // n_head) must be even for rotary embeddings")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.block_selection not in ("gate", "random"):
            raise ValueError(f"block_selection must be 'gate' or 'random', got {self.block_selection!r}")
        if self.attention == "hybrid" and not 0 <= self.n_full_layers <= self.n_layer:
            raise ValueError(f"n_full_layers must be in [0, n_layer], got {self.n_full_layers}")
        self._warn_if_dense()

    def _warn_if_dense(self) -> None:
        """A MoBA setting that selects every block is dense causal attention at MoBA's cost: say so.

        A query of block i chooses top_k of the blocks 0..i, so once top_k >= the number of
        blocks (ceil(context / block_size)) every query attends to its whole prefix.
        """
        if "moba" not in self.layer_modes() or self.block_size <= 0 or self.top_k <= 0:
            return
        n_blocks = -(-self.context // self.block_size)
        if self.block_size >= self.context:
            why = f"block_size ({self.block_size}) >= context ({self.context}): one block"
        elif self.top_k >= n_blocks:
            why = f"top_k ({self.top_k}) >= the {n_blocks} blocks of context {self.context} / block_size {self.block_size}"
        else:
            return
        warnings.warn(f"{why}, so every query attends to its whole prefix: the MoBA layers compute dense "
                      "causal attention. Use a block_size * top_k below the context for sparse attention.",
                      UserWarning, stacklevel=4)  # the line that built the config

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_ff(self) -> int:
        return int(self.mlp_ratio * self.n_embd)

    def layer_modes(self) -> list[str]:
        """Attention mode ("moba" or "full") of every layer, first to last."""
        if self.attention == "full":
            return ["full"] * self.n_layer
        if self.attention == "moba":
            return ["moba"] * self.n_layer
        n_full = self.n_full_layers
        return ["moba"] * (self.n_layer - n_full) + ["full"] * n_full


@dataclass
class DataConfig:
    """Where the tokens come from (see ``scaling_runs.data``).

    ``data``: "stdlib" (embedded default: the Python standard library's .py sources, byte
    level) or a path: a text file, a folder of text files, or llm.c uint16 ``.bin`` shards
    (a single file, a folder, or a glob). ``tokenizer``: optional local tokenizer path
    (transformers ``AutoTokenizer``) for text data; bytes (vocab 256) otherwise.
    """

    data: str = "stdlib"
    tokenizer: str | None = None
    val_fraction: float = 0.05  # share of files held out (text data), chosen by path hash
    cache_dir: str | None = None  # default ~/.cache/moba-scaling (env MOBA_SCALING_CACHE)
    mix: str | None = None  # optional 2nd source (e.g. `python -m scaling_runs.tasks DIR`), training only
    mix_fraction: float = 0.0  # share of training tokens drawn from `mix` (0 = off)

    def __post_init__(self):
        if not 0.0 <= self.mix_fraction < 1.0:
            raise ValueError(f"mix_fraction must be in [0, 1), got {self.mix_fraction}")


@dataclass
class TrainConfig:
    """The training loop (see ``scaling_runs.train``)."""

    out_dir: str = "runs/scratch"
    seed: int = 1337
    batch_size: int = 16  # global batch, sequences per optimizer step (all ranks together)
    grad_accum: int = 1  # micro-steps per optimizer step (per rank)
    max_tokens: int = 0  # training tokens; when 0, max_steps decides
    max_steps: int = 100
    lr: float = 3e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 25  # steps; the last step is always evaluated
    eval_seqs: int = 32  # held-out sequences per evaluation (fixed set)
    trailing_frac: float = 0.25  # trailing loss: last fraction of positions of each sequence
    n_buckets: int = 4  # loss by position bucket
    ckpt_every: int = 0  # steps; 0 = at every evaluation
    device: str = "auto"  # auto / cpu / cuda
    dtype: str = "auto"  # auto (bfloat16 autocast on CUDA, float32 on CPU) / float32 / bfloat16
    compile: bool = False  # torch.compile the model (GPU)
    threads: int = 0  # torch.set_num_threads on CPU when > 0
    progress: bool = True  # tqdm progress bar on rank 0
    # Non-finite train loss / grad norm: 0 stops the run with an error at the first one; N > 0
    # skips up to N such steps (no optimizer update), then stops. A non-finite val loss always stops.
    skip_nonfinite_steps: int = 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """From ``to_dict()``'s layout; unknown keys raise a ValueError naming them."""
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        built = {}
        for sec, typ in sections.items():
            values = d.get(sec, {})
            if not isinstance(values, dict):
                raise TypeError(f"config section {sec!r} must be a dict, got {type(values).__name__}")
            unknown = sorted(set(values) - {f.name for f in dataclasses.fields(typ)})
            if unknown:
                raise ValueError(f"config section {sec!r}: unknown keys {unknown} "
                                 f"(expected fields of {typ.__name__})")
            built[sec] = typ(**values)
        return cls(**built)

    @classmethod
    def from_saved(cls, saved: dict, source: str = "config") -> RunConfig:
        """From a run's saved ``config.json`` (or a sweep's ``launch.json``, or ``to_dict()``).

        ``config.json``'s ``data`` section describes the loaded data (hash, token counts); the
        data options are in ``data_config``.
        """
        if "data_config" in saved:
            return cls.from_dict({**saved, "data": saved["data_config"]})
        data = saved.get("data", {})
        if isinstance(data, dict) and "data_hash" in data:
            raise ValueError(f"{source}: its 'data' section describes the loaded data and it has no "
                             "'data_config' (written by an older version); pass the data options "
                             "(--data PATH ...) with the run's launch.json or a config of your own")
        return cls.from_dict(saved)


# Options that change no number of a run: they may differ between a checkpoint and its resume.
RESUME_FREE_FIELDS = frozenset({
    "train.out_dir", "train.progress", "train.threads", "train.device", "train.compile",
    "train.skip_nonfinite_steps", "data.cache_dir",
})


def config_differences(saved: dict, current: dict, ignore=RESUME_FREE_FIELDS) -> list[str]:
    """``"section.field (checkpoint X, now Y)"`` for every field that differs (``to_dict()`` layouts).

    A field absent from ``saved`` (added to the config after that checkpoint was written) counts
    as its default value.
    """
    defaults = RunConfig().to_dict()
    missing = object()

    def show(v):
        return "absent" if v is missing else repr(v)

    diffs = []
    for sec in sorted(set(saved) | set(current)):
        a, b = saved.get(sec, {}), current.get(sec, {})
        for name in sorted(set(a) | set(b)):
            key = f"{sec}.{name}"
            if key in ignore:
                continue
            va = a.get(name, defaults.get(sec, {}).get(name, missing))
            vb = b.get(name, missing)
            if va != vb:
                diffs.append(f"{key} (checkpoint {show(va)}, now {show(vb)})")
    return diffs


def parse_bool(text: str) -> bool:
    """A command-line boolean: 1/true/yes/on or 0/false/no/off (any case)."""
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def _parse_value(text: str, typ):
    """Parse a command-line string into the (annotated) type of a dataclass field."""
    if isinstance(typ, str):  # postponed annotations: "int", "str | None", ...
        typ = eval(typ, {"int": int, "float": float, "str": str, "bool": bool, "None": None})  # noqa: S307
    args = typing.get_args(typ)
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        return parse_bool(text)
    if typ is int:
        return int(float(text)) if ("e" in text.lower() and "x" not in text.lower()) else int(text, 0)
    if typ is float:
        return float(text)
    return text


def apply_overrides(cfg: RunConfig, overrides: dict[str, str]) -> RunConfig:
    """Set fields by name (``n_layer``, ``lr``, or qualified ``model.n_layer``) from strings."""
    sections = {"model": cfg.model, "data": cfg.data, "train": cfg.train}
    new = {k: dataclasses.asdict(v) for k, v in sections.items()}
    for key, text in overrides.items():
        key = key.replace("-", "_")
        if "." in key:
            sec, name = key.split(".", 1)
            targets = [sec] if sec in sections else []
        else:
            name = key
            targets = [s for s, obj in sections.items() if name in {f.name for f in dataclasses.fields(obj)}]
        if not targets or name not in {f.name for f in dataclasses.fields(sections[targets[0]])}:
            raise ValueError(f"unknown option --{key}")
        sec = targets[0]
        ftype = {f.name: f.type for f in dataclasses.fields(sections[sec])}[name]
        new[sec][name] = text if not isinstance(text, str) else _parse_value(text, ftype)
    return RunConfig(ModelConfig(**new["model"]), DataConfig(**new["data"]), TrainConfig(**new["train"]))


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """``["--n_layer", "4", "--lr=1e-3"]`` -> ``{"n_layer": "4", "lr": "1e-3"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            k, v = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"option {arg} needs a value")
            k, v = arg[2:], argv[i + 1]
            i += 2
        out[k] = v
    return out


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
