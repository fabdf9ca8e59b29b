"""Checkpoint files of the scaling runs: atomic writes, a checksum, the last two kept.

File format (``ckpt.pt``, ``ckpt_prev.pt``)::

    b"MOBA-CKPT v1 sha256:" + 64 hex digits + b"\\n"   # the header, 84 bytes
    torch.save(state) bytes                              # the payload

The digest is the sha256 of the payload, so one flipped bit anywhere in it (a tensor's
bytes included, which ``torch.load`` alone accepts silently) is detected on load. Files
without the header (written before the checksum existed) still load, with a warning that
they are unverified.

A checkpoint carries data, never code. The header is written by whoever writes the file, so
it detects corruption, not tampering; the payload is therefore read with
``torch.load(..., weights_only=True)``, which builds only tensors, numbers, strings, lists,
tuples and dicts and refuses every other pickled object (an ``os.system`` in a ``__reduce__``
included) with ``UntrustedCheckpointError``. Everything ``train`` saves fits that: the RNG
states are stored as tensors and plain numbers (``capture_rng``). A file written by an older
version (numpy RNG state as a pickled array) is refused the same way; ``trust_checkpoint=True``
(``--trust_checkpoint true`` in ``scaling_runs.train``, ``--trust-checkpoint`` in
``bench.generate_speed``) loads it with full unpickling, which runs any code the file holds:
use it only for files you wrote yourself.

A run folder keeps its two newest checkpoints: ``save_checkpoint`` writes ``ckpt.pt.tmp``,
fsyncs it, renames ``ckpt.pt`` to ``ckpt_prev.pt`` and the new file to ``ckpt.pt``
(``os.replace``, then an fsync of the folder), so a kill at any moment (``kill -9`` in the
middle of the write included) leaves at least one complete checkpoint.

``load_latest`` returns the newest checkpoint that verifies, naming every rejected file and
why; it raises ``CheckpointError`` when checkpoint files exist but none verifies (a run must
then stop rather than silently start again from step 0).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .model import GPT

CKPT = "ckpt.pt"
CKPT_PREV = "ckpt_prev.pt"
CORRUPT_SUFFIX = ".corrupt"  # a checkpoint that failed verification is renamed to NAME.corrupt
MAGIC = b"MOBA-CKPT v1 sha256:"
HEADER_LEN = len(MAGIC) + 64 + 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be trusted, or a run folder with no valid checkpoint left."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint whose payload needs arbitrary unpickling (code, not data): refused unless the
    caller passes ``trust_checkpoint=True``. It is not corruption: ``load_latest`` neither falls
    back to an older file nor quarantines it, it stops."""


