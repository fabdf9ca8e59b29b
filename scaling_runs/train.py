"""Train one small GPT: ``python -m scaling_runs.train --out_dir runs/x --attention moba ...``.

Single process, or DDP through torchrun (``torchrun --nproc_per_node=8 -m scaling_runs.train
...``; gloo on CPU, nccl on CUDA; RANK / WORLD_SIZE / LOCAL_RANK from the environment).
``batch_size`` is the global batch in sequences: rank r reads sequences
``[r * B/world, (r+1) * B/world)`` of every step's global batch, split further into
``grad_accum`` micro-batches, so any (world size, grad_accum) gives the same losses up to
float rounding. Every option of ``scaling_runs.config`` is a ``--key value`` flag;
``--config run/config.json`` starts from a saved run config.

Run directory (``out_dir``):
* ``config.json``: the full config (``model``, ``train``, and the data options as
  ``data_config``; ``--config RUN/config.json`` reads them back), attention kind, parameter
  counts, FLOPs per token, git commit, versions, device, ``data`` = the loaded data's
  description and hash (written at every start);
* ``metrics.jsonl``: one JSON object per evaluation (step, tokens, flops, pflops_days,
  attn_aware_flops, train_loss, val_loss, trailing_loss, loss_by_bucket, lr, elapsed_s, ...);
* ``ckpt.pt`` (+ ``ckpt_prev.pt``, the one before): model, optimizer, step, RNG states,
  running train loss, elapsed time, config and data hash, with a sha256 checksum
  (``scaling_runs.checkpoint``); written to a temporary file, fsynced, then ``os.replace``d,
  so a kill at any moment (even ``kill -9`` during the write) leaves a good checkpoint;
* ``train.lock``: pid, host and start time of the trainer writing this folder (see below);
* ``DONE``: written last, with the final metrics; a run with ``DONE`` is not trained again.

Output (rank 0, stderr): on a terminal a progress bar (train loss, latest val loss, tokens/s,
MFU on known GPUs); when stderr is not a terminal (a log file, a sweep's ``train.log``) one
line per evaluation instead (step, tokens, losses, tokens/s, elapsed, ETA); ``--progress
false`` silences both. A resumed run says ``resuming from step N``. At the end a summary
(steps, tokens, final losses, tokens/s, wall time, file paths) goes to stdout; the final
metrics row as JSON is in ``DONE``.

Restarting the same command resumes from the newest checkpoint that verifies: same data
order (batches are a function of (seed, step)), and on CPU the same losses as an
uninterrupted run; metrics rows past the checkpoint's step are dropped (they are recomputed).
A run stops with an error (exit status 1, no ``DONE``) instead of training on bad state:
* checkpoint files exist but none verifies (a corrupt newest one falls back to the previous
  one with a message and is renamed ``*.corrupt``);
* a non-finite train loss or gradient norm (``--skip_nonfinite_steps N`` skips up to N such
  steps without an update; 0 by default), or a non-finite validation loss;
* the checkpoint was trained with another config or other data (``data_hash``): the message
  names the fields; ``--allow_config_change true`` resumes anyway. Options that change no
  number (``out_dir``, ``threads``, ``progress``, ``device``, ``compile``, ``cache_dir``,
  ``skip_nonfinite_steps``) may change freely;
* another trainer holds the folder's ``train.lock``: one folder, one writer. The lock is
  released on exit (also on SIGTERM); a lock whose process is gone is taken over.
Short-answer task data (issue 16): ``--mix PATH.npz --mix_fraction f`` with an ``.npz`` of
solved examples (``python -m scaling_runs.tasks OUT --tasks needle``) makes a fraction ``f`` of
the *steps* task steps (chosen by ``(seed, step)``): their windows each start at an example's
first byte and their loss is the mean over answer bytes only (``tasks.example_batch``); the
other steps train on ``--data`` as usual. Any other ``--mix`` source keeps the default
behaviour (its tokens appended to the training stream, ``data.load_data``).
Under torchrun, a worker asks the kernel for SIGTERM when torchrun dies (no orphans).

Fault injection for tests (``MOBA_SCALING_FAULT=KIND:N``, N = 1-based count of finished
steps): ``exit_after_step`` exits (os._exit) right after step N; ``die_in_ckpt`` exits halfway
through writing the checkpoint of step N; ``stop_after_step`` raises ``InjectedFault``;
``sleep_after_step`` sleeps 10 minutes; ``nan_loss_at_step`` / ``nan_val_at_step`` make that
step's train / validation loss NaN.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moba._core.hardware import DEVICES

try:
    import fcntl
except ImportError:  # not POSIX: the lock relies on its pid check alone
    fcntl = None

from .checkpoint import (  # noqa: F401 - re-exported for older imports
    CKPT,
    CKPT_PREV,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    load_latest,
    quarantine,
    save_checkpoint,
)
from .config import RunConfig, apply_overrides, config_differences, dumps, parse_bool, parse_overrides
from .data import eval_offsets, gather, get_batch, load_data
from .flops import PFLOPS_DAY, flops_per_token
from .model import GPT, param_counts
from .tasks import ExampleSet, example_batch

LOCK = "train.lock"

# Dense bf16 peak FLOP/s by device-name substring, for MFU.
PEAK_FLOPS = {d.key: d.bf16_flops for d in DEVICES if d.key != "CPU"}  # moba._core.hardware: the one table


class TrainingError(RuntimeError):
    """A run that must stop without DONE: ``main`` prints the message and exits with status 1."""


class NonFiniteLossError(TrainingError):
    pass


class ConfigMismatchError(TrainingError):
    pass


class RunLockedError(TrainingError):
    pass


class InjectedFault(Exception):
    """Raised by the ``stop_after_step`` test hook: an interruption that leaves the process alive."""


# ---------------------------------------------------------------------------------------
# helpers


def _fault(kind: str) -> int | None:
    spec = os.environ.get("MOBA_SCALING_FAULT", "")
    if spec.startswith(kind + ":"):
        return int(spec.split(":", 1)[1])
    return None


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent dies (prctl
    PR_SET_PDEATHSIG), so a killed launcher leaves no orphan. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _proc_start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One writer per run folder: ``out/train.lock`` holds the owner's pid, host and start time.

    The owner keeps an exclusive ``flock`` on the file while it runs (the kernel drops it when
    the process dies, however it dies) and deletes the file on release. A lock file whose
    process is gone (pid not running on this host, or a reused pid with another start time)
    is stale and is taken over with a message. A lock held on another host is never taken
    over: delete the file by hand once that job is known to be gone.
    """

    def __init__(self, folder: Path, log=None):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    @staticmethod
    def _read(fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            return json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return {"unreadable": raw[:80].decode("utf-8", "replace")}

    def _holder_alive(self, holder: dict) -> bool:
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return False  # empty or torn lock file: its writer died before finishing it
        if holder.get("host") != socket.gethostname():
            return True  # cannot check another host's processes
        if not _pid_alive(pid):
            return False
        start = _proc_start_time(pid)
        return start is None or holder.get("start") in (None, start)

    def _refuse(self, holder: dict) -> RunLockedError:
        who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
        return RunLockedError(f"{self.path.parent}: another trainer is using this run folder ({who}; "
                              f"lock file {self.path}). One run folder, one writer: wait for it or stop it; "
                              "if that process is gone, delete the lock file.")

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise self._refuse(holder) from None
            except OSError:
                pass  # a filesystem without flock: the pid check below decides alone
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner deleted the file between our open and flock
                os.close(fd)
                continue
            holder = self._read(fd)
            if holder and holder.get("pid") != os.getpid() and self._holder_alive(holder):
                os.close(fd)
                raise self._refuse(holder)
            if holder and holder.get("pid") != os.getpid():
                self.log(f"[train] taking over a stale lock in {self.path.parent} (pid {holder.get('pid')} on "
                         f"{holder.get('host')} is no longer running)")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start_time(os.getpid()),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunLockedError(f"{self.path}: could not take the lock (it kept changing hands)")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if self._read(self.fd).get("pid") == os.getpid():
                os.unlink(self.path)
        os.close(self.fd)  # drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def git_commit() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": sha or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    import moba

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "moba": getattr(moba, "__version__", None), "platform": platform.platform()}


