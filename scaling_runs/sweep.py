"""Run a sweep: ``python -m scaling_runs.sweep --preset cpu-tiny --out runs/cpu-tiny [--OPTION VALUE ...]``.

The grid is the preset's sizes x attention kinds x budgets (``scaling_runs.presets``); the
config options (``--lr 1e-3``, ``--data PATH``: every field of ``scaling_runs.config``, listed
below) override every run's config.

* On GPUs every run goes through torchrun (``python -m torch.distributed.run --standalone``)
  with ``gpus_per_run`` GPUs; runs go side by side when a run needs fewer GPUs than the
  machine has (``CUDA_VISIBLE_DEVICES`` per run, logs in ``RUN/train.log``).
* On CPU runs go one after the other in this process (``--launcher torchrun`` to use
  torchrun anyway, ``--nproc_per_run`` processes each).
* Resumable: a run with ``DONE`` is skipped, a run with a checkpoint resumes, so running the
  same command again finishes what is missing and then only prints the summary.
* ``--kinds moba,full,hybrid``: the attention kinds (hybrid: ``--n_full_layers N`` last layers
  full); the preset's otherwise.
* Progress: ``[sweep] run i/N NAME (sweep ETA ...)`` as each run starts and a line as it
  ends; the ETA is the attention-aware FLOPs left over the FLOP rate of the runs finished
  in this invocation (none before the first one finishes). A run's own progress is its
  trainer's (a bar on a terminal, one line per evaluation in ``RUN/train.log``).
* ``--dry_run true``: list the runs with parameters, tokens, FLOPs and a time estimate
  (attn-aware FLOPs / (peak FLOP/s x ``--mfu``), 989e12 bf16 for one H100) and stop.
* ``paper``: multi-node; writes Slurm scripts (``OUT/launch/*.sbatch``, ``launch_all.sh``)
  with ``srun torchrun --nnodes ...`` and prints them instead of running.
* GPU-sized presets (``gpu-small``; ``paper`` with ``--run true``) stop with an error on a
  machine without a CUDA GPU instead of training for hours: ``--dry_run true`` prints their
  plan, ``--allow_cpu true`` trains them on the CPU anyway.
* ``--allow_config_change true``: resume runs whose checkpoint was trained with other options
  (without it such a run fails, naming the differing fields; see ``scaling_runs.train``).

Exit status: 0 when every run of the plan is DONE (this includes "all runs were already DONE,
nothing to do", which is reported as such); 1 when any run failed (its status in the table
says why, a torchrun run's log is ``RUN/train.log``); 2 when the plan is empty (nothing to
run, e.g. ``--kinds`` names none) and for a usage error (one line on stderr); 128 + N when
stopped by signal N.

Stopping a sweep (Ctrl-C, SIGTERM) forwards the signal to every torchrun it started (each in
its own process group) and waits for them; torchrun stops its trainers. If the sweep itself
is killed (SIGKILL), the kernel's parent-death signal stops its torchruns, and theirs stops
the trainers, so no orphan keeps writing to a run folder. Run the same command again to
resume.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from moba._core import cli
from moba._core.hardware import find_device

from .checkpoint import candidates
from .cli import Parser, add_config_options, config_overrides
from .config import ATTENTION_KINDS, apply_overrides, value_parser
from .flops import PFLOPS_DAY, flops_per_token
from .model import analytic_param_counts
from .presets import PRESETS, SweepPreset, get_preset

H100_PEAK = find_device("H100").bf16_flops
EXIT_FAILED = 1
EXIT_NOTHING_TO_RUN = 2


class SweepInterrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def plan(preset: SweepPreset, sweep_dir: Path, overrides: dict[str, object] | None = None) -> list[dict]:
    """Every run of ``preset`` with ``overrides`` (config fields by name, typed or strings)."""
    runs = []
    for name, cfg in preset.runs():
        cfg = apply_overrides(cfg, dict(overrides or {}))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(sweep_dir / name)))
        n = analytic_param_counts(cfg.model)
        fpt = flops_per_token(cfg.model, n["non_embedding"])
        tokens = cfg.train.max_tokens
        runs.append({"name": name, "config": cfg, "params": n, "tokens": tokens,
                     "flops": fpt["dense"] * tokens, "attn_aware_flops": fpt["attn_aware"] * tokens})
    return runs


def run_status(out_dir: Path) -> str:
    if (out_dir / "DONE").exists():
        return "done"
    if candidates(out_dir):  # a checkpoint to resume from
        return "partial"
    return "new"


def _write_launch(run: dict) -> Path:
    out = Path(run["config"].train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "launch.json"
    path.write_text(json.dumps(run["config"].to_dict(), indent=2))
    return path


def _torchrun_cmd(launch: Path, nproc: int, allow_config_change: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scaling_runs.train", "--config", str(launch)]
    return cmd + (["--allow_config_change", "true"] if allow_config_change else [])


def _child_preexec():
    """For ``Popen(preexec_fn=...)``: the child gets SIGTERM when this process dies (Linux)."""
    parent = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    except (OSError, AttributeError):
        return None

    def setup():
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before the prctl
            os._exit(1)

    return setup


def _stop_children(active: list, signum: int, grace_s: float = 60.0) -> None:
    """Forward ``signum`` to each child's process group, wait ``grace_s``, then SIGKILL the groups."""
    for proc, *_ in active:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
    deadline = time.time() + grace_s
    for proc, *_ in active:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tokens_done(out_dir: Path) -> int:
    """Tokens a partial run has already trained (its last metrics row; 0 when none)."""
    rows = (out_dir / "metrics.jsonl").read_text().splitlines() if (out_dir / "metrics.jsonl").exists() else []
    for line in reversed(rows):
        with contextlib.suppress(json.JSONDecodeError):
            return int(json.loads(line).get("tokens", 0))
    return 0


