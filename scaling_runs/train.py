"""Train one small GPT: ``python -m scaling_runs.train --out_dir runs/x --attention moba ...``.

Single process, or DDP through torchrun (``torchrun --nproc_per_node=8 -m scaling_runs.train
...``; gloo on CPU, nccl on CUDA; RANK / WORLD_SIZE / LOCAL_RANK from the environment).
``batch_size`` is the global batch in sequences: rank r reads sequences
``[r * B/world, (r+1) * B/world)`` of every step's global batch, split further into
``grad_accum`` micro-batches, so any (world size, grad_accum) gives the same losses up to
float rounding. Every field of ``scaling_runs.config`` is an option (``--n_layer 4`` or
``--model.n_layer 4``; see below); ``--config RUN/config.json`` starts from a saved run config
and the options given override it.

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
line per evaluation instead (step, tokens, losses, tokens/s, elapsed, ETA), and a step line
whenever a minute passed without a line; ``--progress false`` silences both. A resumed run says ``resuming from step N``. At the end a summary
(steps, tokens, final losses, tokens/s, wall time, file paths) goes to stdout; the final
metrics row as JSON is in ``DONE``.

Restarting the same command resumes from the newest checkpoint that verifies: same data
order (batches are a function of (seed, step)), and on CPU the same losses as an
uninterrupted run; metrics rows past the checkpoint's step are dropped (they are recomputed).
A run stops with an error (exit status 1, no ``DONE``) instead of training on bad state:
* checkpoint files exist but none verifies (a corrupt newest one falls back to the previous
  one with a message and is renamed ``*.corrupt``);
* the checkpoint needs arbitrary unpickling (checkpoints carry data, never code: they are read
  with ``weights_only=True``); ``--trust_checkpoint true`` reads a file written by an older
  version, and runs any code it holds;
* a non-finite train loss or gradient norm (``--skip_nonfinite_steps N`` skips up to N such
  steps without an update; 0 by default), or a non-finite validation loss;
* the checkpoint was trained with another config or other data (``data_hash``): the message
  names the fields; ``--allow_config_change true`` resumes anyway. Options that change what
  a run computes at most up to float rounding may change freely: ``out_dir``, ``progress``,
  ``cache_dir`` and ``skip_nonfinite_steps`` change no number; ``threads``, ``device`` and
  ``compile`` can change the rounding (CPU kernels split reductions by thread count, e.g. the
  torch path's flash formulation), so a resume is bitwise equal to an uninterrupted run only
  with the same values of these three;
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

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moba._core.hardware import DEVICES

try:
    import fcntl
except ImportError:  # not POSIX: the lock relies on its pid check alone
    fcntl = None

from .checkpoint import (  # noqa: F401 - CKPT_PREV, atomic_write_bytes, load_checkpoint: re-exported
    CKPT,
    CKPT_PREV,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    load_latest,
    quarantine,
    restore_rng,
    save_checkpoint,
)
from .cli import Parser, add_config_options, config_overrides
from .config import RunConfig, apply_overrides, config_differences, dumps, value_parser
from .data import TokenData, eval_offsets, gather, get_batch, load_data
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
# the training loop. Reading order: train -> setup (setup_distributed, load_run_data,
# batch_geometry, build_optimizer, resume, run_record) -> train_step (forward_backward) ->
# evaluate_and_log (evaluate) -> checkpoint (checkpoint_state) -> finish.


def train(cfg: RunConfig, allow_config_change: bool = False, *, trust_checkpoint: bool = False) -> dict:
    """Train (or resume, or skip when DONE) the run ``cfg`` describes; returns the last metrics.

    Raises ``TrainingError`` (no DONE is written) on a non-finite loss, on a checkpoint whose
    config or data differ from ``cfg`` (unless ``allow_config_change``), or when another trainer
    holds the run folder; ``CheckpointError`` when checkpoints exist but none is valid, and
    ``UntrustedCheckpointError`` when the checkpoint needs arbitrary unpickling (unless
    ``trust_checkpoint``, which runs any code the file holds).
    """
    world, rank, device = setup_distributed(cfg)
    out = Path(cfg.train.out_dir)
    if (out / "DONE").exists():
        if rank == 0:
            print(f"[train] {out}: already DONE, skipping")
        return _read_done(out)
    with run_folder_lock(out, rank, world):
        if (out / "DONE").exists():  # finished by the trainer that held the lock a moment ago
            return _read_done(out)
        run, state = setup(cfg, world, rank, device, allow_config_change, trust_checkpoint=trust_checkpoint)
        progress = Progress(run, state.step)
        last: dict = {}
        try:
            for step in range(state.step, run.max_steps):
                loss, lr = train_step(run, state, step)
                progress.stepped(loss)
                done_steps = state.step
                if done_steps % run.cfg.train.eval_every == 0 or done_steps == run.max_steps:
                    last = evaluate_and_log(run, state, lr)
                    progress.evaluated(last)
                ckpt_every = run.cfg.train.ckpt_every or run.cfg.train.eval_every
                if done_steps % ckpt_every == 0 or done_steps == run.max_steps:
                    checkpoint(run, state)
                _fault_hooks_after_step(done_steps, progress)
        finally:
            progress.close()
        return finish(run, last)


# ---------------------------------------------------------------------------------------
# setup: device and process group, data, model, optimizer, resume, run record


@dataclass
class Run:
    """What ``setup`` builds and the loop only reads."""

    cfg: RunConfig
    out: Path
    world: int
    rank: int
    device: torch.device
    data: TokenData
    examples: ExampleSet | None  # short-answer examples of an .npz mix (answer-only loss), or None
    answer_mask: np.ndarray | None
    model: torch.nn.Module  # the module whose state is checkpointed
    run_model: torch.nn.Module  # what runs the batches: ``model``, compiled and/or DDP-wrapped
    opt: torch.optim.Optimizer
    use_bf16: bool
    per_rank: int  # sequences per step on this rank
    micro: int  # sequences per micro-batch
    tokens_per_step: int  # all ranks together
    max_steps: int
    fpt: dict  # FLOPs per token: dense and attention-aware
    peak_flops: float | None  # of this GPU (MFU), None when unknown

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1

    def log(self, msg: str) -> None:
        if self.master:
            print(msg, file=sys.stderr, flush=True)

    def amp(self):
        """The autocast context of a forward pass (bfloat16 on CUDA by default)."""
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass
class TrainState:
    """What changes from step to step and goes into the checkpoint with the model and optimizer."""

    step: int = 0  # optimizer steps done
    loss_sum: float = 0.0  # train losses since the last evaluation (their mean is the row's train_loss)
    loss_count: int = 0
    skipped: int = 0  # non-finite steps skipped (--skip_nonfinite_steps)
    elapsed_before: float = 0.0  # seconds of the earlier sessions of this run
    session_start: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.session_start


def setup(cfg: RunConfig, world: int, rank: int, device: torch.device,
          allow_config_change: bool = False, *, trust_checkpoint: bool = False) -> tuple[Run, TrainState]:
    """Everything before the first step: data, batch geometry, model, optimizer, resume from
    the newest valid checkpoint, the run record (``config.json``), compile / DDP wrapping."""
    t = cfg.train
    if device.type == "cpu" and t.threads > 0:
        torch.set_num_threads(t.threads)
    cfg, data, examples, answer_mask = load_run_data(cfg)
    per_rank, micro, tokens_per_step, max_steps = batch_geometry(cfg, world)

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    model = GPT(cfg.model).to(device)
    counts = param_counts(model)
    fpt = flops_per_token(cfg.model, counts["non_embedding"])
    opt = build_optimizer(model, t, device)
    run = Run(cfg=cfg, out=Path(t.out_dir), world=world, rank=rank, device=device, data=data, examples=examples,
              answer_mask=answer_mask, model=model, run_model=model, opt=opt,
              use_bf16=t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda"),
              per_rank=per_rank, micro=micro, tokens_per_step=tokens_per_step, max_steps=max_steps, fpt=fpt,
              peak_flops=_peak_flops(device))

    state, changes = resume(run, allow_config_change, trust_checkpoint=trust_checkpoint)
    if run.master:
        _keep_metrics_up_to(run.out / "metrics.jsonl", state.step)
        atomic_write_text(run.out / "config.json", dumps(run_record(run, counts, state.step, changes)))

    if t.compile and device.type == "cuda":
        run.run_model = torch.compile(model)
    if t.context_parallel > 1:  # every sequence sharded over a cp group of a (dp, cp) DeviceMesh
        from scaling_runs.context_parallel import wrap

        run.run_model = wrap(run.run_model, t.context_parallel, world, device, cfg.model.context)
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.run_model = DDP(run.run_model, device_ids=[device.index] if device.type == "cuda" else None)
    state.session_start = time.time()  # this session's clock starts with its first step
    return run, state


def setup_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """(world size, rank, device) from torchrun's environment; initialises the process group
    (nccl on CUDA, gloo on CPU) when there is more than one process."""
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
    return world, rank, device


def load_run_data(cfg: RunConfig):
    """(cfg, data, examples, answer_mask): the tokens, plus the short-answer examples of an
    ``.npz`` mix; ``cfg``'s vocabulary is raised to the data's when it is smaller."""
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
    return cfg, data, examples, answer_mask


def batch_geometry(cfg: RunConfig, world: int) -> tuple[int, int, int, int]:
    """(sequences per rank per step, sequences per micro-batch, tokens per step, steps)."""
    t = cfg.train
    if world > 1 and t.batch_size % world:
        raise ValueError(f"batch_size ({t.batch_size}) must be a multiple of the world size ({world})")
    per_rank = t.batch_size // world
    if per_rank % t.grad_accum:
        raise ValueError(f"per-rank batch ({per_rank}) must be a multiple of grad_accum ({t.grad_accum})")
    tokens_per_step = t.batch_size * cfg.model.context
    max_steps = math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens > 0 else t.max_steps
    return per_rank, per_rank // t.grad_accum, tokens_per_step, max_steps


def build_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on the matrices only (not on norms and biases)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
        **({"fused": True} if device.type == "cuda" else {}),
    )


def resume(run: Run, allow_config_change: bool, *, trust_checkpoint: bool = False) -> tuple[TrainState, list[str]]:
    """The state of the newest checkpoint that verifies (model, optimizer, RNGs restored in
    place), or a fresh state; and the config fields that changed since that checkpoint.
    Checkpoints are read as data only unless ``trust_checkpoint`` (``checkpoint.load_file``)."""
    # every rank reads the checkpoint; only rank 0 reports what it rejected
    found = load_latest(run.out, map_location=run.device, log=run.log if run.master else (lambda msg: None),
                        trust_checkpoint=trust_checkpoint)
    if found is None:
        return TrainState(), []
    ckpt = found.state
    changes = _check_resume(ckpt, run.cfg, run.data.data_hash, allow_config_change, run.log)
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    restore_rng(ckpt["rng"], run.device)
    state = TrainState(step=ckpt["step"], loss_sum=ckpt["train_loss_sum"], loss_count=ckpt["train_loss_count"],
                       skipped=ckpt.get("skipped_steps", 0), elapsed_before=ckpt["elapsed_s"])
    run.log(f"[train] {run.out}: resuming from step {state.step} ({found.path.name})")
    if found.rejected and run.ddp:
        dist.barrier()  # every rank has read its checkpoint before rank 0 renames the bad ones
    if found.rejected and run.master:
        moved = quarantine([p for p, _ in found.rejected])
        run.log(f"[train] moved the rejected checkpoint(s) aside: {', '.join(str(p) for p in moved)}")
    return state, changes


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


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """Keep only the evaluations the checkpoint covers (a kill may have left more), in increasing
    step order, so a resumed run never repeats a row."""
    rows, last_step = [], 0
    for r in _read_metrics(path):
        if last_step < r.get("step", 0) <= step:
            rows.append(r)
            last_step = r["step"]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_record(run: Run, counts: dict, start_step: int, changes: list[str]) -> dict:
    """``config.json``: the config, sizes, FLOPs, plan, git commit, versions, device and data."""
    cfg, m, examples = run.cfg, run.cfg.model, run.examples
    mix = {}
    if examples is not None:
        mix = {"mix": {"source": cfg.data.mix, "fraction": cfg.data.mix_fraction, "format": "examples",
                       "examples": len(examples), "answer_only_loss": True, "examples_hash": examples.data_hash(),
                       "task": examples.info}}
    return {
        **cfg.to_dict(),
        "data_config": dataclasses.asdict(cfg.data),  # the options: `--config` reads these
        "attention_kind": m.attention,
        "layer_modes": m.layer_modes(),
        "params": counts,
        "flops_per_token": run.fpt,
        "max_steps": run.max_steps,
        "tokens_per_step": run.tokens_per_step,
        "planned_tokens": run.max_steps * run.tokens_per_step,
        "planned_flops": run.fpt["dense"] * run.max_steps * run.tokens_per_step,
        "planned_attn_aware_flops": run.fpt["attn_aware"] * run.max_steps * run.tokens_per_step,
        "git": git_commit(),
        "versions": versions(),
        "device": {"type": run.device.type,
                   "name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda"
                   else platform.processor() or platform.machine(), "world_size": run.world,
                   "threads": torch.get_num_threads(), **cpu_description()},
        "data": {**run.data.describe(), **mix},  # what was loaded (hash, token counts)
        "resumed_from_step": start_step,
        "resumed_with_changes": changes,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------
# one optimizer step


def train_step(run: Run, state: TrainState, step: int) -> tuple[float, float]:
    """Step ``step`` (0-based): learning rate, forward/backward over the micro-batches, the
    loss averaged over ranks, gradient clipping, and the update, unless the loss or gradient
    norm is non-finite (then the step is skipped, or the run stops). Returns (loss, lr)."""
    t = run.cfg.train
    lr = lr_at(step, run.cfg, run.max_steps)
    for g in run.opt.param_groups:
        g["lr"] = lr
    step_loss = forward_backward(run, step)
    done_steps = step + 1
    if _fault("nan_loss_at_step") == done_steps:  # test hook
        step_loss = torch.full_like(step_loss, float("nan"))
    if run.ddp:  # before the update, so that every rank takes the same decision below
        dist.all_reduce(step_loss)
        step_loss /= run.world
    loss = float(step_loss)
    # a finite loss can still have non-finite gradients: never let them reach the weights
    params = run.model.parameters()
    if t.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    if math.isfinite(loss) and math.isfinite(grad_norm):
        run.opt.step()
        state.loss_sum += loss
        state.loss_count += 1
    else:
        what = f"train loss {loss} at step {done_steps} (grad norm {grad_norm})"
        if state.skipped >= t.skip_nonfinite_steps:
            raise NonFiniteLossError(
                f"{run.out}: non-finite {what}; stopping without DONE (the last checkpoint is intact; "
                f"--skip_nonfinite_steps N skips up to N such steps; {state.skipped} skipped so far)")
        state.skipped += 1
        run.log(f"[train] warning: non-finite {what}: step skipped, no update "
                f"({state.skipped}/{t.skip_nonfinite_steps} allowed)")
    run.opt.zero_grad(set_to_none=True)
    state.step = done_steps
    return loss, lr


def forward_backward(run: Run, step: int) -> torch.Tensor:
    """This rank's share of step ``step``'s global batch, in ``grad_accum`` micro-batches;
    gradients accumulate in the parameters (DDP syncs them on the last micro-batch only).
    Returns this rank's mean loss (a 0-dim tensor)."""
    t, m = run.cfg.train, run.cfg.model
    step_loss = torch.zeros((), device=run.device)
    task_step = run.examples is not None and task_step_at(t.seed, step, run.cfg.data.mix_fraction)
    for k in range(t.grad_accum):
        first = run.rank * run.per_rank + k * run.micro
        if task_step:
            x, y = example_batch(run.examples, m.context, t.batch_size, t.seed, step, first, first + run.micro,
                                 run.answer_mask)
        else:
            x, y = get_batch(run.data.train, m.context, t.batch_size, t.seed, step, first, first + run.micro)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        sync = (k == t.grad_accum - 1) or not run.ddp
        with (contextlib.nullcontext() if sync else run.run_model.no_sync()):
            with run.amp():
                loss = run.run_model(x, y)
            (loss / t.grad_accum).backward()
        step_loss += loss.detach().float() / t.grad_accum
    return step_loss


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


