"""Typed configs for the scaling runs: the model, the data and the training loop.

Presets are small dataclasses (``RunConfig`` = ``model`` + ``data`` + ``train`` sections).
Every field is a command-line option of the entry points (``scaling_runs.cli`` derives the
argparse options from these fields: name, type, default and the ``help`` in the field's
metadata): ``--n_layer 4 --attention moba --lr 1e-3``, or qualified ``--model.n_layer 4``.
Booleans take ``true/false/1/0/yes/no/on/off``; ``None``-able fields take ``none``; integers
also take ``1e9`` (an integral float) and ``0x..``.
"""

import dataclasses
import json
import re
import types
import typing
import warnings
from dataclasses import dataclass, field

from moba.nn.hybrid import layer_modes  # the one "which layers are full" rule

ATTENTION_KINDS = ("moba", "full", "hybrid")
SECTIONS = ("model", "data", "train")


def opt(default, help: str, choices: tuple | None = None):
    """A config field with its command-line help (and allowed values) in the field's metadata."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    """A small GPT (see ``scaling_runs.model``).

    ``attention``: "moba" (every layer MoBA), "full" (every layer dense causal attention) or
    "hybrid" (MoBA except the last ``n_full_layers`` layers, which are full; the paper's
    Llama-8B-1M model keeps its last 3 layers full).
    """

    n_layer: int = opt(4, "transformer blocks")
    n_head: int = opt(4, "query heads")
    n_kv_head: int = opt(4, "key/value heads; GQA when < n_head (must divide n_head)")
    n_embd: int = opt(128, "model width (a multiple of n_head)")
    context: int = opt(256, "training sequence length in tokens")
    vocab_size: int = opt(256, "vocabulary size (256 = bytes; raised to the data's vocabulary when smaller)")
    mlp_ratio: float = opt(4.0, "MLP hidden width / n_embd")
    attention: str = opt("moba", "attention of the layers: moba, full, or hybrid (the last n_full_layers full)",
                         choices=ATTENTION_KINDS)
    block_size: int = opt(32, "MoBA key-block size")
    top_k: int = opt(3, "MoBA blocks per query (its own block included)")
    n_full_layers: int = opt(0, "hybrid only: how many of the last layers are full attention")
    norm: str = opt("rmsnorm", "normalisation layer", choices=("rmsnorm", "layernorm"))
    tie_embeddings: bool = opt(True, "the LM head shares the token-embedding matrix")
    rope_theta: float = opt(10000.0, "rotary embedding base")
    backend: str = opt("auto", "MoBA backend (moba.moba_attn_func backend=)")
    block_selection: str = opt("gate", "MoBA layers' block selection: gate (MoBA) or random (own block + top_k - 1 "
                               "random past blocks, a control arm)", choices=("gate", "random"))

    def __post_init__(self):
        check_ranges(self)
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
        return layer_modes(self.n_layer, last_n=self.n_full_layers if self.attention == "hybrid" else 0)


@dataclass
class DataConfig:
    """Where the tokens come from (see ``scaling_runs.data``).

    ``data``: "stdlib" (embedded default: the Python standard library's .py sources, byte
    level) or a path: a text file, a folder of text files, or llm.c uint16 ``.bin`` shards
    (a single file, a folder, or a glob). ``tokenizer``: optional local tokenizer path
    (transformers ``AutoTokenizer``) for text data; bytes (vocab 256) otherwise.
    """

    data: str = opt("stdlib", "training text: 'stdlib' (embedded corpus), a text file or folder, or llm.c .bin shards")
    tokenizer: str | None = opt(None, "local tokenizer path (transformers AutoTokenizer) for text data; none = bytes")
    val_fraction: float = opt(0.05, "share of files held out for validation (text data), chosen by path hash")
    cache_dir: str | None = opt(None, "token cache folder; none = ~/.cache/moba-scaling (env MOBA_SCALING_CACHE)")
    mix: str | None = opt(None, "optional second training source: task text (python -m scaling_runs.tasks DIR) "
                                "or an .npz of solved examples (answer-only loss)")
    mix_fraction: float = opt(0.0, "share of training tokens (an .npz mix: of steps) drawn from mix; 0 = off")

    def __post_init__(self):
        if not 0.0 <= self.mix_fraction < 1.0:
            raise ValueError(f"mix_fraction must be in [0, 1), got {self.mix_fraction}")


@dataclass
class TrainConfig:
    """The training loop (see ``scaling_runs.train``)."""

    out_dir: str = opt("runs/scratch", "run folder (config.json, metrics.jsonl, checkpoints, DONE)")
    seed: int = opt(1337, "seed of the weights and of the data order")
    batch_size: int = opt(16, "global batch: sequences per optimizer step, all ranks together")
    grad_accum: int = opt(1, "micro-steps per optimizer step (per rank)")
    max_tokens: int = opt(0, "training tokens (1e9 is accepted); 0 = max_steps decides")
    max_steps: int = opt(100, "optimizer steps when max_tokens is 0")
    lr: float = opt(3e-3, "peak learning rate (AdamW)")
    min_lr_frac: float = opt(0.1, "the cosine schedule decays to lr * min_lr_frac")
    warmup_steps: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay of the matrices (not of norms/biases)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "gradient-norm clipping; 0 = off")
    eval_every: int = opt(25, "evaluate every N steps (the last step always)")
    eval_seqs: int = opt(32, "held-out sequences per evaluation (a fixed set)")
    trailing_frac: float = opt(0.25, "trailing loss: the last fraction of positions of each sequence")
    n_buckets: int = opt(4, "position buckets of the loss-by-position metric")
    ckpt_every: int = opt(0, "checkpoint every N steps; 0 = at every evaluation")
    device: str = opt("auto", "auto / cpu / cuda")
    dtype: str = opt("auto", "auto = bfloat16 autocast on CUDA, float32 on CPU",
                     choices=("auto", "float32", "bfloat16"))
    compile: bool = opt(False, "torch.compile the model (GPU only)")
    threads: int = opt(0, "torch.set_num_threads on CPU when > 0")
    context_parallel: int = opt(1, "ranks that share each sequence (context parallelism, moba.distributed); "
                                   "the world is a dp x cp DeviceMesh")
    progress: bool = opt(True, "progress bar on a terminal, one line per evaluation in a log (rank 0)")
    # A non-finite val loss always stops the run.
    skip_nonfinite_steps: int = opt(0, "non-finite train loss / grad norm: skip up to N such steps (no update), "
                                       "then stop; 0 = stop at the first")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_ranges(self.data)
        check_ranges(self.train)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """From ``to_dict()``'s layout; unknown keys raise a ValueError naming them."""
        built = {}
        for sec, typ in SECTION_TYPES.items():
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
    def from_saved(cls, saved: dict, source: str = "config") -> "RunConfig":
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


SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}

# Options that may differ between a checkpoint and its resume: they change no number of a run
# (out_dir, progress, cache_dir, skip_nonfinite_steps) or only its float rounding (threads,
# device, compile: a resume is bitwise equal to an uninterrupted run only with the same values).
RESUME_FREE_FIELDS = frozenset({
    "train.out_dir", "train.progress", "train.threads", "train.device", "train.compile",
    "train.skip_nonfinite_steps", "data.cache_dir", "train.context_parallel",
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


def parse_int(text: str) -> int:
    """A command-line integer: ``42``, ``0x2a``, ``2_000`` or an integral float such as ``1e9``."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    value = float(text)  # ValueError for text that is no number at all
    if not value.is_integer():
        raise ValueError(f"expected an integer, got {text!r}")
    return int(value)


#: The range of each numeric field, (low, high) with None = unbounded, and whether the bounds are
#: included: a bad value is a one-line error naming the option, never a crash inside training.
RANGES: dict[str, tuple] = {
    "model.n_layer": (1, None), "model.n_head": (1, None), "model.n_kv_head": (1, None), "model.n_embd": (2, None),
    "model.context": (2, None), "model.vocab_size": (2, None), "model.mlp_ratio": (0, None, "open"),
    "model.block_size": (1, None), "model.top_k": (1, None), "model.n_full_layers": (0, None),
    "model.rope_theta": (0, None, "open"),
    "data.val_fraction": (0, 1, "open"),
    "train.batch_size": (1, None), "train.grad_accum": (1, None), "train.max_tokens": (0, None),
    "train.max_steps": (1, None), "train.lr": (0, None, "open"), "train.min_lr_frac": (0, 1),
    "train.warmup_steps": (0, None), "train.weight_decay": (0, None), "train.beta1": (0, 1, "high open"),
    "train.beta2": (0, 1, "high open"), "train.grad_clip": (0, None), "train.eval_every": (1, None), "train.eval_seqs": (1, None),
    "train.trailing_frac": (0, 1, "low open"), "train.n_buckets": (1, None), "train.ckpt_every": (0, None),
    "train.threads": (0, None), "train.skip_nonfinite_steps": (0, None),
}
_SECTION_OF = {"ModelConfig": "model", "DataConfig": "data", "TrainConfig": "train"}
_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def check_ranges(section) -> None:
    """ValueError naming the first field of a config section outside its ``RANGES`` (or a bad device)."""
    sec = _SECTION_OF[type(section).__name__]
    for f in dataclasses.fields(section):
        spec = RANGES.get(f"{sec}.{f.name}")
        value = getattr(section, f.name)
        if spec is None or value is None or isinstance(value, bool):
            continue
        low, high, *how = spec
        low_open, high_open = how in (["open"], ["low open"]), how in (["open"], ["high open"])
        bad = (value != value or (low is not None and (value <= low if low_open else value < low))
               or (high is not None and (value >= high if high_open else value > high)))
        if bad:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise ValueError(f"{f.name} must be {' and '.join(x for x in (lo, hi) if x)}, got {value}")
    if sec == "train" and not _DEVICE.fullmatch(str(section.device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {section.device!r}")


def value_parser(typ) -> typing.Callable[[str], object]:
    """The string -> value converter of a config field's type (bool, int, float, str, or ``X | None``).

    Its ``__name__`` is what argparse prints in "invalid <name> value" usage errors.
    """
    args = typing.get_args(typ)
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        inner = value_parser(next(a for a in args if a is not type(None)))

        def optional(text: str):
            return None if text.lower() in ("none", "null") else inner(text)

        optional.__name__ = f"{inner.__name__} (or none)"
        return optional
    if typ not in _PARSERS:
        raise TypeError(f"config fields must be bool, int, float, str or X | None, got {typ!r}")
    return _PARSERS[typ]


def _named(fn, name: str):
    def conv(text: str):
        return fn(text)

    conv.__name__ = name
    return conv


_PARSERS = {bool: _named(parse_bool, "boolean"), int: _named(parse_int, "integer"), float: float, str: str}


def config_fields() -> dict[str, dataclasses.Field]:
    """``{"model.n_layer": Field, ...}``: every field of every section, in declaration order."""
    return {f"{sec}.{f.name}": f for sec in SECTIONS for f in dataclasses.fields(SECTION_TYPES[sec])}


def qualify(key: str) -> str:
    """``"n_layer"`` / ``"n-layer"`` / ``"model.n_layer"`` -> ``"model.n_layer"``; ValueError if unknown."""
    key = key.replace("-", "_")
    known = config_fields()
    if key in known:
        return key
    matches = [q for q in known if q.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    import difflib

    short = [q.split(".", 1)[1] for q in known]
    near = difflib.get_close_matches(key, short + list(known), n=3)
    hint = f" (did you mean {', '.join('--' + n for n in near)}?)" if near else ""
    raise ValueError(f"unknown option --{key}{hint}")


def apply_overrides(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """A copy of ``cfg`` with fields set by name (``n_layer``, ``lr``, or qualified ``model.n_layer``).

    Values are typed (``4``) or command-line strings (``"4"``, parsed by the field's type).
    """
    new = {sec: dataclasses.asdict(getattr(cfg, sec)) for sec in SECTIONS}
    fields = config_fields()
    for key, value in overrides.items():
        qual = qualify(key)
        sec, name = qual.split(".", 1)
        new[sec][name] = value_parser(fields[qual].type)(value) if isinstance(value, str) else value
    return RunConfig(**{sec: SECTION_TYPES[sec](**new[sec]) for sec in SECTIONS})


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