class SweepProgress:
    """``run i/N`` and an ETA for the runs a sweep still has to train.

    Each finished run gives (attention-aware FLOPs it trained, seconds it took). The time of
    a run left is predicted as ``overhead + FLOPs / rate``, fitted by least squares once two
    finished runs differ in FLOPs (start-up costs weigh on small runs), else FLOP-proportional
    to the finished ones; the ETA is the sum over the runs left (less the time the running ones
    have had), divided by the runs that go side by side (``slots``). No ETA before the first
    run finishes. Resumed runs count only the FLOPs they have left.
    """

    def __init__(self, todo: list[dict], slots: int = 1):
        self.n = len(todo)
        self.slots = max(1, slots)
        self.t0 = time.time()
        self.started = 0
        self.began: dict[str, float] = {}
        self.finished: list[tuple[float, float]] = []  # (FLOPs, seconds) of runs that ended DONE
        self.left: dict[str, float] = {}
        for run in todo:
            frac = _tokens_done(Path(run["config"].train.out_dir)) / max(1, run["tokens"])
            self.left[run["name"]] = run["attn_aware_flops"] * max(0.0, 1.0 - frac)

    def _predict(self, flops: float) -> float:
        xs = [f for f, _ in self.finished]
        ys = [t for _, t in self.finished]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var > 0:
            slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var)
            overhead = max(0.0, my - slope * mx)
            return overhead + slope * flops
        return flops * sum(ys) / max(sum(xs), 1e-30)

    def eta_s(self) -> float | None:
        if not self.finished:
            return None
        now = time.time()
        total = sum(max(0.0, self._predict(f) - (now - self.began[name] if name in self.began else 0.0))
                    for name, f in self.left.items())
        return total / self.slots

    def _eta_text(self) -> str:
        from .train import format_duration

        eta = self.eta_s()
        return "ETA after the first run" if eta is None else f"sweep ETA {format_duration(eta)}"

    def start(self, run: dict, detail: str = "") -> str:
        self.started += 1
        self.began[run["name"]] = time.time()
        return f"[sweep] run {self.started}/{self.n} {run['name']}{detail} ({self._eta_text()})"

    def finish(self, run: dict, status: str) -> str:
        from .train import format_duration

        took = time.time() - self.began.get(run["name"], self.t0)
        flops = self.left.pop(run["name"], 0.0)
        if status == "done":
            self.finished.append((flops, took))
        remaining = len(self.left)
        tail = f"{remaining} run(s) left, {self._eta_text()}" if remaining else "no run left"
        return f"[sweep] {run['name']}: {status} in {format_duration(took)}; {tail}"