TRUST_HINT = ("if you wrote this file yourself with an older version, load it with trust_checkpoint=True "
              "(--trust_checkpoint true for scaling_runs.train, --trust-checkpoint for bench.generate_speed); "
              "that runs any code the file contains")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: tmp file, fsync, os.replace, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def encode(state: dict) -> tuple[bytes, memoryview]:
    """``state`` -> (header with the payload's sha256, ``torch.save`` payload), without a copy."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n", payload


def save_checkpoint(out: Path, state: dict, step: int | None = None, *, torn_write: bool = False) -> Path:
    """Write ``out/ckpt.pt`` atomically; the checkpoint it replaces is kept as ``ckpt_prev.pt``.

    ``step`` is accepted for the older call form ``save_checkpoint(out, state, step)`` and unused.

    ``torn_write`` (a test hook) writes half of the file, fsyncs it and exits the process
    with status 17, as a ``kill -9`` in the middle of the write would.
    """
    out = Path(out)
    header, payload = encode(state)
    cur, tmp = out / CKPT, out / (CKPT + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        if torn_write:
            f.write(payload[: len(payload) // 2])
            f.flush()
            os.fsync(f.fileno())
            os._exit(17)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    if cur.exists():
        os.replace(cur, out / CKPT_PREV)
    os.replace(tmp, cur)
    _fsync_dir(out)
    return cur


def _check_header(f, name: str) -> bool:
    """Verify the sha256 of a checkpoint file opened at its start, streaming; leave ``f`` at the
    payload. False for a file without the header (the format before checksums)."""
    head = f.read(HEADER_LEN)
    if not head.startswith(MAGIC):
        f.seek(0)
        return False
    if len(head) < HEADER_LEN or head[-1:] != b"\n":
        raise CheckpointError(f"{name}: truncated header ({len(head)} bytes)")
    want = head[len(MAGIC) : -1].decode("ascii", "replace")
    h = hashlib.sha256()
    while chunk := f.read(1 << 24):
        h.update(chunk)
    got = h.hexdigest()
    if got != want:
        raise CheckpointError(f"{name}: checksum mismatch (sha256 {got[:16]}..., header says {want[:16]}...): "
                              "the file is corrupt or truncated")
    f.seek(HEADER_LEN)
    return True


def load_file(path: Path, map_location=None, warn=True, *, trust_checkpoint: bool = False) -> dict:
    """Load one checkpoint file after verifying its checksum; raises CheckpointError if it fails.

    The payload is read with ``weights_only=True``: a file that needs any other object is
    refused with ``UntrustedCheckpointError``. ``trust_checkpoint=True`` reads it with full
    unpickling (it runs whatever code the file holds; only for files you wrote yourself).
    """
    path = Path(path)
    if not isinstance(trust_checkpoint, bool):
        raise TypeError(f"trust_checkpoint must be True or False, got {trust_checkpoint!r}")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    with f:
        verified = _check_header(f, str(path))
        if not verified and warn:
            print(f"[checkpoint] warning: {path} has no checksum (written by an older version); loading it "
                  "unverified", file=sys.stderr)
        try:  # torch reads the zip payload from the file's current position on
            state = torch.load(f, map_location=map_location, weights_only=not trust_checkpoint)
        except pickle.UnpicklingError as exc:
            # weights_only's refusal: the pickle names a global other than tensors and containers
            found = re.search(r"GLOBAL (\S+)", str(exc))
            why = f"it names the Python object {found.group(1)}" if found else type(exc).__name__
            raise UntrustedCheckpointError(
                f"{path}: refusing to load: the file needs arbitrary unpickling ({why}); a checkpoint "
                f"must hold only tensors, numbers, strings, lists and dicts. {TRUST_HINT}") from exc
        except Exception as exc:  # noqa: BLE001 - any other read failure means a bad file
            raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of state, got {type(state).__name__}")
    return state


@dataclass
class Loaded:
    """What ``load_latest`` found: the state, its file, and the files it rejected (path, reason)."""

    state: dict
    path: Path
    rejected: list[tuple[Path, str]] = field(default_factory=list)


def candidates(out: Path) -> list[Path]:
    """Checkpoint files of a run folder, newest first (``*.tmp`` files are never candidates)."""
    return [p for p in (Path(out) / CKPT, Path(out) / CKPT_PREV) if p.exists()]


def load_latest(out: Path, map_location=None, log=None, *, trust_checkpoint: bool = False) -> Loaded | None:
    """The newest checkpoint of ``out`` that verifies, or None when the folder has none at all.

    Every rejected file is reported through ``log`` (default: stderr) with its reason. Raises
    CheckpointError, naming every file and its reason, when checkpoint files exist (a
    quarantined ``*.corrupt`` one counts) but none verifies. A file that needs arbitrary
    unpickling raises ``UntrustedCheckpointError`` at once (no fallback, no quarantine) unless
    ``trust_checkpoint``.
    """
    out = Path(out)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rejected: list[tuple[Path, str]] = []
    for path in candidates(out):
        try:
            state = load_file(path, map_location, trust_checkpoint=trust_checkpoint)
        except UntrustedCheckpointError:
            raise
        except CheckpointError as exc:
            rejected.append((path, str(exc)))
            log(f"[checkpoint] rejected {exc}; trying an older one")
            continue
        if rejected:
            log(f"[checkpoint] using the older checkpoint {path} (step {state.get('step')})")
        return Loaded(state, path, rejected)
    quarantined = sorted(out.glob("ckpt*.pt" + CORRUPT_SUFFIX))
    if rejected or quarantined:
        lines = [f"  {p}: {why}" for p, why in rejected] + [f"  {p}: quarantined earlier" for p in quarantined]
        raise CheckpointError(f"{out}: no valid checkpoint left; refusing to start again from step 0 "
                              "(that would discard the run's metrics). Rejected:\n" + "\n".join(lines) +
                              "\nMove the run folder away (or delete its ckpt* files and metrics.jsonl) to "
                              "start this run from scratch.")
    return None


def quarantine(paths: list[Path]) -> list[Path]:
    """Rename rejected checkpoints to ``NAME.corrupt`` so the next save rotates valid files only."""
    moved = []
    for p in paths:
        dst = p.with_name(p.name + CORRUPT_SUFFIX)
        with contextlib.suppress(FileNotFoundError):
            os.replace(p, dst)
            moved.append(dst)
    if moved:
        _fsync_dir(moved[0].parent)
    return moved


def load_checkpoint(out: Path, map_location=None, *, trust_checkpoint: bool = False) -> dict | None:
    """The newest valid checkpoint's state in run folder ``out``, or None when there is none.

    Raises CheckpointError when checkpoint files exist but none verifies.
    """
    found = load_latest(out, map_location, trust_checkpoint=trust_checkpoint)
    return None if found is None else found.state


# -- random-number state (a resumed run draws the same numbers as an uninterrupted one) ---
def capture_rng(device: torch.device) -> dict:
    """The torch (and CUDA on a CUDA ``device``), numpy and python RNG states, for ``state["rng"]``.

    Only tensors and plain numbers, so that ``torch.load(weights_only=True)`` reads them back.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def restore_rng(rng: dict, device: torch.device) -> None:
    """Set the generators back to ``capture_rng``'s states (the older tuple form is accepted too)."""
    torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    npy = rng["numpy"]
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    py = rng["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"])
    random.setstate(py)