def evaluate_and_log(run: Run, state: TrainState, lr: float) -> dict:
    """Evaluate after step ``state.step``, append the metrics row to ``metrics.jsonl`` (rank 0)
    and start a new train-loss mean; returns the row. A non-finite val loss stops the run."""
    ev = evaluate(run.run_model, run.data.val, run.cfg, run.device, run.amp, run.rank, run.world, run.micro)
    if _fault("nan_val_at_step") == state.step:  # test hook
        ev["val_loss"] = float("nan")
    bad = [k for k in ("val_loss", "trailing_loss") if not math.isfinite(ev[k])]
    if bad:
        raise NonFiniteLossError(
            f"{run.out}: non-finite {', '.join(f'{k} {ev[k]}' for k in bad)} at step {state.step}; "
            "stopping without DONE (no metrics row or checkpoint written for this step)")
    tokens = state.step * run.tokens_per_step
    elapsed = state.elapsed()
    row = {
        "step": state.step,
        "tokens": tokens,
        "flops": run.fpt["dense"] * tokens,
        "pflops_days": run.fpt["dense"] * tokens / PFLOPS_DAY,
        "attn_aware_flops": run.fpt["attn_aware"] * tokens,
        "attn_aware_pflops_days": run.fpt["attn_aware"] * tokens / PFLOPS_DAY,
        "train_loss": state.loss_sum / max(1, state.loss_count),
        **ev,
        "lr": lr,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
    }
    if state.skipped:
        row["skipped_steps"] = state.skipped
    state.loss_sum, state.loss_count = 0.0, 0
    if run.master:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return row


