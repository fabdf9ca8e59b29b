"""Train one small GPT: ``python -m scaling_runs.train --out_dir runs/x --attention moba ...``.

Single process, or DDP through torchrun (``torchrun --nproc_per_node=8 -m scaling_runs.train
...``; gloo on CPU, nccl on CUDA; RANK / WORLD_SIZE / LOCAL_RANK from the environment).
``batch_size`` is the global batch in sequences: rank r reads sequences
``[r * B/world, (r+1) * B/world)`` of every step's global batch, split further into
``grad_accum`` micro-batches, so any (world size, grad_accum) gives the same losses up to
float rounding. Every option of ``scaling_runs.config`` is a ``--key value`` flag;
``--config run/config.json`` starts from a saved run config.

Run directory (``out_dir``):
* ``config.json``: the full config, attention kind, parameter counts, FLOPs per token, git
  commit, versions, device, data description and hash (written at every start);
* ``metrics.jsonl``: one JSON object per evaluation (step, tokens, flops, pflops_days,
  attn_aware_flops, train_loss, val_loss, trailing_loss, loss_by_bucket, lr, elapsed_s, ...);
* ``ckpt.pt`` (+ ``ckpt_prev.pt``): model, optimizer, step, RNG states, running train loss,
  elapsed time; written to a temporary file, fsynced, then ``os.replace``d, so a kill at any
  moment (even ``kill -9`` during the write) leaves the last good checkpoint;
* ``DONE``: written last, with the final metrics; a run with ``DONE`` is not trained again.

Restarting the same command resumes from the checkpoint: same data order (batches are a
function of (seed, step)), and on CPU the same losses as an uninterrupted run.

Fault injection for tests: ``MOBA_SCALING_FAULT=exit_after_step:N`` exits (os._exit) right
after step N (1-based count of finished steps); ``die_in_ckpt:N`` exits halfway through
writing the checkpoint of step N.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import RunConfig, apply_overrides, dumps, parse_overrides
from .data import eval_offsets, gather, get_batch, load_data
from .flops import PFLOPS_DAY, flops_per_token
from .model import GPT, param_counts

CKPT = "ckpt.pt"
CKPT_PREV = "ckpt_prev.pt"

# Dense bf16 peak FLOP/s by device-name substring, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "4090": 165e12}


# ---------------------------------------------------------------------------------------
# helpers


def _fault(kind: str) -> int | None:
    spec = os.environ.get("MOBA_SCALING_FAULT", "")
    if spec.startswith(kind + ":"):
        return int(spec.split(":", 1)[1])
    return None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: tmp file, fsync, os.replace, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(out: Path, state: dict, step: int) -> None:
    """Write ``ckpt.pt`` atomically; the checkpoint it replaces is kept as ``ckpt_prev.pt``."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    cur, tmp = out / CKPT, out / (CKPT + ".tmp")
    with open(tmp, "wb") as f:
        data = buf.getvalue()
        if _fault("die_in_ckpt") == step:  # test hook: a torn write, then a hard exit
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os._exit(17)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if cur.exists():
        os.replace(cur, out / CKPT_PREV)
    os.replace(tmp, cur)
    _fsync_dir(out)


def load_checkpoint(out: Path, map_location) -> dict | None:
    """The newest readable checkpoint (ckpt.pt, else ckpt_prev.pt), or None. Ignores *.tmp."""
    for name in (CKPT, CKPT_PREV):
        path = out / name
        if not path.exists():
            continue
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a torn/corrupt file: fall back to the older one
            print(f"[train] warning: cannot read {path} ({type(exc).__name__}: {exc}); trying an older one",
                  file=sys.stderr)
    return None


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


def train(cfg: RunConfig) -> dict:
    """Train (or resume, or skip when DONE) the run ``cfg`` describes; returns the last metrics."""
    world, rank, _local_rank, device = _setup_distributed(cfg)
    t = cfg.train
    out = Path(t.out_dir)
    master = rank == 0
    done_path = out / "DONE"
    if done_path.exists():
        if master:
            print(f"[train] {out}: already DONE, skipping")
        return json.loads(done_path.read_text() or "{}")
    if master:
        out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu" and t.threads > 0:
        torch.set_num_threads(t.threads)

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

    start_step, loss_sum, loss_count, elapsed_before = 0, 0.0, 0, 0.0
    ckpt = load_checkpoint(out, map_location=device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        loss_sum, loss_count = ckpt["train_loss_sum"], ckpt["train_loss_count"]
        elapsed_before = ckpt["elapsed_s"]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])

    metrics_path = out / "metrics.jsonl"
    if master:
        # keep only the evaluations the checkpoint already covers (a kill may have left more)
        rows = [r for r in _read_metrics(metrics_path) if r.get("step", 0) <= start_step]
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        record = {
            **cfg.to_dict(),
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
            "data": data.describe(),
            "resumed_from_step": start_step,
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

    bar = None
    if master and t.progress and start_step < max_steps:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=start_step, desc=out.name, unit="step", dynamic_ncols=True,
                   leave=True, file=sys.stderr)

    last = {}
    t0 = time.time()
    window_t, window_tok = time.time(), 0
    model.train()
    for step in range(start_step, max_steps):
        lr = lr_at(step, cfg, max_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for k in range(t.grad_accum):
            first = rank * per_rank + k * micro
            x, y = get_batch(data.train, m.context, t.batch_size, t.seed, step, first, first + micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = (k == t.grad_accum - 1) or not ddp
            with (contextlib.nullcontext() if sync else run_model.no_sync()):
                with amp():
                    loss = run_model(x, y)
                (loss / t.grad_accum).backward()
            step_loss += loss.detach().float() / t.grad_accum
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(step_loss)
            step_loss /= world
        loss_val = float(step_loss)
        loss_sum += loss_val
        loss_count += 1
        done_steps = step + 1
        window_tok += tokens_per_step

        if bar is not None:
            dt = time.time() - window_t
            tps = window_tok / dt if dt > 0 else 0.0
            post = {"loss": f"{loss_val:.3f}", "tok/s": f"{tps:,.0f}"}
            if peak:
                post["mfu"] = f"{100 * tps * fpt['attn_aware'] / peak / world:.1f}%"
            bar.set_postfix(post, refresh=False)
            bar.update(1)

        is_eval = done_steps % t.eval_every == 0 or done_steps == max_steps
        ckpt_every = t.ckpt_every or t.eval_every
        is_ckpt = done_steps % ckpt_every == 0 or done_steps == max_steps
        if is_eval:
            ev = evaluate(run_model, data.val, cfg, device, amp, rank, world, micro)
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
            loss_sum, loss_count = 0.0, 0
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
                "elapsed_s": elapsed_before + time.time() - t0,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "numpy": np.random.get_state(), "python": random.getstate()},
                "config": cfg.to_dict(),
            }
            save_checkpoint(out, state, done_steps)
        if is_ckpt and ddp:
            dist.barrier()
        if _fault("exit_after_step") == done_steps:
            if bar is not None:
                bar.close()
            sys.stderr.flush()
            os._exit(17)
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
    overrides = parse_overrides(argv)
    base = RunConfig()
    cfg_path = overrides.pop("config", None)
    if cfg_path:
        saved = json.loads(Path(cfg_path).read_text())
        base = RunConfig.from_dict({k: saved[k] for k in ("model", "data", "train") if k in saved})
    return apply_overrides(base, overrides)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("options (defaults):")
        for sec, obj in RunConfig().to_dict().items():
            for k, v in obj.items():
                print(f"  --{k} {v!r}  [{sec}]")
        return
    cfg = config_from_argv(argv)
    try:
        last = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(last))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