def task_step_at(seed: int, step: int, fraction: float) -> bool:
    """Whether ``step`` trains on the short-answer examples (a ``fraction`` of the steps, by
    ``(seed, step)``: the same on every rank and after a resume)."""
    return float(np.random.default_rng([seed, step, 17]).random()) < fraction


def lr_at(step: int, cfg, max_steps: int) -> float:
    """Linear warmup for ``warmup_steps``, then cosine from lr to ``lr * min_lr_frac`` at the end."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    min_lr = t.lr * t.min_lr_frac
    return min_lr + 0.5 * (t.lr - min_lr) * (1 + math.cos(math.pi * progress))


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line
    return rows


def format_duration(seconds: float | None) -> str:
    """``42.1 s``, ``3:07`` (min:s) or ``1:02:03`` (h:min:s)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def eval_line(row: dict, max_steps: int, tokens_per_s: float | None, eta_s: float | None) -> str:
    """The one line a log file (stderr not a terminal) gets per evaluation."""
    tps = "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
    return (f"[train] step {row['step']}/{max_steps} ({100 * row['step'] / max(1, max_steps):.0f}%)  "
            f"tokens {row['tokens']:,}  train {_loss(row.get('train_loss'))}  val {_loss(row.get('val_loss'))}  "
            f"trailing {_loss(row.get('trailing_loss'))}  {tps} tok/s  "
            f"elapsed {format_duration(row.get('elapsed_s'))}  eta {format_duration(eta_s)}")


