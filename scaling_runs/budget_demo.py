"""The inference-budget demo (issue 7), CPU preset: task data -> a tiny MoBA model -> budget sweep.

    python -m scaling_runs.budget_demo [--out runs/budget-cpu] [--reuse RUN_DIR|auto] [--key value ...]

1. writes a corpus of solved task examples (``scaling_runs.tasks.write_corpus``: passkey,
   multikey, mqar at 128 and 256 bytes) to ``OUT/tasks`` (skipped when ``OUT/tasks.json`` exists);
2. trains a tiny MoBA model (2 layers, width 64, context 256, block 32, top-3, 2.5M tokens,
   half of them task data through ``--mix`` / ``--mix_fraction``) with the trainer
   (``scaling_runs.train``) into ``OUT/moba-mix``; a run with ``DONE`` is not trained again, a
   killed one resumes. ``--reuse RUN_DIR`` skips training and evaluates that run instead
   (``--reuse auto``: ``runs/cpu-tiny/s3-moba`` when it is DONE; note that run saw no task data,
   so its exact-match accuracy is ~0 at every budget and only the loss curves move);
3. runs ``scaling_runs.eval_budget`` at budgets 32, 64, 128, 256 (= top_k 1, 2, 4, 8 x block
   32; 256 = the whole window) and dense, task lengths 128 and 256, depths 0 / 0.5 / 1, and
   prints where ``budget_sweep.json`` and the plots are.

About 1.5-2.5 minutes on 2 CPU cores (the training; a rerun skips it). Demo options: ``--out``, ``--reuse``, ``--n_tasks`` (task
examples written, 4000), ``--task_lengths`` (128,256), ``--mix_fraction`` (0.5), ``--budgets``
(32,64,128,256), ``--lengths`` (128,256), ``--depths`` (0,0.5,1), ``--n_per_cell`` (2),
``--loss_seqs`` (8), ``--filler FILE`` (task filler text; default: the embedded corpus).
Every other ``--key value`` goes to the training config (``--max_tokens 2e6``, ``--n_layer 3``).
The GPU version (32K context, budgets 512..8k) is ``scaling_runs/GPU_RECIPE_budget.md``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import eval_budget as E
from . import tasks as T
from .config import RunConfig
from .train import atomic_write_text, config_from_argv, train

DEFAULT_REUSE = Path("runs/cpu-tiny/s3-moba")

# The tiny MoBA model (the trainer's flags). 2.5M tokens: ~2 min on 2 CPU cores, one
# torch thread (the MoBA PyTorch path runs many small ops; see presets._cpu_tiny).
TRAIN_DEFAULTS = {
    "attention": "moba", "n_layer": "2", "n_head": "2", "n_kv_head": "1", "n_embd": "64",
    "context": "256", "block_size": "32", "top_k": "3",
    "batch_size": "16", "max_tokens": "2500000", "lr": "3e-3", "warmup_steps": "10",
    "eval_every": "100", "eval_seqs": "16", "threads": "1", "seed": "1337",
}

DEMO_DEFAULTS = {
    "n_tasks": "4000", "task_lengths": "128,256", "mix_fraction": "0.5", "budgets": "32,64,128,256",
    "lengths": "128,256", "depths": "0,0.5,1", "n_per_cell": "2", "loss_seqs": "8", "task_seed": "1000",
}


def _sizes(text: str) -> list[int]:
    return [E.parse_size(s) for s in str(text).split(",") if s.strip()]


def train_config(out: Path, tasks_dir: Path, mix_fraction: float, overrides: dict[str, str] | None = None) -> RunConfig:
    """The training run's config, through the trainer's own ``--key value`` parser."""
    flags = {**TRAIN_DEFAULTS, "mix": str(tasks_dir), "mix_fraction": str(mix_fraction),
             "out_dir": str(out / "moba-mix"), **(overrides or {})}
    argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    return config_from_argv(argv)


def run_demo(out: str | Path = "runs/budget-cpu", reuse: str | Path | None = None,
             train_overrides: dict[str, str] | None = None, filler: T.Filler | str | None = None,
             progress: bool = True, **opts) -> dict:
    """Tasks -> training (or reuse) -> budget sweep; returns a summary dict (also ``OUT/demo.json``).

    ``opts``: the demo options of the module docstring (strings or values)."""
    t0 = time.time()
    o = {**DEMO_DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    # 1. task data
    tasks_dir, tasks_info = out / "tasks", out / "tasks.json"
    ts = time.time()
    if tasks_info.exists():
        info = json.loads(tasks_info.read_text())
        print(f"[budget_demo] task data: {tasks_dir} (exists, {info['examples']} examples)")
    else:
        info = T.write_corpus(tasks_dir, int(o["n_tasks"]), lengths=_sizes(o["task_lengths"]),
                              seed=int(o["task_seed"]), filler=filler)
        atomic_write_text(tasks_info, json.dumps(info, indent=2))
        print(f"[budget_demo] task data: {tasks_dir} ({info['examples']} examples, {info['by_task']})")
    timings["tasks_s"] = round(time.time() - ts, 2)

    # 2. the model
    ts = time.time()
    if reuse == "auto":
        reuse = DEFAULT_REUSE if (DEFAULT_REUSE / "DONE").exists() else None
        if reuse is None:
            print(f"[budget_demo] --reuse auto: {DEFAULT_REUSE} is not DONE; training instead")
    if reuse is not None:
        run_dir, last = Path(reuse), None
        print(f"[budget_demo] reusing {run_dir} (no training; task data not mixed into that run)")
    else:
        cfg = train_config(out, tasks_dir, float(o["mix_fraction"]), train_overrides)
        if not progress:
            cfg.train.progress = False
        run_dir = Path(cfg.train.out_dir)
        print(f"[budget_demo] training {run_dir} (mix {cfg.data.mix} x {cfg.data.mix_fraction}, "
              f"{cfg.train.max_tokens or cfg.train.max_steps * cfg.train.batch_size * cfg.model.context} tokens)")
        last = train(cfg)
    timings["train_s"] = round(time.time() - ts, 2)

    # 3. the budget sweep
    ts = time.time()
    sweep_dir = out / "budget_sweep"
    record = E.run_sweep(run_dir, sweep_dir, budgets=_sizes(o["budgets"]), lengths=_sizes(o["lengths"]),
                         depths=[float(d) for d in str(o["depths"]).split(",")], n_per_cell=int(o["n_per_cell"]),
                         loss_seqs=int(o["loss_seqs"]), filler=filler, threads=1, progress=progress, device="cpu")
    timings["eval_s"] = round(time.time() - ts, 2)
    timings["total_s"] = round(time.time() - t0, 2)

    plots = sorted(str(p) for p in sweep_dir.glob("*.png"))
    summary = {
        "out": str(out), "run_dir": str(run_dir), "reused": reuse is not None, "tasks": info,
        "train_final": last, "json": str(sweep_dir / "budget_sweep.json"), "plots": plots,
        "results": {r["name"]: {"budget": r["budget"], "accuracy": r["accuracy"], "answer_nll": r.get("answer_nll"),
                                "val_loss": r.get("val_loss"),
                                "attended_keys": r.get("attended_keys_per_query", {}).get("mean")}
                    for r in record["results"]},
        "timings": timings,
    }
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2))
    print("\n[budget_demo] budget   accuracy  answer_nll  val_loss  attended keys/query")
    for name, r in summary["results"].items():
        vl = f"{r['val_loss']:.3f}" if r.get("val_loss") is not None else "  -  "
        ak = f"{r['attended_keys']:.1f}" if r.get("attended_keys") is not None else "-"
        print(f"[budget_demo] {name:>6}   {100 * r['accuracy']:6.1f}%   {r['answer_nll']:9.3f}  {vl:>8}  {ak:>8}")
    print(f"\nsweep json: {summary['json']}")
    for p in plots:
        print(f"plot: {p}")
    print(f"summary: {out / 'demo.json'}")
    print(f"budget demo wall time: {timings['total_s']:.1f} s "
          f"(tasks {timings['tasks_s']:.1f}, train {timings['train_s']:.1f}, eval {timings['eval_s']:.1f})")
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    from .config import parse_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    opts = parse_overrides(argv)
    out = opts.pop("out", "runs/budget-cpu")
    reuse = opts.pop("reuse", None)
    filler_path = opts.pop("filler", None)
    filler = T.Filler(Path(filler_path).read_text(errors="replace"), name=filler_path) if filler_path else None
    demo = {k: opts.pop(k) for k in list(opts) if k in DEMO_DEFAULTS}
    return run_demo(out, reuse, opts, filler, **demo)


if __name__ == "__main__":
    main()
