"""Inference compute scaling of a MoBA checkpoint: task accuracy and loss vs attended-key budget.

    python -m scaling_runs.eval_budget runs/cpu-tiny/s3-moba                 # run dir or ckpt.pt
    python -m scaling_runs.eval_budget RUN --budgets 512,1k,2k,4k,8k --lengths 4k,8k
    python -m scaling_runs.eval_budget RUN --pairs 64/3,64/6,128/3 --out results/x

Budget = keys a query may attend to = ``top_k x block_size``. ``--budgets`` keeps the model's
block size and sets ``top_k = budget / block_size``; ``--pairs BLOCK/TOP_K`` (``64/3``: block 64, top-3) sets both. Default
(``--budgets auto``): ``block_size x 1, 2, 4, ...`` up to the longest evaluated context (for the
paper's 8K / block-512 models: 512, 1k, 2k, 4k, 8k). Dense (full) attention is always
evaluated as the reference. The budget is applied to every layer that is MoBA in the run's
config (every layer for a run trained with full attention).

At every budget:
* task accuracy (``scaling_runs.tasks``: passkey, multikey, mqar) by context length x depth,
  greedy decoding of the answer bytes with the KV cache (``moba.KVCache``: one prefill, then
  sparse ``moba_decode`` steps);
* held-out LM loss, trailing loss (last 25% of positions) and loss by position on
  ``--loss_seqs`` windows of ``--loss_context`` bytes of the run's validation split;
* attended keys per query, measured: the q / k that reach the first MoBA core on a held-out
  window go through ``moba.select_blocks``.

Writes to ``--out`` (default ``RUN/budget_sweep``): ``budget_sweep.json``,
``performance_vs_budget.png`` (like the "Inference Compute Scaling" chart, dense dashed),
``answer_loss_vs_budget.png`` (teacher-forced loss of the answer bytes: a soft score that
moves before exact match does, useful for tiny models), ``accuracy_heatmap.png`` (context
length x depth, one panel per budget) and ``loss_by_position.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from moba import KVCache, select_blocks
from moba._core import cli
from moba._core.accounting import attended_keys_from_indices
from moba._core.sizes import parse_block_topk, parse_size
from moba.nn import attention_modules

from . import tasks as T
from .checkpoint import atomic_write_text, load_model
from .cli import Parser, checked
from .config import DataConfig
from .data import eval_offsets, gather, load_data
from .model import GPT

# ---------------------------------------------------------------------------------------
# parsing


def fmt_size(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"64/3,64/6"`` (``BLOCK/TOP_K``, the notation of every command line) -> [(3, 64), (6, 64)]
    as (top_k, block_size). The old ``3x64`` is refused with a pointer (``64x3`` would have run
    top_k=64 with blocks of 3)."""
    return [(k, b) for b, k in (parse_block_topk(part) for part in text.split(",") if part.strip())]