def format_summary(last: dict, out_dir: str | Path, title: str = "finished") -> str:
    """The end-of-run report: aligned lines of the final metrics and where the files are.

    ``last`` is a metrics row (what ``train`` returns, also stored in ``DONE``); the planned
    step count comes from the run's ``config.json`` when it is there.
    """
    out = Path(out_dir)
    saved: dict = {}
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads((out / "config.json").read_text())
    if not last:
        return f"[train] {out}: {title}, no evaluation recorded (metrics: {out / 'metrics.jsonl'})"
    planned = saved.get("max_steps")
    try:
        ctx = saved["model"]["context"]
        where = f"last {max(1, int(round(ctx * saved['train']['trailing_frac'])))} of {ctx} positions"
    except (KeyError, TypeError):
        where = "last positions of each sequence"
    lines = [
        ("steps", f"{last.get('step', '-')}" + (f" / {planned}" if planned else "")),
        ("tokens", f"{last.get('tokens', 0):,}"),
        ("train loss", f"{_loss(last.get('train_loss'))}  (mean over the steps since the previous evaluation)"),
        ("val loss", _loss(last.get("val_loss"))),
        ("trailing loss", f"{_loss(last.get('trailing_loss'))}  (held-out, {where})"),
        ("throughput", "-" if last.get("tokens_per_s") is None else f"{last['tokens_per_s']:,.0f} tokens/s"),
        ("wall time", format_duration(last.get("elapsed_s")) + "  (all sessions of this run)"),
    ]
    if last.get("skipped_steps"):
        lines.append(("skipped steps", f"{last['skipped_steps']} (non-finite loss or gradients)"))
    lines += [("metrics", str(out / "metrics.jsonl")), ("checkpoint", str(out / CKPT)),
              ("config", str(out / "config.json")), ("final row", f"{out / 'DONE'} (JSON)")]
    width = max(len(k) for k, _ in lines)
    return "\n".join([f"[train] {out}: {title}"] + [f"  {k:<{width}}  {v}" for k, v in lines])