# ---------------------------------------------------------------------------------------
# checkpoint and finish (the file format and atomic writes: scaling_runs.checkpoint)


def checkpoint(run: Run, state: TrainState) -> None:
    """Rank 0 writes ``ckpt.pt`` (atomically, the previous one kept); every rank waits for it."""
    if run.master:
        save_checkpoint(run.out, checkpoint_state(run, state), torn_write=_fault("die_in_ckpt") == state.step)
    if run.ddp:
        dist.barrier()


def checkpoint_state(run: Run, state: TrainState) -> dict:
    """What a resume needs: weights, optimizer, the ``TrainState``, RNGs, config and data hash."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "step": state.step,
        "train_loss_sum": state.loss_sum,
        "train_loss_count": state.loss_count,
        "skipped_steps": state.skipped,
        "elapsed_s": state.elapsed(),
        "rng": capture_rng(run.device),
        "config": run.cfg.to_dict(),
        "data_hash": run.data.data_hash,
    }


def finish(run: Run, last: dict) -> dict:
    """Write ``DONE`` (rank 0) with the final metrics row; returns it."""
    if run.master:
        if not last:  # nothing evaluated in this session: the last row of an earlier one
            rows = _read_metrics(run.out / "metrics.jsonl")
            last = rows[-1] if rows else {}
        atomic_write_text(run.out / "DONE", json.dumps(last))
    if run.ddp:
        dist.barrier()
    return last


def _read_done(out: Path) -> dict:
    return json.loads((out / "DONE").read_text() or "{}")


# ---------------------------------------------------------------------------------------
# progress and reports


class Progress:
    """Rank 0's progress on stderr: a tqdm bar on a terminal (train loss, latest val loss,
    tokens/s, MFU on known GPUs); otherwise (a log file) one line per evaluation, and a step
    line whenever ``line_every_s`` seconds passed without one (a log never stays silent for
    minutes between evaluations)."""

    #: a log gets a step line when this many seconds passed since its last line
    line_every_s: float = 60.0

    def __init__(self, run: Run, start_step: int):
        self.run, self.start_step = run, start_step
        self.last_line = time.time()
        self.bar, self.lines = None, False
        if run.master and run.cfg.train.progress and start_step < run.max_steps:
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=run.max_steps, initial=start_step, desc=run.out.name, unit="step",
                                dynamic_ncols=True, leave=True, file=sys.stderr)
            else:
                self.lines = True
        self.t0 = time.time()
        self.tokens = 0  # trained in this session
        self.steps_done = 0  # in this session
        self.post: dict = {}
        self.latest_val: float | None = None

    def stepped(self, loss: float) -> None:
        self.tokens += self.run.tokens_per_step
        self.steps_done += 1
        if self.lines and time.time() - self.last_line >= self.line_every_s:
            self.last_line = time.time()
            session_s = self.last_line - self.t0
            step = self.start_step + self.steps_done
            eta = session_s / self.steps_done * (self.run.max_steps - step)
            tps = f"{self.tokens / session_s:,.0f}" if session_s > 0 else "-"
            self.run.log(f"[train] progress: step {step}/{self.run.max_steps} ({100 * step / max(1, self.run.max_steps):.0f}%)  "
                         f"train {_loss(loss)} (this step)  {tps} tok/s  "
                         f"elapsed {format_duration(session_s)} (this session)  eta {format_duration(eta)}")
        if self.bar is None:
            return
        dt = time.time() - self.t0
        tps = self.tokens / dt if dt > 0 else 0.0
        self.post = {"loss": f"{loss:.3f}"}
        if self.latest_val is not None:
            self.post["val"] = f"{self.latest_val:.3f}"
        self.post["tok/s"] = f"{tps:,.0f}"
        if self.run.peak_flops:
            self.post["mfu"] = f"{100 * tps * self.run.fpt['attn_aware'] / self.run.peak_flops / self.run.world:.1f}%"
        self.bar.set_postfix(self.post, refresh=False)
        self.bar.update(1)

    def evaluated(self, row: dict) -> None:
        self.latest_val = row["val_loss"]
        if self.bar is not None:  # show this evaluation now, not at the next step
            self.post["val"] = f"{self.latest_val:.3f}"
            self.bar.set_postfix(self.post)
        if self.lines:
            self.last_line = time.time()
            session_s = time.time() - self.t0
            eta = session_s / (row["step"] - self.start_step) * (self.run.max_steps - row["step"])
            self.run.log(eval_line(row, self.run.max_steps, self.tokens / session_s if session_s > 0 else None, eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------
# helpers: fault hooks, the run-folder lock, run metadata, schedule, formatting


def _fault(kind: str) -> int | None:
    spec = os.environ.get("MOBA_SCALING_FAULT", "")
    if spec.startswith(kind + ":"):
        return int(spec.split(":", 1)[1])
    return None


def _fault_hooks_after_step(done_steps: int, progress: Progress) -> None:
    """The ``MOBA_SCALING_FAULT`` test hooks that act once a step is finished."""
    if _fault("exit_after_step") == done_steps:
        progress.close()
        sys.stderr.flush()
        os._exit(17)
    if _fault("stop_after_step") == done_steps:  # an in-process interruption
        raise InjectedFault(f"MOBA_SCALING_FAULT stop_after_step:{done_steps}")
    if _fault("sleep_after_step") == done_steps:  # a trainer that stays alive
        time.sleep(600)


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


@contextlib.contextmanager
def run_folder_lock(out: Path, rank: int, world: int):
    """Rank 0 holds ``out/train.lock`` for the block; every rank raises ``RunLockedError`` when
    another trainer holds it (rank 0 tells the others)."""
    lock = RunLock(out) if rank == 0 else None
    err = None
    if lock is not None:
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
        yield
    finally:
        if lock is not None:
            lock.release()


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


def cpu_description() -> dict:
    """The CPU model and the instruction set torch's CPU kernels run with ("AVX2", "AVX512", ...).

    CPU training is deterministic on one machine, but float rounding inside the CPU kernels
    depends on the instruction set, so the same command on another CPU can train a different
    model; recording both says which runs are comparable bit for bit.
    """
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux: keep platform's name
        pass
    return {"cpu_model": model, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


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
# command line


def build_parser() -> Parser:
    """``python -m scaling_runs.train``'s options: ``--config``, ``--allow_config_change`` and
    one option per config field (``scaling_runs.cli``)."""
    p = Parser("python -m scaling_runs.train", __doc__,
               usage="%(prog)s [--config JSON] [--allow_config_change BOOL] [--trust_checkpoint BOOL] "
                     "[--OPTION VALUE ...]")
    p.add_argument("--config", metavar="JSON", default=None,
                   help="start from a saved config: a run's config.json, a sweep's launch.json or "
                        "RunConfig.to_dict() JSON; the options below override its values")
    p.add_argument("--allow_config_change", type=value_parser(bool), default=False, metavar="BOOL",
                   help="resume a checkpoint whose config or data differ (the changes are recorded)")
    p.add_argument("--trust_checkpoint", type=value_parser(bool), default=False, metavar="BOOL",
                   help="resume a checkpoint that needs arbitrary unpickling (written by an older version); "
                        "this runs any code the file holds: only for files you wrote yourself")
    add_config_options(p, default_note=None)
    return p


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """The run config of parsed options: ``--config``'s file (or the defaults), then the options."""
    base = RunConfig()
    if ns.config:
        if not Path(ns.config).is_file():
            raise ValueError(f"--config {ns.config}: no such file (a run's config.json, a sweep's launch.json, ...)")
        saved = json.loads(Path(ns.config).read_text())
        base = RunConfig.from_saved(saved, source=str(ns.config))
    return apply_overrides(base, config_overrides(ns))


def config_from_argv(argv: list[str]) -> RunConfig:
    """``--config PATH`` (a run's config.json, a sweep's launch.json or ``to_dict()`` JSON) then overrides."""
    return config_from_args(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns)
    except (OSError, ValueError, TypeError) as exc:  # an unreadable --config, a value the config rejects
        parser.error(str(exc))
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        # a torchrun worker: die with the agent (its own session keeps it out of the agent's
        # process group, so nothing else would stop it if the agent is SIGKILLed)
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() == 1:
            sys.exit("[train] the launcher died before this worker started")
    # SIGTERM (from the launcher, a scheduler or the parent-death signal) unwinds the stack so
    # that the run-folder lock is released; the checkpoints are atomic either way
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        last = train(cfg, allow_config_change=ns.allow_config_change, trust_checkpoint=ns.trust_checkpoint)
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_summary(last, cfg.train.out_dir), flush=True)
    except (TrainingError, CheckpointError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "scaling_runs.train"))
