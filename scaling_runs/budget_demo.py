"""The inference-budget demo (issue 7), CPU preset: task data -> a tiny MoBA model -> budget sweep.

    python -m scaling_runs.budget_demo [--out runs/budget-cpu] [--reuse RUN_DIR|auto] [--OPTION VALUE ...]
    python -m scaling_runs.budget_demo --preset needle [--out runs/budget-needle] [--OPTION VALUE ...]

``--preset needle`` (issue 16; ``run_needle_demo``): the one-hop needle task (254 non-digit
filler bytes, one digit, "?"; answer the digit) -> a MoBA-trained and a full-attention-trained
tiny model (2 layers, width 64, context 256, block 16, top-3 for MoBA; 400 steps of 32
windows; 90% of the steps use example-aligned needle windows with answer-only loss) -> both evaluated
with MoBA at budgets 16, 32, 48, 64, 128 and full (256) on 256 fresh examples, exact match
with Wilson 95% CIs -> ``OUT/budget.json`` + ``OUT/performance_vs_budget.png``. Options:
``--task`` (needle / multineedle), ``--n_filler``, ``--n_needles``, ``--n_train`` (20000),
``--train_seed``, ``--n_eval`` (256), ``--eval_seed``, ``--budgets``, ``--arms`` (moba,full),
``--ci`` (wilson / exact), ``--eval_device`` (cpu / cuda / auto), ``--eval_batch`` (64); every other option (a config field, ``scaling_runs.config``) goes to both training configs.

The default preset (``tasks``):

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
Every other option (a config field) goes to the training config (``--max_tokens 2e6``, ``--n_layer 3``).
The GPU version (32K context, budgets 512..8k) is ``scaling_runs/GPU_RECIPE_budget.md``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from moba._core import cli

from . import eval_budget as E
from . import tasks as T
from .checkpoint import atomic_write_text
from .cli import Parser, add_config_options, checked, config_overrides
from .config import RunConfig, apply_overrides
from .train import train

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
    """The training run's config: ``TRAIN_DEFAULTS``, the task mix, then ``overrides`` (config
    fields by name, typed or command-line strings)."""
    flags = {**TRAIN_DEFAULTS, "mix": str(tasks_dir), "mix_fraction": str(mix_fraction),
             "out_dir": str(out / "moba-mix"), **(overrides or {})}
    return apply_overrides(RunConfig(), flags)


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


# ---------------------------------------------------------------------------------------
# --preset needle (issue 16): short-answer task -> full- and MoBA-trained tiny models ->
# accuracy vs budget with binomial CIs -> budget.json + the chart

NEEDLE_TRAIN_DEFAULTS = {
    "n_layer": "2", "n_head": "2", "n_kv_head": "1", "n_embd": "64", "block_size": "16", "top_k": "3",
    "batch_size": "32", "max_tokens": "0", "max_steps": "400", "lr": "3e-3", "warmup_steps": "20",
    "eval_every": "100", "eval_seqs": "8", "threads": "1", "seed": "1337", "mix_fraction": "0.9",
}

NEEDLE_DEMO_DEFAULTS = {
    "task": "needle", "n_filler": "254", "n_needles": "4", "n_train": "20000", "train_seed": "1000",
    "n_eval": "256", "eval_seed": "0", "budgets": "16,32,48,64,128", "arms": "moba,full", "ci": "wilson",
    "eval_device": "cpu", "eval_batch": "64",
}

ARM_LABELS = {"moba": "MoBA-trained", "full": "Full-attention-trained"}


def run_needle_demo(out: str | Path = "runs/budget-needle", train_overrides: dict[str, str] | None = None,
                    progress: bool = True, **opts) -> dict:
    """Short-answer budget chart on CPU: ``OUT/tasks/train.npz`` (``--n_train`` solved
    examples, seed ``--train_seed``) -> one tiny model per arm (``OUT/<arm>``: attention
    ``moba`` or ``full``, trained on the examples with answer-only loss for ``mix_fraction``
    of the steps) -> ``eval_budget.short_answer_sweep`` of every arm on ``--n_eval`` fresh
    examples (seed ``--eval_seed``), evaluated with MoBA at each budget and full attention at
    the prompt length -> ``OUT/budget.json``, ``OUT/performance_vs_budget.png``, ``OUT/demo.json``.

    ``demo.json`` also holds each arm's train-vs-eval accuracy gap at full attention (the first
    ``n_eval`` training examples vs the fresh ones). Finished runs (``DONE``) are not retrained.
    """
    t0 = time.time()
    o = {**NEEDLE_DEMO_DEFAULTS, **{k: str(v) for k, v in opts.items() if v is not None}}
    unknown = sorted(set(o) - set(NEEDLE_DEMO_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown needle-demo options {unknown}; expected {sorted(NEEDLE_DEMO_DEFAULTS)}")
    arms = [a.strip() for a in o["arms"].split(",") if a.strip()]
    if not arms or any(a not in ARM_LABELS for a in arms):
        raise ValueError(f"arms must be a comma-separated subset of {sorted(ARM_LABELS)}, got {o['arms']!r}")
    task = o["task"]
    task_opts = {"n_needles": int(o["n_needles"])} if task == "multineedle" else {}
    length = T.n_filler_to_length(task, int(o["n_filler"]), int(o["n_needles"]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    ts = time.time()
    train_npz = out / "tasks" / "train.npz"
    if train_npz.exists():
        tasks_info = T.ExampleSet.load(train_npz).info
        print(f"[budget_demo] task data: {train_npz} (exists, {tasks_info['examples']} examples)")
    else:
        tasks_info = T.write_examples(train_npz, task, int(o["n_train"]), length, int(o["train_seed"]), **task_opts)
        print(f"[budget_demo] task data: {train_npz} ({tasks_info['examples']} {task} examples, "
              f"{tasks_info['distinct_prompts']} distinct prompts of {length} bytes)")
    timings["tasks_s"] = round(time.time() - ts, 2)

    entries, runs = [], {}
    for arm in arms:
        ts = time.time()
        flags = {**NEEDLE_TRAIN_DEFAULTS, "context": str(length), **(train_overrides or {}), "attention": arm,
                 "mix": str(train_npz), "out_dir": str(out / arm)}
        cfg = apply_overrides(RunConfig(), flags)
        if not progress:
            cfg.train.progress = False
        print(f"[budget_demo] training {cfg.train.out_dir} ({arm} attention, {cfg.train.max_steps} steps, "
              f"{cfg.data.mix_fraction:.0%} of them on {task} examples)")
        last = train(cfg)
        timings[f"train_{arm}_s"] = round(time.time() - ts, 2)
        ts = time.time()
        entry = E.short_answer_sweep(cfg.train.out_dir, task, int(o["n_eval"]), _sizes(o["budgets"]), length,
                                     int(o["eval_seed"]), task_opts, model_name=ARM_LABELS[arm],
                                     batch=int(o["eval_batch"]), ci_method=o["ci"], device=o["eval_device"],
                                     progress=progress)
        entry["label"] = ARM_LABELS[arm]
        # memorisation check: the same dense evaluation on examples the model trained on
        seen = E.short_answer_sweep(cfg.train.out_dir, task, min(int(o["n_eval"]), int(o["n_train"])), [length],
                                    length, int(o["train_seed"]), task_opts, batch=int(o["eval_batch"]),
                                    device=o["eval_device"], progress=False)
        entry["train_vs_eval_full"] = {"train_accuracy": seen["accuracy"][-1], "train_n": seen["n"][-1],
                                       "eval_accuracy": entry["accuracy"][-1], "eval_n": entry["n"][-1],
                                       "gap": seen["accuracy"][-1] - entry["accuracy"][-1]}
        timings[f"eval_{arm}_s"] = round(time.time() - ts, 2)
        entries.append(entry)
        runs[arm] = {"run_dir": cfg.train.out_dir, "train_final": last}

    budget_json = E.write_budget_json(entries, out / "budget.json")
    plot = E.plot_budget_chart(entries, out / "performance_vs_budget.png")
    timings["total_s"] = round(time.time() - t0, 2)
    summary = {"out": str(out), "task": tasks_info, "options": o, "runs": runs, "budget_json": str(budget_json),
               "plot": str(plot), "timings": timings}
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2))
    print(f"\n[budget_demo] {task}: exact-match accuracy (%) [95% CI], n = {o['n_eval']} per budget")
    for e in entries:
        cells = "  ".join(f"{fmt}:{100 * a:.0f} [{100 * lo:.0f}-{100 * hi:.0f}]" for fmt, a, (lo, hi) in
                          zip([E._budget_tick(b) for b in e["budgets"][:-1]] + ["full"], e["accuracy"], e["ci95"],
                              strict=True))
        gap = e["train_vs_eval_full"]
        print(f"[budget_demo] {e['model']:>22}: {cells}  (train {100 * gap['train_accuracy']:.0f}% "
              f"vs eval {100 * gap['eval_accuracy']:.0f}% at full)")
    print(f"budget.json: {budget_json}\nplot: {plot}\nsummary: {out / 'demo.json'}")
    print(f"needle demo wall time: {timings['total_s']:.1f} s")
    return summary


# ---------------------------------------------------------------------------------------
# command line

def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    if not arms or any(a not in ARM_LABELS for a in arms):
        raise ValueError(text)
    return arms


SIZES = checked(_sizes, "size list (e.g. 32,64,1k)")
# the demo options: name -> (argparse type, help); defaults in DEMO_DEFAULTS / NEEDLE_DEMO_DEFAULTS
DEMO_OPTIONS = {  # --preset tasks
    "n_tasks": (cli.positive_int, "task examples written"),
    "task_lengths": (SIZES, "lengths of the written task examples in bytes"),
    "lengths": (SIZES, "evaluated task context lengths in bytes"),
    "depths": (checked(_floats, "number list"), "needle depths evaluated (0 = start, 1 = end)"),
    "n_per_cell": (cli.positive_int, "examples per (task, length, depth) cell"),
    "loss_seqs": (cli.positive_int, "held-out windows for the loss metrics"),
    "task_seed": (int, "seed of the written task examples"),
}
NEEDLE_OPTIONS = {  # --preset needle
    "task": (str, "short-answer task: needle or multineedle"),
    "n_filler": (cli.positive_int, "filler bytes per prompt (the prompt length follows)"),
    "n_needles": (cli.positive_int, "multineedle: key/digit pairs per prompt"),
    "n_train": (cli.positive_int, "distinct training examples"),
    "train_seed": (int, "seed of the training examples"),
    "n_eval": (cli.positive_int, "fresh evaluation examples per budget"),
    "eval_seed": (int, "seed of the evaluation examples"),
    "arms": (checked(_arms, f"arm list (from {','.join(ARM_LABELS)})"), "training attention of each model"),
    "ci": (str, "binomial confidence interval: wilson or exact"),
    "eval_device": (str, "evaluation device: cpu, cuda or auto"),
    "eval_batch": (cli.positive_int, "evaluation sequences per forward"),
}
CHOICES = {"task": ("needle", "multineedle"), "ci": ("wilson", "exact"), "eval_device": ("cpu", "cuda", "auto")}


def build_parser() -> Parser:
    p = Parser("python -m scaling_runs.budget_demo", __doc__,
               usage="%(prog)s [--preset {tasks,needle}] [--out DIR] [--OPTION VALUE ...]")
    p.add_argument("--preset", default="tasks", choices=("tasks", "needle"),
                   help="tasks: long-context task mix -> one MoBA model -> eval_budget sweep; "
                        "needle: short-answer chart of a MoBA- and a full-attention-trained model")
    p.add_argument("--out", metavar="DIR", default=argparse.SUPPRESS,
                   help="output folder (default: runs/budget-cpu; needle: runs/budget-needle)")
    p.add_argument("--budgets", type=SIZES, default=argparse.SUPPRESS,
                   help=f"attended-key budgets (default: {DEMO_DEFAULTS['budgets']}; "
                        f"needle: {NEEDLE_DEMO_DEFAULTS['budgets']})")
    tasks = p.add_argument_group("--preset tasks options")
    tasks.add_argument("--reuse", metavar="RUN_DIR|auto", default=argparse.SUPPRESS,
                       help=f"evaluate this run instead of training (auto: {DEFAULT_REUSE} when DONE) "
                            "(default: train)")
    tasks.add_argument("--filler", metavar="FILE", default=argparse.SUPPRESS, type=cli.existing_file,
                       help="text file for the task filler (default: the embedded corpus)")
    for name, (typ, text) in DEMO_OPTIONS.items():
        tasks.add_argument(f"--{name}", type=typ, default=argparse.SUPPRESS, metavar="N" if typ in (int, cli.positive_int) else "LIST",
                           help=f"{text} (default: {DEMO_DEFAULTS[name]})")
    needle = p.add_argument_group("--preset needle options")
    for name, (typ, text) in NEEDLE_OPTIONS.items():
        needle.add_argument(f"--{name}", type=typ, default=argparse.SUPPRESS, choices=CHOICES.get(name),
                            metavar=None if name in CHOICES else "N" if typ in (int, cli.positive_int) else "LIST",
                            help=f"{text} (default: {NEEDLE_DEMO_DEFAULTS[name]})")
    add_config_options(p, default_note="the demo's training value (TRAIN_DEFAULTS / NEEDLE_TRAIN_DEFAULTS; "
                                       "mix_fraction: tasks 0.5, needle 0.9), else RunConfig's")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    a = vars(parser.parse_args(argv))
    train_opts = {k.split(".", 1)[1]: v for k, v in config_overrides(argparse.Namespace(**a)).items()}
    own = (set(DEMO_OPTIONS) | {"reuse", "filler"}) if a["preset"] == "tasks" else set(NEEDLE_OPTIONS)
    other = sorted(k for k in (set(DEMO_OPTIONS) | set(NEEDLE_OPTIONS) | {"reuse", "filler"}) - own if k in a)
    if other:
        parser.error(f"{', '.join('--' + k for k in other)}: not an option of --preset {a['preset']}")
    demo = {k: a[k] for k in own | {"budgets"} if k in a}
    if a["preset"] == "needle":
        defaults = {**NEEDLE_TRAIN_DEFAULTS, "context": "256"}
    else:
        defaults = TRAIN_DEFAULTS
        if "mix_fraction" in train_opts:  # the tasks preset's own demo option
            demo["mix_fraction"] = train_opts.pop("mix_fraction")
    try:  # a training option the config rejects is a usage error, before anything runs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real config warns again, if it must
            apply_overrides(RunConfig(), {**defaults, **train_opts})
    except ValueError as exc:
        parser.error(str(exc))
    if a["preset"] == "needle":
        return run_needle_demo(a.get("out", "runs/budget-needle"), train_opts, **demo)
    reuse, filler_path = demo.pop("reuse", None), demo.pop("filler", None)
    filler = T.Filler(Path(filler_path).read_text(errors="replace"), name=filler_path) if filler_path else None
    return run_demo(a.get("out", "runs/budget-cpu"), reuse, train_opts, filler, **demo)


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "scaling_runs.budget_demo"))