# ---------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, cfg: RunConfig, device, amp, rank: int, world: int, micro: int) -> dict:
    """Held-out loss: mean over positions, trailing positions, and position buckets."""
    ctx = cfg.model.context
    offsets = eval_offsets(tokens.size, ctx, cfg.train.eval_seqs)[rank::world]
    pos_sum = torch.zeros(ctx, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for i in range(0, len(offsets), max(1, micro)):
        x, y = gather(tokens, offsets[i : i + micro], ctx)
        x, y = x.to(device), y.to(device)
        with amp():
            loss = model(x, y, reduction="none")
        pos_sum += loss.double().sum(0)
        count += x.shape[0]
    if world > 1:
        dist.all_reduce(pos_sum)
        dist.all_reduce(count)
    model.train(was_training)
    per_pos = (pos_sum / count).cpu()
    n_trail = max(1, int(round(ctx * cfg.train.trailing_frac)))
    buckets = [float(b.mean()) for b in torch.tensor_split(per_pos, cfg.train.n_buckets)]
    return {"val_loss": float(per_pos.mean()), "trailing_loss": float(per_pos[-n_trail:].mean()),
            "loss_by_bucket": buckets}


# ---------------------------------------------------------------------------------------
# training


def _setup_distributed(cfg: RunConfig):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    use_cuda = torch.cuda.is_available() if want == "auto" else want.startswith("cuda")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return world, rank, local_rank, device


def _check_resume(ckpt: dict, cfg: RunConfig, data_hash: str, allow_change: bool, log) -> list[str]:
    """The fields where the checkpoint's config or data differ from this run's; raises unless allowed."""
    diffs = []
    saved = ckpt.get("config")
    if saved is None:
        log("[train] warning: the checkpoint holds no config (older version): resuming without checking it")
    else:
        diffs += config_differences(saved, cfg.to_dict())
    saved_hash = ckpt.get("data_hash")
    if saved_hash is not None and saved_hash != data_hash:
        diffs.append(f"data_hash (checkpoint {saved_hash[:16]}..., now {data_hash[:16]}...)")
    if diffs and not allow_change:
        raise ConfigMismatchError(
            f"{cfg.train.out_dir}: the checkpoint (step {ckpt.get('step')}) was trained with another config or "
            f"data; refusing to resume. Differences: {'; '.join(diffs)}. Pass --allow_config_change true to "
            "resume anyway, or use another out_dir.")
    if diffs:
        log(f"[train] warning: resuming with changes (--allow_config_change): {'; '.join(diffs)}")
    return diffs


def train(cfg: RunConfig, allow_config_change: bool = False) -> dict:
    """Train (or resume, or skip when DONE) the run ``cfg`` describes; returns the last metrics.

    Raises ``TrainingError`` (no DONE is written) on a non-finite loss, on a checkpoint whose
    config or data differ from ``cfg`` (unless ``allow_config_change``), or when another trainer
    holds the run folder; ``CheckpointError`` when checkpoints exist but none is valid.
    """
    world, rank, _local_rank, device = _setup_distributed(cfg)
    t = cfg.train
    out = Path(t.out_dir)
    master = rank == 0
    done_path = out / "DONE"
    if done_path.exists():
        if master:
            print(f"[train] {out}: already DONE, skipping")
        return json.loads(done_path.read_text() or "{}")
    lock = RunLock(out) if master else None
    err = None
    if master:
        try:
            lock.acquire()
        except RunLockedError as exc:
            err = str(exc)
    if world > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise RunLockedError(err)
    try:
        if done_path.exists():  # finished by the trainer that held the lock a moment ago
            return json.loads(done_path.read_text() or "{}")
        return _train_locked(cfg, world, rank, device, allow_config_change)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: RunConfig, world: int, rank: int, device, allow_config_change: bool) -> dict:
    t = cfg.train
    out = Path(t.out_dir)
    master = rank == 0
    done_path = out / "DONE"

    def log(msg: str) -> None:
        if master:
            print(msg, file=sys.stderr, flush=True)

    if device.type == "cpu" and t.threads > 0:
        torch.set_num_threads(t.threads)

    examples, answer_mask = None, None
    if cfg.data.mix and str(cfg.data.mix).endswith(".npz") and cfg.data.mix_fraction > 0:
        # solved short-answer examples: example-aligned windows with answer-only loss on a
        # share of the steps; the main data is loaded without the mix
        examples = ExampleSet.load(cfg.data.mix)
        need = int((examples.answer_end - examples.starts).max()) - 1  # x covers prompt + answer - 1 bytes
        if need > cfg.model.context:
            raise ValueError(f"context must be >= {need} for the examples in {cfg.data.mix} (prompt + answer "
                             f"bytes - 1), got {cfg.model.context}: the answers would fall outside the windows")
        answer_mask = examples.answer_mask()
        data = load_data(dataclasses.replace(cfg.data, mix=None, mix_fraction=0.0))
        # the examples are part of the data: a resume with other examples is refused (data_hash)
        mixed = hashlib.sha256(f"{data.data_hash}|examples|{examples.data_hash()}".encode()).hexdigest()
        data = dataclasses.replace(data, data_hash=mixed)
    else:
        data = load_data(cfg.data)
    if data.vocab_size > cfg.model.vocab_size:
        cfg = apply_overrides(cfg, {"model.vocab_size": (data.vocab_size + 63) // 64 * 64})
    m = cfg.model

    if world > 1 and t.batch_size % world:
        raise ValueError(f"batch_size ({t.batch_size}) must be a multiple of the world size ({world})")
    per_rank = t.batch_size // world
    if per_rank % t.grad_accum:
        raise ValueError(f"per-rank batch ({per_rank}) must be a multiple of grad_accum ({t.grad_accum})")
    micro = per_rank // t.grad_accum
    tokens_per_step = t.batch_size * m.context
    max_steps = math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens > 0 else t.max_steps

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    model = GPT(m).to(device)
    counts = param_counts(model)
    fpt = flops_per_token(m, counts["non_embedding"])

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
        **({"fused": True} if device.type == "cuda" else {}),
    )

    start_step, loss_sum, loss_count, elapsed_before, skipped = 0, 0.0, 0, 0.0, 0
    changes: list[str] = []
    # every rank reads the checkpoint; only rank 0 reports what it rejected
    found = load_latest(out, map_location=device, log=log if master else (lambda msg: None))
    if found is not None:
        ckpt = found.state
        changes = _check_resume(ckpt, cfg, data.data_hash, allow_config_change, log)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        loss_sum, loss_count = ckpt["train_loss_sum"], ckpt["train_loss_count"]
        elapsed_before = ckpt["elapsed_s"]
        skipped = ckpt.get("skipped_steps", 0)
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        del ckpt
        log(f"[train] {out}: resuming from step {start_step} ({found.path.name})")
        if found.rejected and world > 1:
            dist.barrier()  # every rank has read its checkpoint before rank 0 renames the bad ones
        if found.rejected and master:
            moved = quarantine([p for p, _ in found.rejected])
            log(f"[train] moved the rejected checkpoint(s) aside: {', '.join(str(p) for p in moved)}")

    metrics_path = out / "metrics.jsonl"
    if master:
        # keep only the evaluations the checkpoint already covers (a kill may have left more),
        # in increasing step order, so a resumed run never repeats a row
        rows, last_step = [], 0
        for r in _read_metrics(metrics_path):
            if last_step < r.get("step", 0) <= start_step:
                rows.append(r)
                last_step = r["step"]
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        record = {
            **cfg.to_dict(),
            "data_config": dataclasses.asdict(cfg.data),  # the options: `--config` reads these
            "attention_kind": m.attention,
            "layer_modes": m.layer_modes(),
            "params": counts,
            "flops_per_token": fpt,
            "max_steps": max_steps,
            "tokens_per_step": tokens_per_step,
            "planned_tokens": max_steps * tokens_per_step,
            "planned_flops": fpt["dense"] * max_steps * tokens_per_step,
            "planned_attn_aware_flops": fpt["attn_aware"] * max_steps * tokens_per_step,
            "git": git_commit(),
            "versions": versions(),
            "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                       else platform.processor() or platform.machine(), "world_size": world,
                       "threads": torch.get_num_threads()},
            "data": {**data.describe(),  # what was loaded (hash, token counts)
                     **({"mix": {"source": cfg.data.mix, "fraction": cfg.data.mix_fraction, "format": "examples",
                                 "examples": len(examples), "answer_only_loss": True,
                                 "examples_hash": examples.data_hash(),
                                 "task": examples.info}} if examples is not None else {})},
            "resumed_from_step": start_step,
            "resumed_with_changes": changes,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(out / "config.json", dumps(record))

    run_model = model
    if t.compile and device.type == "cuda":
        run_model = torch.compile(model)
    ddp = world > 1
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run_model = DDP(run_model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")

    def amp():
        if use_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    # a terminal gets a progress bar; a log file (not a TTY) one line per evaluation instead
    bar, eval_lines = None, False
    if master and t.progress and start_step < max_steps:
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=max_steps, initial=start_step, desc=out.name, unit="step", dynamic_ncols=True,
                       leave=True, file=sys.stderr)
        else:
            eval_lines = True

    last = {}
    latest_val = None
    t0 = time.time()
    window_t, window_tok = time.time(), 0
    model.train()
    try:
        for step in range(start_step, max_steps):
            lr = lr_at(step, cfg, max_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            step_loss = torch.zeros((), device=device)
            task_step = examples is not None and task_step_at(t.seed, step, cfg.data.mix_fraction)
            for k in range(t.grad_accum):
                first = rank * per_rank + k * micro
                if task_step:
                    x, y = example_batch(examples, m.context, t.batch_size, t.seed, step, first, first + micro,
                                         answer_mask)
                else:
                    x, y = get_batch(data.train, m.context, t.batch_size, t.seed, step, first, first + micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = (k == t.grad_accum - 1) or not ddp
                with (contextlib.nullcontext() if sync else run_model.no_sync()):
                    with amp():
                        loss = run_model(x, y)
                    (loss / t.grad_accum).backward()
                step_loss += loss.detach().float() / t.grad_accum
            done_steps = step + 1
            if _fault("nan_loss_at_step") == done_steps:  # test hook
                step_loss = torch.full_like(step_loss, float("nan"))
            if ddp:  # before the update, so that every rank takes the same decision below
                dist.all_reduce(step_loss)
                step_loss /= world
            loss_val = float(step_loss)
            # a finite loss can still have non-finite gradients: never let them reach the weights
            if t.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
            else:
                grad_norm = float(torch.nn.utils.get_total_norm(
                    [p.grad for p in model.parameters() if p.grad is not None]))
            bad = not (math.isfinite(loss_val) and math.isfinite(grad_norm))
            if bad:
                what = f"train loss {loss_val} at step {done_steps} (grad norm {grad_norm})"
                if skipped >= t.skip_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{out}: non-finite {what}; stopping without DONE (the last checkpoint is intact; "
                        f"--skip_nonfinite_steps N skips up to N such steps; {skipped} skipped so far)")
                skipped += 1
                log(f"[train] warning: non-finite {what}: step skipped, no update "
                    f"({skipped}/{t.skip_nonfinite_steps} allowed)")
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss_sum += loss_val
                loss_count += 1
            window_tok += tokens_per_step

            if bar is not None:
                dt = time.time() - window_t
                tps = window_tok / dt if dt > 0 else 0.0
                post = {"loss": f"{loss_val:.3f}"}
                if latest_val is not None:
                    post["val"] = f"{latest_val:.3f}"
                post["tok/s"] = f"{tps:,.0f}"
                if peak:
                    post["mfu"] = f"{100 * tps * fpt['attn_aware'] / peak / world:.1f}%"
                bar.set_postfix(post, refresh=False)
                bar.update(1)

            is_eval = done_steps % t.eval_every == 0 or done_steps == max_steps
            ckpt_every = t.ckpt_every or t.eval_every
            is_ckpt = done_steps % ckpt_every == 0 or done_steps == max_steps
            if is_eval:
                ev = evaluate(run_model, data.val, cfg, device, amp, rank, world, micro)
                if _fault("nan_val_at_step") == done_steps:  # test hook
                    ev["val_loss"] = float("nan")
                bad_ev = [k for k in ("val_loss", "trailing_loss") if not math.isfinite(ev[k])]
                if bad_ev:
                    raise NonFiniteLossError(
                        f"{out}: non-finite {', '.join(f'{k} {ev[k]}' for k in bad_ev)} at step {done_steps}; "
                        "stopping without DONE (no metrics row or checkpoint written for this step)")
                tokens = done_steps * tokens_per_step
                elapsed = elapsed_before + time.time() - t0
                last = {
                    "step": done_steps,
                    "tokens": tokens,
                    "flops": fpt["dense"] * tokens,
                    "pflops_days": fpt["dense"] * tokens / PFLOPS_DAY,
                    "attn_aware_flops": fpt["attn_aware"] * tokens,
                    "attn_aware_pflops_days": fpt["attn_aware"] * tokens / PFLOPS_DAY,
                    "train_loss": loss_sum / max(1, loss_count),
                    **ev,
                    "lr": lr,
                    "elapsed_s": round(elapsed, 3),
                    "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                }
                if skipped:
                    last["skipped_steps"] = skipped
                loss_sum, loss_count = 0.0, 0
                latest_val = ev["val_loss"]
                if bar is not None:  # show this evaluation now, not at the next step
                    post["val"] = f"{latest_val:.3f}"
                    bar.set_postfix(post)
                if eval_lines:
                    session_s = time.time() - t0
                    eta = session_s / (done_steps - start_step) * (max_steps - done_steps)
                    log(eval_line(last, max_steps, window_tok / session_s if session_s > 0 else None, eta))
                if master:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                        f.flush()
                        os.fsync(f.fileno())
            if is_ckpt and master:
                state = {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": done_steps,
                    "train_loss_sum": loss_sum,
                    "train_loss_count": loss_count,
                    "skipped_steps": skipped,
                    "elapsed_s": elapsed_before + time.time() - t0,
                    "rng": {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                            "numpy": np.random.get_state(), "python": random.getstate()},
                    "config": cfg.to_dict(),
                    "data_hash": data.data_hash,
                }
                save_checkpoint(out, state, done_steps, torn_write=_fault("die_in_ckpt") == done_steps)
            if is_ckpt and ddp:
                dist.barrier()
            if _fault("exit_after_step") == done_steps:
                if bar is not None:
                    bar.close()
                sys.stderr.flush()
                os._exit(17)
            if _fault("stop_after_step") == done_steps:  # test hook: an in-process interruption
                raise InjectedFault(f"MOBA_SCALING_FAULT stop_after_step:{done_steps}")
            if _fault("sleep_after_step") == done_steps:  # test hook: a trainer that stays alive
                time.sleep(600)
    finally:
        if bar is not None:
            bar.close()
    if master:
        if not last:
            rows = _read_metrics(metrics_path)
            last = rows[-1] if rows else {}
        atomic_write_text(done_path, json.dumps(last))
    if ddp:
        dist.barrier()
    return last


def config_from_argv(argv: list[str]) -> RunConfig:
    """``--config PATH`` (a run's config.json, a sweep's launch.json or ``to_dict()`` JSON) then overrides."""
    overrides = parse_overrides(argv)
    base = RunConfig()
    cfg_path = overrides.pop("config", None)
    if cfg_path:
        saved = json.loads(Path(cfg_path).read_text())
        base = RunConfig.from_saved(saved, source=str(cfg_path))
    return apply_overrides(base, overrides)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("options (defaults):")
        for sec, obj in RunConfig().to_dict().items():
            for k, v in obj.items():
                print(f"  --{k} {v!r}  [{sec}]")
        print("  --allow_config_change false  [this invocation: resume a checkpoint whose config/data differ]")
        return
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        # a torchrun worker: die with the agent (its own session keeps it out of the agent's
        # process group, so nothing else would stop it if the agent is SIGKILLed)
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() == 1:
            sys.exit("[train] the launcher died before this worker started")
    # SIGTERM (from the launcher, a scheduler or the parent-death signal) unwinds the stack so
    # that the run-folder lock is released; the checkpoints are atomic either way
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    opts = parse_overrides(argv)
    allow = parse_bool(opts.pop("allow_config_change", "false"))
    argv = [x for k, v in opts.items() for x in (f"--{k}", v)]
    cfg = config_from_argv(argv)
    try:
        last = train(cfg, allow_config_change=allow)
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_summary(last, cfg.train.out_dir), flush=True)
    except (TrainingError, CheckpointError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