def execute(runs: list[dict], launcher: str = "auto", nproc_per_run: int = 1, gpus_per_run: int = 1,
            allow_config_change: bool = False) -> dict:
    """Run every run that is not DONE; returns {name: "done" | "done (skipped)" | "failed (...)"}.

    Raises SweepInterrupted after SIGTERM / SIGINT (torchrun launcher), once the children
    it forwarded the signal to have stopped.
    """
    import torch

    n_gpus = torch.cuda.device_count()
    if launcher == "auto":
        launcher = "torchrun" if n_gpus > 0 else "inline"
    results = {}
    todo = []
    for run in runs:
        out = Path(run["config"].train.out_dir)
        status = run_status(out)
        if status == "done":
            results[run["name"]] = "done (skipped)"
        else:
            todo.append(run)
            print(f"[sweep] {run['name']}: {'resuming' if status == 'partial' else 'starting'}", flush=True)
    if launcher == "inline":
        progress = SweepProgress(todo)
        from .train import train

        for run in todo:
            print(progress.start(run), flush=True)
            try:
                train(run["config"], allow_config_change=allow_config_change)
                done = (Path(run["config"].train.out_dir) / "DONE").exists()
                results[run["name"]] = "done" if done else "failed (finished without DONE)"
            except Exception as exc:  # noqa: BLE001 - report and go on with the other runs
                results[run["name"]] = f"failed ({type(exc).__name__}: {exc})"
                print(f"[sweep] {run['name']} failed: {exc!r}", file=sys.stderr)
            print(progress.finish(run, "done" if results[run["name"]] == "done" else "failed"), flush=True)
        return results

    # torchrun: on GPUs, as many runs side by side as the GPUs allow; on CPU one at a time.
    per_run = gpus_per_run if n_gpus else nproc_per_run
    slots = max(1, n_gpus // per_run) if n_gpus else 1
    free = [list(range(i * per_run, (i + 1) * per_run)) for i in range(slots)] if n_gpus else [[]]
    active: list[tuple[subprocess.Popen, dict, list[int], object]] = []
    queue = list(todo)
    progress = SweepProgress(todo, slots)

    def forward(signum, frame):
        raise SweepInterrupted(signum)

    # signal handlers can only be set from the main thread; elsewhere the caller handles signals
    main_thread = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        while queue or active:
            while queue and free:
                run, gpus = queue.pop(0), free.pop(0)
                launch = _write_launch(run)
                env = dict(os.environ)
                repo = str(Path(__file__).resolve().parent.parent)
                env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
                log = open(Path(run["config"].train.out_dir) / "train.log", "a")
                cmd = _torchrun_cmd(launch, per_run, allow_config_change)
                print(progress.start(run, f" on GPUs {gpus}" if gpus else ""), flush=True)
                print(f"[sweep] {run['name']}: {shlex.join(cmd)}", flush=True)
                # its own process group (signals are forwarded to it, a terminal's Ctrl-C reaches
                # only the sweep), and SIGTERM from the kernel if the sweep dies
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_child_preexec())
                active.append((proc, run, gpus, log))
            time.sleep(1.0)
            for item in list(active):
                proc, run, gpus, log = item
                if proc.poll() is not None:
                    log.close()
                    active.remove(item)
                    free.append(gpus)
                    ok = proc.returncode == 0 and (Path(run["config"].train.out_dir) / "DONE").exists()
                    results[run["name"]] = "done" if ok else f"failed (rc {proc.returncode}, see train.log)"
                    print(progress.finish(run, results[run["name"]]), flush=True)
    except SweepInterrupted as exc:
        for sig in old:  # a second Ctrl-C / SIGTERM must not cut the cleanup short (SIGKILL still works)
            signal.signal(sig, signal.SIG_IGN)
        print(f"[sweep] {exc}: stopping {len(active)} run(s)", file=sys.stderr, flush=True)
        _stop_children(active, exc.signum)
        for proc, run, _gpus, log in active:
            log.close()
            results[run["name"]] = f"interrupted (rc {proc.returncode})"
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return results