# -- models from checkpoints ----------------------------------------------------------------
def load_model(path: str | Path, device="cpu", *, trust_checkpoint: bool = False) -> tuple[GPT, dict, Path]:
    """A scaling_runs checkpoint (run dir or ``ckpt.pt``) -> (model in eval mode, run config dict, run dir).

    Data only (``weights_only=True``); ``trust_checkpoint`` as in ``load_file``.
    """
    path = Path(path)
    if path.is_dir():
        run_dir = path
        ckpt = load_checkpoint(path, map_location=device, trust_checkpoint=trust_checkpoint)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no readable {CKPT} / ckpt_prev.pt")
    else:
        run_dir = path.parent
        ckpt = load_file(path, map_location=device, trust_checkpoint=trust_checkpoint)
    cfg = ckpt.get("config")
    if cfg is None and (run_dir / "config.json").exists():
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = {k: saved[k] for k in ("model", "data", "train") if k in saved}
    if cfg is None:
        raise ValueError(f"{path}: the checkpoint holds no config and there is no config.json beside it")
    model = GPT(ModelConfig(**cfg["model"])).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, {**cfg, "step": ckpt.get("step")}, run_dir


def load_gpt(path: str | Path, device="cpu", *, trust_checkpoint: bool = False):
    """A checkpoint (run dir or ``ckpt.pt``) as a ``moba.generate.GPTAdapter`` in eval mode,
    ready for ``moba.generate`` (plain, speculative, staged and tree decoding over its KV cache).

    Data only (``weights_only=True``); ``trust_checkpoint`` as in ``load_file``."""
    from moba.generate import GPTAdapter

    model, _, _ = load_model(path, device, trust_checkpoint=trust_checkpoint)
    return GPTAdapter(model).eval()