def budget_settings(block_size: int, budgets: list[int] | None = None, pairs: list[tuple[int, int]] | None = None,
                    max_context: int | None = None) -> list[dict]:
    """The (top_k, block_size) settings to evaluate, each with its budget and a name."""
    if pairs:
        settings = [(k, b) for k, b in pairs]
    else:
        if not budgets:
            if max_context is None:
                raise ValueError("automatic budgets need max_context")
            budgets, b = [], block_size
            while True:
                budgets.append(b)
                if b >= max_context:
                    break
                b *= 2
        settings = [(max(1, n // block_size), block_size) for n in budgets]
    out, seen = [], set()
    for k, b in settings:
        if (k, b) in seen:
            continue
        seen.add((k, b))
        name = fmt_size(k * b) if not pairs else f"{fmt_size(b)}/{k}"
        out.append({"name": name, "mode": "moba", "top_k": k, "block_size": b, "budget": k * b})
    if max_context is not None:
        # A budget that covers the whole context attends every key: it is dense attention again.
        dense = [s["name"] for s in out if s["budget"] > max_context]
        if dense and (budgets or pairs):  # explicit budgets only (the automatic ones stop at the context)
            warnings.warn(
                f"budgets {', '.join(dense)} exceed the longest evaluated context ({max_context} tokens): "
                "they equal dense attention", stacklevel=2,
            )
    return out


# ---------------------------------------------------------------------------------------
# model


class BudgetSetter:
    """Sets the attention cores of a model to a budget setting (or dense) and back."""

    def __init__(self, model: GPT):
        self.cores = attention_modules(model)
        modes = model.cfg.layer_modes()
        self.layers = [i for i, m in enumerate(modes) if m == "moba"] or list(range(len(self.cores)))
        self.original = [(c.mode, c.top_k, c.block_size) for c in self.cores]

    def apply(self, setting: dict) -> None:
        self.restore()
        for i in self.layers:
            core = self.cores[i]
            if setting["mode"] == "full":
                core.mode = "full"
            else:
                core.mode, core.top_k, core.block_size = "moba", setting["top_k"], setting["block_size"]

    def restore(self) -> None:
        for core, (mode, k, b) in zip(self.cores, self.original, strict=True):
            core.mode, core.top_k, core.block_size = mode, k, b


def attended_keys(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """Keys each causal MoBA query attends to, (B, S, Hq) float: through ``moba.select_blocks``.

    A selected past block contributes ``block_size`` keys (the last block may be shorter),
    the own block the keys up to and including the query.
    """
    idx = select_blocks(q, k, block_size, top_k, causal=True)  # (B, S, Hq, n)
    return attended_keys_from_indices(idx, block_size, causal=True).float()


@torch.no_grad()
def measure_attended_keys(model: GPT, setter: BudgetSetter, setting: dict, x: torch.Tensor) -> dict:
    """Mean / max attended keys per query (over queries, heads and MoBA layers) for input x."""
    if setting["mode"] == "full":
        s = x.shape[1]
        return {"mean": (s + 1) / 2, "max": float(s), "measured_on": s}
    captured = []
    hooks = [setter.cores[i].register_forward_pre_hook(lambda m, args: captured.append((args[0], args[1])))
             for i in setter.layers]
    try:
        setter.apply(setting)
        model(x)
    finally:
        for h in hooks:
            h.remove()
    counts = torch.cat([attended_keys(q, k, setting["block_size"], setting["top_k"]).flatten() for q, k in captured])
    return {"mean": float(counts.mean()), "max": float(counts.max()), "measured_on": int(x.shape[1])}


# ---------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def greedy_decode(model: GPT, prompts: list[bytes], n_new: int, batch: int = 16, device="cpu") -> list[str]:
    """Greedy continuation of ``n_new`` bytes for every prompt. Prompts of equal length are
    batched together and share one ``moba.KVCache``: one prefill, then one token per forward
    (MoBA layers decode with ``moba_decode`` at the budget's top_k / block size)."""
    out: list[str | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for ids in by_len.values():
        for j in range(0, len(ids), batch):
            chunk = ids[j : j + batch]
            x = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
            cache, gen = KVCache(), []
            for _ in range(n_new):
                nxt = model(x, cache=cache, logits_to_keep=1)[:, -1].argmax(-1)
                gen.append(nxt)
                x = nxt[:, None]
            rows = torch.stack(gen, 1).tolist() if gen else [[] for _ in chunk]
            for i, row in zip(chunk, rows, strict=True):
                out[i] = bytes(b for b in row if b < 256).decode("latin-1")
    return out  # type: ignore[return-value]


@torch.no_grad()
def answer_nll(model: GPT, prompts: list[bytes], targets: list[bytes], batch: int = 16, device="cpu") -> list[float]:
    """Teacher-forced mean loss (nats / byte) of each target's bytes after its prompt: a soft
    score that moves before exact match does (prompt + target lengths equal -> batched)."""
    out: list[float] = [math.nan] * len(prompts)
    by_len: dict[tuple[int, int], list[int]] = {}
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        by_len.setdefault((len(p), len(t)), []).append(i)
    for (lp, lt), ids in by_len.items():
        if lt == 0:
            continue
        for j in range(0, len(ids), batch):
            chunk = ids[j : j + batch]
            seq = torch.tensor([list(prompts[i] + targets[i]) for i in chunk], dtype=torch.long, device=device)
            logits = model(seq[:, :-1])[:, lp - 1 :].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), seq[:, lp:], reduction="none")
            for i, v in zip(chunk, nll.mean(1).tolist(), strict=True):
                out[i] = v
    return out


@torch.no_grad()
def loss_by_position(model: GPT, tokens: np.ndarray, context: int, n_seqs: int, batch: int = 8,
                     device="cpu") -> torch.Tensor:
    """Per-position mean next-token loss (context,) over fixed evenly spaced windows."""
    offsets = eval_offsets(tokens.size, context, n_seqs)
    total = torch.zeros(context, dtype=torch.float64)
    for i in range(0, len(offsets), batch):
        x, y = gather(tokens, offsets[i : i + batch], context)
        total += model(x.to(device), y.to(device), reduction="none").double().sum(0).cpu()
    return total / len(offsets)


def loss_summary(per_pos: torch.Tensor, trailing_frac: float = 0.25, n_buckets: int = 4, n_curve: int = 32) -> dict:
    ctx = per_pos.numel()
    n_trail = max(1, int(round(ctx * trailing_frac)))
    curve = torch.tensor_split(per_pos, min(n_curve, ctx))
    pos = torch.tensor_split(torch.arange(ctx, dtype=torch.float64), min(n_curve, ctx))
    return {
        "val_loss": float(per_pos.mean()),
        "trailing_loss": float(per_pos[-n_trail:].mean()),
        "loss_by_bucket": [float(b.mean()) for b in torch.tensor_split(per_pos, n_buckets)],
        "loss_by_position": {"position": [float(p.mean()) for p in pos], "loss": [float(c.mean()) for c in curve]},
    }


def _load_val(cfg: dict, data: str | None) -> np.ndarray | None:
    try:
        dcfg = DataConfig(**cfg.get("data", {}))
        if data is not None:
            dcfg = DataConfig(data=data, val_fraction=dcfg.val_fraction, cache_dir=dcfg.cache_dir)
        return load_data(dcfg).val
    except (ValueError, OSError) as exc:
        print(f"[eval_budget] warning: no validation tokens ({exc}); skipping the LM loss", file=sys.stderr)
        return None


def run_sweep(checkpoint: str | Path, out: str | Path | None = None, budgets: list[int] | None = None,
              pairs: list[tuple[int, int]] | None = None, lengths: list[int] | None = None,
              depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0), tasks: list[str] = T.TASKS,
              n_per_cell: int = 2, seed: int = 0, loss_context: int | None = None, loss_seqs: int = 8,
              data: str | None = None, filler: T.Filler | str | None = None, threads: int = 0,
              plots: bool = True, progress: bool = True, device: str = "auto", dtype: str = "auto",
              batch: int = 16) -> dict:
    """Evaluate ``checkpoint`` at every budget and dense; write ``budget_sweep.json`` (+ plots).

    ``device``: auto (CUDA when available) / cpu / cuda; ``dtype``: auto (bfloat16 autocast on
    CUDA, float32 on CPU) / float32 / bfloat16; ``batch``: sequences per forward."""
    t0 = time.time()
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and dev.type == "cuda")
    model, cfg, run_dir = load_model(checkpoint, device=dev)
    m = model.cfg
    out = Path(out) if out is not None else run_dir / "budget_sweep"
    out.mkdir(parents=True, exist_ok=True)
    if lengths is None:
        lengths = sorted({max(128, m.context // 2), m.context})
    loss_context = loss_context or m.context
    settings = budget_settings(m.block_size, budgets, pairs, max_context=max(max(lengths), loss_context))
    settings.append({"name": "dense", "mode": "full", "top_k": None, "block_size": None, "budget": None})

    examples, skipped = T.make_suite(tasks, lengths, depths, n_per_cell, seed, filler)
    prompts = [e.prompt_bytes for e in examples]
    n_new = max((len(e.target) for e in examples), default=0)
    val = _load_val(cfg, data)
    probe = None
    if val is not None and val.size > loss_context + 1:
        probe = gather(val, eval_offsets(val.size, loss_context, 1), loss_context)[0].to(dev)
    elif examples:
        probe = torch.tensor([list(prompts[-1])], dtype=torch.long, device=dev)

    setter = BudgetSetter(model)
    results = []
    for setting in settings:
        ts = time.time()
        setter.apply(setting)
        amp = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if use_bf16
               else contextlib.nullcontext())
        with amp:
            preds = greedy_decode(model, prompts, n_new, batch, dev) if examples else []
            sc = T.score(preds, examples) if examples else {"accuracy": float("nan"), "n": 0}
            row = {**setting, **sc}
            nll = answer_nll(model, prompts, [e.target.encode("ascii") for e in examples], batch, dev)
            row["answer_nll"] = float(np.mean(nll)) if nll else math.nan
            row["answer_nll_by_task"] = {t: float(np.mean([v for v, e in zip(nll, examples, strict=True)
                                                           if e.task == t])) for t in sorted({e.task for e in examples})}
            if val is not None and val.size > loss_context + 1:
                row.update(loss_summary(loss_by_position(model, val, loss_context, loss_seqs, batch, dev)))
            if probe is not None:
                row["attended_keys_per_query"] = measure_attended_keys(model, setter, setting, probe)
        row["examples"] = [{"task": e.task, "context_length": e.context_length, "depth": e.depth,
                            "answer": e.answer, "prediction": p, "answer_nll": v}
                           for e, p, v in zip(examples, preds, nll, strict=True)]
        row["elapsed_s"] = round(time.time() - ts, 3)
        results.append(row)
        if progress:
            loss = f" val_loss {row['val_loss']:.3f}" if "val_loss" in row else ""
            print(f"[eval_budget] {setting['name']:>8}: accuracy {100 * row['accuracy']:.1f}% "
                  f"answer_nll {row['answer_nll']:.3f}{loss} "
                  f"({row['elapsed_s']:.1f}s)", file=sys.stderr)
    setter.restore()

    record = {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "step": cfg.get("step"),
        "model": cfg["model"],
        "trained": {"block_size": m.block_size, "top_k": m.top_k, "budget": m.block_size * m.top_k,
                    "context": m.context, "attention": m.attention},
        "budget_layers": setter.layers,
        "settings": {"tasks": list(tasks), "lengths": list(lengths), "depths": list(depths),
                     "n_per_cell": n_per_cell, "seed": seed, "loss_context": loss_context, "loss_seqs": loss_seqs,
                     "filler": (T.as_filler(filler).name if any(t != "mqar" for t in tasks) else None),
                     "n_examples": len(examples), "skipped_cells": skipped, "decode_bytes": n_new,
                     "device": str(dev), "bf16": use_bf16},
        "results": results,
        "elapsed_s": round(time.time() - t0, 3),
    }
    atomic_write_text(out / "budget_sweep.json", json.dumps(record, indent=2))
    if plots:
        make_plots(record, out)
    return record


# ---------------------------------------------------------------------------------------
# short-answer tasks (issue 16): per-answer exact match with binomial CIs, several models


def binomial_ci(correct: int, n: int, level: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Two-sided confidence interval of a binomial proportion ``correct / n`` (scipy's
    ``binomtest(...).proportion_ci``: ``"wilson"`` score interval or ``"exact"`` Clopper-Pearson)."""
    from scipy.stats import binomtest

    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(correct, (int, np.integer)) or not 0 <= correct <= n:
        raise ValueError(f"correct must be an integer in [0, n={n}], got {correct!r}")
    if method not in ("wilson", "exact"):
        raise ValueError(f"method must be 'wilson' or 'exact', got {method!r}")
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=level, method=method)
    return float(ci.low), float(ci.high)


@torch.no_grad()
def short_answer_sweep(checkpoint: str | Path, task: str = "needle", n: int = 256, budgets: list[int] | None = None,
                       context_length: int | None = None, seed: int = 0, task_opts: dict | None = None,
                       model_name: str | None = None, block_size: int | None = None, batch: int = 64,
                       ci_method: str = "wilson", device: str = "cpu", progress: bool = True) -> dict:
    """Exact-match accuracy of ``checkpoint`` on ``n`` fresh ``task`` examples at every budget.

    Budgets (attended keys per query) are ``top_k x block_size`` with the model's block size
    (or ``block_size``); every layer that is MoBA in the run's config (every layer of a
    full-attention run) is switched to MoBA at that budget. A budget >= the prompt length is
    evaluated as dense (full) attention, and the prompt length itself is always the last point
    ("full"). Each example's answer is decoded greedily and counts when the decoded bytes
    equal it exactly. Returns ``{"task", "model", "checkpoint", "budgets", "accuracy", "ci95",
    "n", "correct", "settings", ...}`` (one ``budget.json`` entry; accuracy in [0, 1]).
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, cfg, run_dir = load_model(checkpoint, device=dev)
    model.eval()
    m = model.cfg
    length = context_length or m.context
    bs = block_size or m.block_size
    budgets = sorted(set(budgets or [bs * 2**i for i in range(32) if bs * 2**i < length]))
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be positive key counts, got {budgets}")
    bad = [b for b in budgets if b % bs]
    if bad:
        raise ValueError(f"budgets must be multiples of block_size {bs}, got {bad}")
    budgets = [b for b in budgets if b < length] + [length]
    examples = T.sample_examples(task, n, length, seed, **(task_opts or {}))
    prompts = [e.prompt_bytes for e in examples]
    n_new = max(len(e.answer) for e in examples)
    setter = BudgetSetter(model)
    settings, correct = [], []
    try:
        for b in budgets:
            ts = time.time()
            s = ({"name": "full", "mode": "full", "top_k": None, "block_size": None, "budget": b} if b >= length
                 else {"name": fmt_size(b), "mode": "moba", "top_k": b // bs, "block_size": bs, "budget": b})
            setter.apply(s)
            preds = greedy_decode(model, prompts, n_new, batch, dev)
            correct.append(sum(p[: len(e.answer)] == e.answer for p, e in zip(preds, examples, strict=True)))
            settings.append(s)
            if progress:
                print(f"[eval_budget] {model_name or run_dir.name} {s['name']:>5}: {correct[-1]}/{n} "
                      f"({time.time() - ts:.1f}s)", file=sys.stderr)
    finally:
        setter.restore()
    return {
        "task": task, "model": model_name or run_dir.name, "checkpoint": str(checkpoint),
        "trained_attention": m.attention, "trained_top_k": m.top_k, "trained_block_size": m.block_size,
        "eval_attention": "moba", "block_size": bs, "context_length": length, "task_options": dict(task_opts or {}),
        "seed": seed, "ci_method": ci_method, "budgets": budgets,
        "accuracy": [c / n for c in correct], "ci95": [list(binomial_ci(c, n, method=ci_method)) for c in correct],
        "n": [n] * len(budgets), "correct": correct, "settings": settings,
    }


def _check_entries(entries: list[dict]) -> None:
    if not entries:
        raise ValueError("empty sweep: no model entries to write or plot")
    for e in entries:
        k = len(e.get("budgets", []))
        if k == 0:
            raise ValueError(f"empty sweep for model {e.get('model')!r}: no budgets")
        for key in ("accuracy", "ci95", "n"):
            if len(e.get(key, [])) != k:
                raise ValueError(f"model {e.get('model')!r}: {key} has {len(e.get(key, []))} values for {k} budgets")


def write_budget_json(entries: list[dict], path: str | Path) -> Path:
    """``budget.json``: a JSON list, one object per model: ``{"task", "model", "budgets",
    "accuracy", "ci95": [[lo, hi], ...], "n", ...}`` (accuracy and CIs as fractions in [0, 1]).
    An empty list, or a model without budgets, is a ``ValueError``."""
    _check_entries(entries)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(entries, indent=1))
    return path


def _budget_tick(x: float, _pos=None) -> str:
    x = int(round(x))
    return f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x)


def plot_budget_chart(entries: list[dict], path: str | Path, title: str = "Inference Compute Scaling") -> Path:
    """Performance (%) vs compute budget (log-2 x axis, ticks 16, 32, ..., 1K), y clamped to
    0-100, 95% CI bands and error bars; MoBA-trained models solid, full-attention-trained dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    _check_entries(entries)
    styles = {"moba": ("-", "o", "tab:blue"), "full": ("--", "s", "tab:orange")}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ticks = sorted({b for e in entries for b in e["budgets"]})
    for j, e in enumerate(entries):
        ls, marker, color = styles.get(e.get("trained_attention"), (":", "^", f"C{j + 2}"))
        xs = np.asarray(e["budgets"], dtype=float)
        ys = 100 * np.asarray(e["accuracy"], dtype=float)
        lo = 100 * np.asarray([c[0] for c in e["ci95"]], dtype=float)
        hi = 100 * np.asarray([c[1] for c in e["ci95"]], dtype=float)
        label = e.get("label") or e["model"]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
        bars = ax.errorbar(xs, ys, yerr=[ys - lo, hi - ys], ls=ls, marker=marker, color=color, mfc="black",
                           mec="black", ms=5, capsize=3, label=f"{label} (95% CI, n={max(e['n'])})")
        for artist in bars.lines[0:1] + tuple(bars.lines[1]) + tuple(bars.lines[2]):
            artist.set_clip_on(False)  # markers at exactly 0% / 100% stay whole on the clamped axis
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(_budget_tick))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(0, 100)
    ax.set_xlabel("Compute Budget (attended keys per query; last point = full attention)")
    ax.set_ylabel("Performance (%)")
    task = ", ".join(sorted({e["task"] for e in entries}))
    ax.set_title(f"{title}\n({task}; every model evaluated with MoBA at each budget)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# plots


def accuracy_ylim(percents) -> tuple[float, float]:
    """y range of an accuracy chart (in %): from 0, never below it, up to the next multiple of 10
    above the data (at least 10, at most 100), so an all-zero chart reads as zero and not as a
    zoom into rounding noise, and a chart of small accuracies is not flattened against 100."""
    finite = [float(y) for y in percents if not math.isnan(y)]
    top = max(finite, default=0.0)
    return 0.0, float(min(100.0, max(10.0, 10.0 * math.ceil((top + 1e-9) / 10.0 + 0.05))))


def make_plots(record: dict, out: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = [r for r in record["results"] if r["mode"] == "moba"]
    dense = next((r for r in record["results"] if r["mode"] == "full"), None)
    written = []

    # performance vs budget (the "Inference Compute Scaling" chart)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [r["budget"] for r in rows]
    ax.plot(xs, [100 * r["accuracy"] for r in rows], "-o", color="tab:blue", mfc="black", mec="black",
            label="MoBA, all tasks")
    for j, task in enumerate(record["settings"]["tasks"]):
        ys = [100 * r["by_task"][task]["accuracy"] if task in r.get("by_task", {}) else math.nan for r in rows]
        ax.plot(xs, ys, "-", marker=".", alpha=0.5, color=f"C{j + 1}", label=task)
    if dense is not None:
        ax.axhline(100 * dense["accuracy"], ls="--", color="gray", label="dense (full attention)")
    ys_all = [100 * r["accuracy"] for r in rows] + ([100 * dense["accuracy"]] if dense is not None else [])
    ax.set_ylim(*accuracy_ylim(ys_all))
    for line in ax.lines:
        line.set_clip_on(False)  # markers at exactly 0% stay whole
    _finish_budget_plot(fig, ax, xs, "Performance (%)", "Inference Compute Scaling",
                        out / "performance_vs_budget.png", written)

    # soft score: teacher-forced loss of the answer bytes vs budget
    if rows and "answer_nll" in rows[0]:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        ax.plot(xs, [r["answer_nll"] for r in rows], "-o", color="tab:blue", mfc="black", mec="black",
                label="MoBA, all tasks")
        for j, task in enumerate(record["settings"]["tasks"]):
            ys = [r["answer_nll_by_task"].get(task, math.nan) for r in rows]
            ax.plot(xs, ys, "-", marker=".", alpha=0.5, color=f"C{j + 1}", label=task)
        if dense is not None:
            ax.axhline(dense["answer_nll"], ls="--", color="gray", label="dense (full attention)")
        _finish_budget_plot(fig, ax, xs, "answer loss (nats / byte, teacher-forced)",
                            "Answer loss vs inference budget", out / "answer_loss_vs_budget.png", written)

    # accuracy heatmap: context length x depth, one panel per setting
    panels = rows + ([dense] if dense is not None else [])
    lengths = sorted({c["context_length"] for r in panels for c in r.get("by_length_depth", [])})
    depths = sorted({c["depth"] for r in panels for c in r.get("by_length_depth", [])})
    if panels and lengths and depths:
        fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1.5, 1.2 + 0.45 * len(lengths)),
                                 squeeze=False, layout="constrained")
        for ax, r in zip(axes[0], panels, strict=True):
            grid = np.full((len(lengths), len(depths)), np.nan)
            for c in r["by_length_depth"]:
                grid[lengths.index(c["context_length"]), depths.index(c["depth"])] = 100 * c["accuracy"]
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(depths)))
            ax.set_xticklabels([f"{d:g}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)))
            ax.set_yticklabels([fmt_size(n) for n in lengths] if ax is axes[0][0] else [], fontsize=7)
            for (yi, xi), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(xi, yi, f"{v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 60 else "black")
            ax.set_title(r["name"], fontsize=9)
            ax.set_xlabel("depth", fontsize=8)
        axes[0][0].set_ylabel("context length")
        fig.colorbar(im, ax=axes[0].tolist(), label="accuracy (%)")
        written.append(out / "accuracy_heatmap.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # loss by position
    if any("loss_by_position" in r for r in panels):
        fig, ax = plt.subplots(figsize=(6, 4))
        for j, r in enumerate(panels):
            if "loss_by_position" not in r:
                continue
            lp = r["loss_by_position"]
            dashed = r["mode"] == "full"
            ax.plot(lp["position"], lp["loss"], "--" if dashed else "-", color="gray" if dashed else f"C{j}",
                    label=f"{r['name']} (loss {r['val_loss']:.3f}, trailing {r['trailing_loss']:.3f})")
        ax.set_xlabel("position in window")
        ax.set_ylabel("held-out loss (nats / byte)")
        ax.set_title("Loss by position at each budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "loss_by_position.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------
# CLI


def _finish_budget_plot(fig, ax, xs, ylabel: str, title: str, path, written: list) -> None:
    """Log2 budget x-axis (512, 1k, ...), labels, legend; save to ``path`` and record it."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([fmt_size(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("Compute Budget (attended keys per query = top_k x block_size)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)


def _size_list(text: str) -> list[int]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def _float_list(text: str) -> list[float]:
    return cli.list_of(cli.float_in(0, 1), "depths")(text)


def _device(text: str) -> str:
    return text if text == "auto" else cli.device(text)


def _size_list_or_auto(text: str) -> list[int] | None:
    return None if text in ("auto", "") else _size_list(text)


def build_parser() -> Parser:
    p = Parser("python -m scaling_runs.eval_budget", __doc__)
    p.add_argument("checkpoint", help="run directory (ckpt.pt inside) or a checkpoint file")
    p.add_argument("--budgets", default="auto", type=checked(_size_list_or_auto, "size list"), metavar="LIST|auto",
                   help="attended-key budgets, e.g. 512,1k,2k,4k,8k; auto = block_size x 1, 2, 4, ... up to "
                        "the longest context")
    p.add_argument("--pairs", default=None, type=checked(parse_pairs, "BLOCK/TOP_K list"), metavar="LIST",
                   help="explicit BLOCK/TOP_K settings, e.g. 64/3,64/6 (overrides --budgets)")
    p.add_argument("--lengths", default=None, type=checked(_size_list, "size list"), metavar="LIST",
                   help="task context lengths in bytes; none = context/2 and context")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", type=checked(_float_list, "number list"),
                   metavar="LIST", help="needle depths (0 = start of the prompt, 1 = end)")
    p.add_argument("--tasks", default=",".join(T.TASKS), metavar="LIST", type=checked(cli.names(T.TASKS, "task"), "task list"),
                   help="tasks, comma-separated")
    p.add_argument("--n_per_cell", type=cli.positive_int, default=2, metavar="N", help="examples per (task, length, depth)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the task examples")
    p.add_argument("--loss_context", default=None, type=checked(parse_size, "size"), metavar="SIZE",
                   help="held-out loss window; none = the training context")
    p.add_argument("--loss_seqs", type=cli.positive_int, default=8, metavar="N", help="held-out windows for the loss metrics")
    p.add_argument("--data", default=None, help="validation data; none = the run's data config")
    p.add_argument("--filler", type=cli.existing_file, default=None, metavar="FILE", help="text file for task filler; none = embedded corpus")
    p.add_argument("--threads", type=cli.nonnegative_int, default=0, metavar="N", help="torch.set_num_threads when > 0")
    p.add_argument("--device", default="auto", type=_device, help="auto / cpu / cuda / cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto = bfloat16 autocast on CUDA, float32 on CPU")
    p.add_argument("--batch", type=cli.positive_int, default=16, metavar="N", help="sequences per forward")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder; none = RUN/budget_sweep")
    p.add_argument("--no_plots", action="store_true", help="write budget_sweep.json only")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    if not Path(a.checkpoint).exists():
        raise cli.fail(f"checkpoint {a.checkpoint}: no such file or folder (a run folder with ckpt.pt, or a checkpoint file)")
    budgets = _size_list_or_auto(a.budgets)
    pairs = parse_pairs(a.pairs) if a.pairs else None
    lengths = _size_list(a.lengths) if a.lengths else None
    filler = T.Filler(Path(a.filler).read_text(errors="replace"), name=a.filler) if a.filler else None
    record = run_sweep(
        a.checkpoint, a.out, budgets, pairs, lengths, _float_list(a.depths),
        [t.strip() for t in a.tasks.split(",") if t.strip()], a.n_per_cell, a.seed,
        parse_size(a.loss_context) if a.loss_context else None, a.loss_seqs, a.data, filler, a.threads,
        plots=not a.no_plots, device=a.device, dtype=a.dtype, batch=a.batch,
    )
    summary = {r["name"]: {"accuracy": r["accuracy"], "answer_nll": r.get("answer_nll"), "val_loss": r.get("val_loss"),
                           "attended_keys": r.get("attended_keys_per_query", {}).get("mean")}
               for r in record["results"]}
    print(json.dumps({"out": record["out"], "elapsed_s": record["elapsed_s"], "results": summary}, indent=1))
    return record


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "scaling_runs.eval_budget"))