def summarize(runs: list[dict], results: dict | None = None, title: str = "sweep") -> list[dict]:
    """Print a table (rich) of every run's final metrics; returns the rows."""
    rows = []
    for run in runs:
        out = Path(run["config"].train.out_dir)
        last = {}
        mpath = out / "metrics.jsonl"
        if mpath.exists():
            lines = [ln for ln in mpath.read_text().splitlines() if ln.strip()]
            if lines:
                try:
                    last = json.loads(lines[-1])
                except json.JSONDecodeError:
                    pass
        rows.append({
            "run": run["name"], "kind": run["config"].model.attention,
            "params": run["params"]["non_embedding"], "tokens": last.get("tokens", 0), "planned": run["tokens"],
            "pflops_days": last.get("pflops_days"), "val_loss": last.get("val_loss"),
            "trailing_loss": last.get("trailing_loss"), "elapsed_s": last.get("elapsed_s"),
            "status": (results or {}).get(run["name"], run_status(out)),
        })
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in ("run", "kind", "N (non-emb)", "tokens", "PFLOP/s-days", "val loss", "trailing loss",
                    "time (s)", "status"):
            table.add_column(col, justify="left" if col in ("run", "kind", "status") else "right")

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        for r in rows:
            table.add_row(r["run"], r["kind"], f"{r['params']:,}", f"{r['tokens']:,}/{r['planned']:,}",
                          f(r["pflops_days"], ".3g"), f(r["val_loss"], ".4f"), f(r["trailing_loss"], ".4f"),
                          f(r["elapsed_s"], ".0f"), r["status"])
        Console(width=max(140, Console().width)).print(table)
    except ImportError:
        for r in rows:
            print(r)
    return rows


def dry_run(runs: list[dict], mfu: float, peak: float = H100_PEAK, gpus_per_run: int = 1) -> float:
    total = 0.0
    print(f"{'run':<22}{'N non-emb':>14}{'tokens':>16}{'6ND PF-days':>14}{'attn-aware':>14}{'est. h':>9}")
    for r in runs:
        secs = r["attn_aware_flops"] / (peak * mfu * gpus_per_run)
        total += secs
        print(f"{r['name']:<22}{r['params']['non_embedding']:>14,}{r['tokens']:>16,}"
              f"{r['flops'] / PFLOPS_DAY:>14.4g}{r['attn_aware_flops'] / PFLOPS_DAY:>14.4g}{secs / 3600:>9.2f}")
    print(f"estimated total: {total / 3600:.2f} h of {gpus_per_run} GPU(s) per run at MFU {mfu:.0%} "
          f"of {peak:.3g} FLOP/s per GPU (runs side by side divide the wall time by the slots)")
    return total


SBATCH = """#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpn}
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --output={out}/slurm-%j.log
# {name}: {params:,} non-embedding parameters, {tokens:,} tokens, 6ND = {pfd:.1f} PFLOP/s-days
set -euo pipefail
cd {repo}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun python -m torch.distributed.run \\
  --nnodes={nodes} --nproc_per_node={gpn} \\
  --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:29500 \\
  -m scaling_runs.train --config {launch}
"""


