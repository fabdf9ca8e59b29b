"""Token data for the scaling runs: the embedded default corpus, user text, llm.c shards.

Embedded default (``data="stdlib"``, no download): the ``.py`` source files of the Python
standard library that runs this code (``sysconfig.get_paths()["stdlib"]``), every ``*.py``
under it except ``site-packages`` / ``dist-packages`` and ``__pycache__`` (the test suites
are kept: about 30 MB on CPython 3.11, 12 MB without them), in sorted relative-path order.
* tokens: bytes (vocab 256); every file is followed by one 0 byte (document separator, a
  byte that does not occur in Python source);
* split by file: a file goes to validation when the first 8 hex digits of
  ``sha256(relative path)``, read as an integer, are below ``val_fraction * 16**8``
  (deterministic, independent of file order and content);
* ``data_hash`` = sha256 over (train tokens, 0xFF separator byte string "|val|", val tokens);
  recorded in every run's config.json. The hash depends on the Python version (its stdlib).
* cached under ``cache_dir/stdlib-<manifest key>/`` as ``train.u8`` / ``val.u8`` (raw uint8
  token arrays) + ``meta.json``; the manifest key hashes (relative path, size, mtime) of every
  file; the cached arrays are re-hashed on load and must match ``meta.json``.

User data (``data=PATH``):
* llm.c shards: ``.bin`` files of a 256 x int32 header (magic 20240520, version 1, token
  count) then uint16 tokens. Files whose name contains "val" are validation, the others
  training (when no name contains "val", the split is by path hash as for text). Every shard
  is validated on load: a bad magic, a wrong version or a size that does not match the
  header raises ``ValueError`` naming the file.
* text: a file or a folder (every file, recursively, sorted; binary-looking files skipped),
  split by path hash, tokenised as bytes or with an optional local tokenizer
  (``tokenizer=PATH``: ``transformers.AutoTokenizer.from_pretrained(PATH, local_files_only=True)``).

Batches: ``batch_offsets(n_tokens, context, batch, seed, step)`` draws the global batch's
start offsets from ``numpy.random.default_rng([seed, step])``: a pure function of
(seed, step), so a resumed run reads exactly the batches the uninterrupted run would, and
every rank of a DDP job derives the same global batch and takes its own slice.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MIN_STDLIB_TOKENS = 10_000_000
DOC_SEPARATOR = 0
BUILDER_VERSION = 1


@dataclass
class TokenData:
    train: np.ndarray  # 1-D integer token array (uint8 / uint16 / uint32, possibly a memmap)
    val: np.ndarray
    vocab_size: int
    data_hash: str
    source: str
    info: dict

    def describe(self) -> dict:
        return {
            "source": self.source,
            "vocab_size": self.vocab_size,
            "train_tokens": int(self.train.size),
            "val_tokens": int(self.val.size),
            "data_hash": self.data_hash,
            **self.info,
        }


def default_cache_dir() -> Path:
    env = os.environ.get("MOBA_SCALING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "moba-scaling"


def tokens_hash(train: np.ndarray, val: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(train.dtype.itemsize).encode())
    h.update(np.ascontiguousarray(train).view(np.uint8))
    h.update(b"|val|")
    h.update(np.ascontiguousarray(val).view(np.uint8))
    return h.hexdigest()


def is_val_path(rel_path: str, val_fraction: float) -> bool:
    """The deterministic train/validation split of a file, from its relative path only."""
    digest = hashlib.sha256(rel_path.replace(os.sep, "/").encode()).hexdigest()
    return int(digest[:8], 16) < val_fraction * 16**8


# ---------------------------------------------------------------------------------------
# embedded default: the standard library's Python sources


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the corpus files, sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in ("site-packages", "dist-packages", "__pycache__") for part in rel.parts):
            continue
        if p.is_file():
            out.append((rel.as_posix(), p))
    out.sort(key=lambda t: t[0])
    return out


def _bytes_corpus(files: list[tuple[str, Path]], val_fraction: float) -> tuple[np.ndarray, np.ndarray, dict]:
    train_parts, val_parts = [], []
    n_val_files = 0
    sep = bytes([DOC_SEPARATOR])
    for rel, path in files:
        data = path.read_bytes() + sep
        if is_val_path(rel, val_fraction):
            val_parts.append(data)
            n_val_files += 1
        else:
            train_parts.append(data)
    train = np.frombuffer(b"".join(train_parts), dtype=np.uint8).copy()
    val = np.frombuffer(b"".join(val_parts), dtype=np.uint8).copy()
    return train, val, {"files": len(files), "val_files": n_val_files}


def build_stdlib_corpus(
    root: Path | None = None,
    cache_dir: Path | None = None,
    val_fraction: float = 0.05,
    min_tokens: int = MIN_STDLIB_TOKENS,
    max_files: int | None = None,
) -> TokenData:
    """The embedded default corpus (see module docstring), built once and cached."""
    root = Path(root) if root is not None else stdlib_root()
    files = stdlib_files(root)
    if max_files is not None:
        files = files[:max_files]
    manifest = hashlib.sha256()
    manifest.update(f"v{BUILDER_VERSION} val={val_fraction!r}\n".encode())
    for rel, path in files:
        st = path.stat()
        manifest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    key = manifest.hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / f"stdlib-{key}"
    meta_path = folder / "meta.json"
    info = {"root": str(root), "manifest_key": key, "cache": str(folder)}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            train = np.fromfile(folder / "train.u8", dtype=np.uint8)
            val = np.fromfile(folder / "val.u8", dtype=np.uint8)
            if tokens_hash(train, val) == meta["data_hash"]:
                return _check_size(
                    TokenData(train, val, 256, meta["data_hash"], "stdlib", {**info, **meta["info"]}), min_tokens
                )
        except (OSError, ValueError, KeyError):
            pass  # rebuild below
    train, val, extra = _bytes_corpus(files, val_fraction)
    data_hash = tokens_hash(train, val)
    data = TokenData(train, val, 256, data_hash, "stdlib", {**info, **extra})
    _check_size(data, min_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train.u8", train), ("val.u8", val)):
        tmp = folder / f"{name}.tmp{os.getpid()}"
        arr.tofile(tmp)
        os.replace(tmp, folder / name)
    tmp = folder / f"meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"data_hash": data_hash, "info": extra}))
    os.replace(tmp, meta_path)
    return data


def _check_size(data: TokenData, min_tokens: int) -> TokenData:
    n = data.train.size + data.val.size
    if n < min_tokens:
        raise ValueError(
            f"the embedded corpus has only {n:,} tokens (< {min_tokens:,}) under {data.info.get('root')}; "
            "pass --data PATH with more text"
        )
    if data.val.size == 0 or data.train.size == 0:
        raise ValueError("the corpus split left no training or no validation tokens")
    return data


# ---------------------------------------------------------------------------------------
# llm.c shards


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write tokens (< 65536) as an llm.c uint16 shard (256 x int32 header + tokens)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("llm.c shards hold uint16 tokens (0 <= token < 65536)")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Validate an llm.c shard and return its tokens (uint16 memmap). ValueError names the file."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: not an llm.c token shard: {size} bytes, shorter than the 1024-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic number {int(header[0])} (expected {SHARD_MAGIC}: llm.c uint16 shard)")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        raise ValueError(
            f"{path}: header says {n} tokens ({expected} bytes) but the file has {size} bytes "
            "(truncated or corrupt shard)"
        )
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n,))


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    if not arrays:
        return np.zeros(0, dtype=dtype)
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays).astype(dtype, copy=False)


def load_shards(paths: list[Path], val_fraction: float) -> TokenData:
    paths = sorted(paths, key=lambda p: p.as_posix())
    named_val = [p for p in paths if "val" in p.name]
    tokens = {p: read_shard(p) for p in paths}
    if named_val:
        val_paths = named_val
    else:
        val_paths = [p for p in paths if is_val_path(p.name, val_fraction)]
        if not val_paths and len(paths) == 1:
            val_paths = []
    train_paths = [p for p in paths if p not in val_paths]
    if not val_paths:  # a single shard: hold out its last val_fraction of tokens
        only = tokens[paths[0]] if len(paths) == 1 else _concat([tokens[p] for p in paths], np.uint16)
        cut = int(only.size * (1 - val_fraction))
        train, val = only[:cut], only[cut:]
    else:
        train = _concat([tokens[p] for p in train_paths], np.uint16)
        val = _concat([tokens[p] for p in val_paths], np.uint16)
    vocab = int(max(int(train.max()) if train.size else 0, int(val.max()) if val.size else 0)) + 1
    return TokenData(
        train, val, vocab, tokens_hash(np.asarray(train), np.asarray(val)), "shards",
        {"shards": [p.as_posix() for p in paths], "vocab_from": "max token + 1"},
    )


# ---------------------------------------------------------------------------------------
# user text


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:4096]


def load_text(root: Path, val_fraction: float, tokenizer: str | None = None) -> TokenData:
    if root.is_file():
        files = [(root.name, root)]
    else:
        files = sorted(((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()),
                       key=lambda t: t[0])
    texts = [(rel, p.read_bytes()) for rel, p in files]
    texts = [(rel, b) for rel, b in texts if not _looks_binary(b)]
    if not texts:
        raise ValueError(f"{root}: no text files found")
    if tokenizer is None:
        encode, vocab, dtype = (lambda b: np.frombuffer(b + bytes([DOC_SEPARATOR]), dtype=np.uint8)), 256, np.uint8
    else:
        from transformers import AutoTokenizer  # optional dependency

        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        vocab = len(tok)
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

        def encode(b):
            ids = tok(b.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"] + eos
            return np.asarray(ids, dtype=dtype)

    val_files = {rel for rel, _ in texts if is_val_path(rel, val_fraction)}
    if len(texts) == 1:
        arr = encode(texts[0][1])
        cut = int(arr.size * (1 - val_fraction))
        train, val = arr[:cut], arr[cut:]
    else:
        if not val_files:  # guarantee a validation set: the file with the smallest path hash
            val_files = {min((hashlib.sha256(r.encode()).hexdigest(), r) for r, _ in texts)[1]}
        train = _concat([encode(b) for rel, b in texts if rel not in val_files], dtype)
        val = _concat([encode(b) for rel, b in texts if rel in val_files], dtype)
    if train.size == 0 or val.size == 0:
        raise ValueError(f"{root}: the train/validation split left an empty side")
    return TokenData(train, val, vocab, tokens_hash(train, val), "text",
                     {"root": str(root), "files": len(texts), "val_files": len(val_files),
                      "tokenizer": tokenizer or "bytes"})


def load_data(cfg: DataConfig) -> TokenData:
    """Load the tokens ``cfg`` names (see the module docstring), mixed with ``cfg.mix`` when
    ``cfg.mix_fraction > 0``: the mix source's training tokens, repeated as needed, are appended
    to the training array so that they make ``mix_fraction`` of it (batch offsets are uniform,
    so about that share of training windows); validation stays the main source's only."""
    data = _load_main(cfg)
    if not cfg.mix or cfg.mix_fraction <= 0:
        return data
    mix = _load_main(DataConfig(data=cfg.mix, tokenizer=cfg.tokenizer, val_fraction=cfg.val_fraction,
                                cache_dir=cfg.cache_dir))
    if mix.vocab_size > data.vocab_size and data.vocab_size == 256:
        raise ValueError(f"{cfg.mix}: vocabulary {mix.vocab_size} does not fit the byte-level main data")
    n_mix = int(round(cfg.mix_fraction / (1 - cfg.mix_fraction) * data.train.size))
    reps = -(-n_mix // max(1, mix.train.size))
    extra = np.tile(np.asarray(mix.train), reps)[:n_mix].astype(data.train.dtype)
    train = np.concatenate([np.asarray(data.train), extra])
    info = {**data.info, "mix": {"source": cfg.mix, "fraction": cfg.mix_fraction, "tokens": int(n_mix),
                                 "data_hash": mix.data_hash}}
    return TokenData(train, data.val, max(data.vocab_size, mix.vocab_size), tokens_hash(train, data.val),
                     data.source + "+mix", info)


def _load_main(cfg: DataConfig) -> TokenData:
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    if cfg.data == "stdlib":
        return build_stdlib_corpus(cache_dir=cache, val_fraction=cfg.val_fraction)
    path = Path(cfg.data)
    if any(ch in cfg.data for ch in "*?["):
        shards = [Path(p) for p in glob.glob(cfg.data)]
        if not shards:
            raise ValueError(f"{cfg.data}: no files match")
        return load_shards(shards, cfg.val_fraction)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".bin":
        return load_shards([path], cfg.val_fraction)
    if path.is_dir():
        shards = sorted(path.glob("*.bin"))
        if shards:
            return load_shards(shards, cfg.val_fraction)
    return load_text(path, cfg.val_fraction, cfg.tokenizer)


# ---------------------------------------------------------------------------------------
# batches


def batch_offsets(n_tokens: int, context: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Start offsets (batch,) of the global batch of ``step``: a pure function of (seed, step)."""
    high = n_tokens - context - 1
    if high <= 0:
        raise ValueError(f"need more than context + 1 = {context + 1} tokens, have {n_tokens}")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, high + 1, size=batch)


def gather(tokens: np.ndarray, offsets, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (len(offsets), context) int64 each."""
    rows = np.stack([np.asarray(tokens[o : o + context + 1], dtype=np.int64) for o in offsets])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


def get_batch(tokens: np.ndarray, context: int, batch: int, seed: int, step: int,
              start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``start:stop`` of the global batch of ``step`` (a rank's or a micro-step's slice)."""
    offsets = batch_offsets(tokens.size, context, batch, seed, step)[start:stop]
    return gather(tokens, offsets, context)


def eval_offsets(n_tokens: int, context: int, n_seqs: int) -> np.ndarray:
    """Fixed, evenly spaced validation windows (the same for every evaluation and every run)."""
    high = n_tokens - context - 1
    if high < 0:
        raise ValueError(f"the validation split has {n_tokens} tokens, fewer than context + 1 = {context + 1}")
    return np.linspace(0, high, num=n_seqs).astype(np.int64)