def write_launch_scripts(runs: list[dict], sweep_dir: Path, gpus_per_run: int, gpus_per_node: int = 8) -> list[Path]:
    """Slurm scripts (one per run) and launch_all.sh; training resumes if a job is requeued."""
    nodes = max(1, gpus_per_run // gpus_per_node)
    folder = sweep_dir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parent.parent
    paths = []
    for r in runs:
        launch = _write_launch(r)
        text = SBATCH.format(job=f"moba-{r['name']}", nodes=nodes, gpn=gpus_per_node, out=r["config"].train.out_dir,
                             name=r["name"], params=r["params"]["non_embedding"], tokens=r["tokens"],
                             pfd=r["flops"] / PFLOPS_DAY, repo=repo, launch=launch.resolve())
        p = folder / f"{r['name']}.sbatch"
        p.write_text(text)
        paths.append(p)
    allp = folder / "launch_all.sh"
    allp.write_text("#!/bin/bash\nset -e\n" + "".join(f"sbatch {p.resolve()}\n" for p in paths))
    allp.chmod(0o755)
    return paths + [allp]


def run_sweep(preset_name: str, sweep_dir: Path, overrides: dict[str, object] | None = None,
              launcher: str = "auto", nproc_per_run: int = 1, gpus_per_run: int | None = None,
              kinds: list[str] | None = None, allow_config_change: bool = False) -> list[dict]:
    """Plan, run what is not DONE, print the summary; returns its rows (``status`` per run)."""
    preset = get_preset(preset_name)
    if kinds is not None:
        preset.kinds = _check_kinds(kinds)
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(preset, sweep_dir, overrides)
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "preset": preset.name, "note": preset.note, "overrides": overrides or {},
        "runs": [{"name": r["name"], "out_dir": r["config"].train.out_dir, "tokens": r["tokens"],
                  "params": r["params"], "flops": r["flops"], "attn_aware_flops": r["attn_aware_flops"]}
                 for r in runs]}, indent=2))
    t0 = time.time()
    results = execute(runs, launcher, nproc_per_run, gpus_per_run or preset.gpus_per_run, allow_config_change)
    rows = summarize(runs, results, title=f"{preset.name} sweep in {sweep_dir}")
    print(f"[sweep] wall time this invocation: {time.time() - t0:.1f} s")
    return rows


def _kinds(text: str) -> None:
    """``--kinds``: attention kinds, comma-separated; empty = none (an empty plan, exit 2)."""
    if text.strip():
        cli.names(ATTENTION_KINDS, "attention kind")(text)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_kinds(kinds: list[str]) -> list[str]:
    kinds = [k.strip() for k in kinds if k.strip()]
    bad = [k for k in kinds if k not in ATTENTION_KINDS]
    if bad:
        raise ValueError(f"--kinds: unknown attention kind(s) {bad}; expected some of {list(ATTENTION_KINDS)}")
    return kinds


def exit_status(rows: list[dict]) -> tuple[int, str]:
    """(exit status, one-line verdict) for a sweep's summary rows; see the module docstring."""
    if not rows:
        return EXIT_NOTHING_TO_RUN, "nothing to run: the plan has no runs"
    failed = [r["run"] for r in rows if not str(r["status"]).startswith("done")]
    if failed:
        return EXIT_FAILED, f"{len(failed)} of {len(rows)} run(s) failed: {', '.join(failed)}"
    if all(r["status"] == "done (skipped)" for r in rows):
        return 0, f"all {len(rows)} runs were already DONE: nothing to do"
    return 0, f"all {len(rows)} runs DONE"


def build_parser() -> Parser:
    p = Parser("python -m scaling_runs.sweep", __doc__,
               usage="%(prog)s [--preset NAME] [--out DIR] [--dry_run BOOL] [--OPTION VALUE ...]")
    boolean = value_parser(bool)
    p.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS), help="the sweep grid (scaling_runs.presets)")
    p.add_argument("--out", metavar="DIR", default=None, help="sweep folder, one run folder per run "
                   "(default: runs/PRESET)")
    p.add_argument("--launcher", default="auto", choices=("auto", "inline", "torchrun"),
                   help="auto = torchrun on GPUs, inline (in this process) on CPU")
    p.add_argument("--nproc_per_run", type=cli.positive_int, default=1, metavar="N", help="CPU torchrun: processes per run")
    p.add_argument("--gpus_per_run", type=cli.positive_int, default=None, metavar="N", help="GPUs per run (default: the preset's)")
    p.add_argument("--mfu", type=cli.float_in(0, 1, low_open=True), default=0.15, help="--dry_run time estimate: assumed model FLOPs utilisation")
    p.add_argument("--dry_run", type=boolean, default=False, metavar="BOOL",
                   help="list the runs with parameters, tokens, FLOPs and a time estimate, and stop")
    p.add_argument("--run", type=boolean, default=False, metavar="BOOL",
                   help="a launch-only preset (paper): run it here instead of writing Slurm scripts")
    p.add_argument("--kinds", default=None, metavar="KIND,...", type=cli.checked(_kinds, "kind list"),
                   help=f"attention kinds, comma-separated, from {','.join(ATTENTION_KINDS)} (default: the preset's)")
    p.add_argument("--allow_cpu", type=boolean, default=False, metavar="BOOL",
                   help="train a GPU-sized preset (gpu-small) on a machine without a CUDA GPU anyway (hours)")
    p.add_argument("--allow_config_change", type=boolean, default=False, metavar="BOOL",
                   help="resume runs whose checkpoint was trained with other options")
    add_config_options(p, default_note="the preset's value; applies to every run")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:  # a whole sweep is never started by accident
        parser.print_help()
        return 0
    a = parser.parse_args(argv)
    # the typed config options, by field name (as sweep.json records them)
    opts = {k.split(".", 1)[1]: v for k, v in config_overrides(a).items()}
    preset_name = a.preset
    sweep_dir = Path(a.out or f"runs/{preset_name}")
    preset = get_preset(preset_name)
    gpus = a.gpus_per_run if a.gpus_per_run is not None else preset.gpus_per_run
    kinds = a.kinds
    if a.dry_run or (preset.launch_only and not a.run):
        if kinds is not None:
            preset.kinds = _check_kinds(kinds.split(","))
        runs = plan(preset, sweep_dir, opts)
        dry_run(runs, a.mfu, gpus_per_run=gpus)
        if preset.launch_only:
            paths = write_launch_scripts(runs, sweep_dir, gpus)
            print(f"\n{preset.note}\nwrote {len(paths) - 1} Slurm scripts; submit them all with: "
                  f"bash {paths[-1]}\n--- {paths[0].name} ---\n{paths[0].read_text()}")
        return 0
    if preset.needs_gpu and not a.allow_cpu and not _cuda_available():
        raise cli.fail(f"--preset {preset_name} is sized for GPUs and this machine has no CUDA GPU: "
                       f"--dry_run true prints its plan, --preset cpu-tiny trains on a CPU, "
                       f"--allow_cpu true trains it here anyway (hours)")
    # inline runs: SIGTERM unwinds the stack so that the run folder's lock is released
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        rows = run_sweep(preset_name, sweep_dir, opts, a.launcher, a.nproc_per_run, gpus,
                         kinds.split(",") if kinds is not None else None, a.allow_config_change)
    except SweepInterrupted as exc:
        return 128 + exc.signum
    code, verdict = exit_status(rows)
    print(f"[sweep] {verdict}", file=sys.stderr if code else sys.stdout, flush=True)
    return code


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "scaling_runs.sweep"))
