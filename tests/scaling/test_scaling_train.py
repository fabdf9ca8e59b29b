"""Training of scaling_runs: learning, kill-and-resume, torchrun DDP equivalence.

Runs use a tiny model on a small generated text corpus, one torch thread, and are launched
as subprocesses where a process must die (fault hooks) or torchrun is involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaling_runs.config import ModelConfig, RunConfig, TrainConfig
from tests._helpers import ROOT, losses, make_text_corpus, metrics, tiny_config
from tests._subprocess import run_child


def launch(cfg: RunConfig, fault: str | None = None, nproc: int = 0) -> subprocess.CompletedProcess:
    path = Path(cfg.train.out_dir + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MOBA_SCALING_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["MOBA_SCALING_FAULT"] = fault
    head = [sys.executable, "-m"]
    if nproc:
        head += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    return run_child(head + ["scaling_runs.train", "--config", str(path)], cwd=ROOT, env=env)


def test_a_few_steps_lower_the_loss(tmp_path):
    from scaling_runs.train import train

    cfg = tiny_config(tmp_path, "learn", max_steps=12)
    last = train(cfg)
    rows = metrics(cfg)
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert last["val_loss"] < rows[0]["val_loss"] < 5.55  # ln(256) = 5.55 at init
    assert last["train_loss"] < 5.0
    rec = json.loads((Path(cfg.train.out_dir) / "config.json").read_text())
    assert rec["layer_modes"] == ["moba", "full"] and rec["data"]["data_hash"]
    assert rec["params"]["non_embedding"] > 0 and "commit" in rec["git"]
    # what CPU results depend on: the CPU and the instruction set of torch's CPU kernels
    assert rec["device"]["cpu_model"] and rec["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for key in ("flops", "pflops_days", "attn_aware_flops", "elapsed_s", "loss_by_bucket"):
        assert key in last
    assert last["flops"] == 6 * rec["params"]["non_embedding"] * last["tokens"]
    assert (Path(cfg.train.out_dir) / "DONE").exists()
    assert train(cfg) == last  # a finished run is skipped


def test_grad_accum_gives_the_same_losses(tmp_path):
    from scaling_runs.train import train

    a = tiny_config(tmp_path, "acc1", max_steps=4, eval_every=2)
    b = tiny_config(tmp_path, "acc2", max_steps=4, eval_every=2, grad_accum=2)
    train(a)
    train(b)
    for ra, rb in zip(metrics(a), metrics(b), strict=True):
        for key in ("train_loss", "val_loss", "trailing_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 10-step run (subprocess), shared by the resume tests."""
    root = tmp_path_factory.mktemp("ref")
    ref = tiny_config(root, "ref")
    p = launch(ref)
    assert p.returncode == 0, p.stderr
    return ref


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, reference_run):
    ref = reference_run
    # 1. hard exit after step 7 (last checkpoint at step 6), then resume
    cut = tiny_config(tmp_path, "cut")
    p = launch(cut, fault="exit_after_step:7")
    assert p.returncode == 17, p.stderr
    assert not (Path(cut.train.out_dir) / "DONE").exists()
    assert launch(cut).returncode == 0
    assert losses(cut) == losses(ref)
    # 2. killed halfway through writing the checkpoint of step 9: a torn ckpt.pt.tmp is left,
    #    ckpt.pt (step 6) is intact and the metrics line of step 9 must be dropped
    torn = tiny_config(tmp_path, "torn")
    p = launch(torn, fault="die_in_ckpt:9")
    assert p.returncode == 17, p.stderr
    tmp_ckpt = Path(torn.train.out_dir) / "ckpt.pt.tmp"
    assert tmp_ckpt.exists() and tmp_ckpt.stat().st_size < (Path(torn.train.out_dir) / "ckpt.pt").stat().st_size
    assert launch(torn).returncode == 0
    assert losses(torn) == losses(ref)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, reference_run):
    ref = reference_run
    run = tiny_config(tmp_path, "bad")
    assert launch(run, fault="exit_after_step:7").returncode == 17
    ckpt = Path(run.train.out_dir) / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # corrupt the newest (step 6); ckpt_prev.pt is step 3
    p = launch(run)
    assert p.returncode == 0, p.stderr
    assert "rejected" in p.stderr and "checksum mismatch" in p.stderr and "ckpt_prev.pt" in p.stderr
    assert losses(run) == losses(ref)


def test_torchrun_two_processes_match_one(tmp_path):
    one = tiny_config(tmp_path, "one", max_steps=4, eval_every=2)
    two = tiny_config(tmp_path, "two", max_steps=4, eval_every=2)
    assert launch(one).returncode == 0
    p = launch(two, nproc=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((Path(two.train.out_dir) / "config.json").read_text())["device"]["world_size"] == 2
    for ra, rb in zip(metrics(one), metrics(two), strict=True):
        assert ra["step"] == rb["step"] and ra["tokens"] == rb["tokens"]
        for key in ("train_loss", "val_loss", "trailing_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6)


def test_sweep_runs_skips_finished_runs_and_fits(tmp_path, capsys):
    from scaling_runs.fit import fit_sweep
    from scaling_runs.sweep import run_sweep

    corpus = make_text_corpus(tmp_path / "corpus", n_files=10, words=600)
    overrides = {"data": str(corpus), "val_fraction": "0.2", "context": "32", "block_size": "8",
                 "batch_size": "4", "max_tokens": "384", "eval_every": "1", "eval_seqs": "4", "progress": "false"}
    rows = run_sweep("cpu-tiny", tmp_path / "sweep", overrides, launcher="inline")
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    assert {r["kind"] for r in rows} == {"moba", "full"}
    rows = run_sweep("cpu-tiny", tmp_path / "sweep", overrides, launcher="inline")
    assert all(r["status"] == "done (skipped)" for r in rows)
    fits = fit_sweep(tmp_path / "sweep", skip_frac=0.0)
    assert set(fits["lm_loss"]) == {"moba", "full"} and set(fits["trailing_loss"]) == {"moba", "full"}
    assert all(Path(p).exists() for p in fits["plots"])


# ----------------------------------------------------------------------------- what a user sees


def test_log_file_output_resume_line_and_summary(tmp_path):
    """stderr not a terminal (a log file): one line per evaluation, no progress bar; a resumed
    run says so; the run ends with a readable summary holding the final val loss, not JSON."""
    run = tiny_config(tmp_path, "logged", progress=True)  # evaluations at steps 3, 6, 9, 10
    first = launch(run, fault="exit_after_step:7")
    assert first.returncode == 17, first.stderr
    evals = [ln for ln in first.stderr.splitlines() if ln.startswith("[train] step ")]
    assert [ln.split()[2] for ln in evals] == ["3/10", "6/10"], first.stderr
    assert "step/s" not in first.stderr and "\r" not in first.stderr  # no tqdm bar in a log file
    second = launch(run)
    assert second.returncode == 0, second.stderr
    assert "resuming from step 6" in second.stderr
    evals = [ln for ln in second.stderr.splitlines() if ln.startswith("[train] step ")]
    assert [ln.split()[2] for ln in evals] == ["9/10", "10/10"], second.stderr
    final = metrics(run)[-1]
    assert f"val {final['val_loss']:.4f}" in evals[-1] and "tok/s" in evals[-1] and "eta" in evals[-1]
    out = second.stdout
    assert "{" not in out, out  # not a raw JSON dict
    lines = {ln.split("  ")[1].strip(): ln for ln in out.splitlines() if ln.startswith("  ")}
    assert f"{final['val_loss']:.4f}" in lines["val loss"]
    assert f"{final['trailing_loss']:.4f}" in lines["trailing loss"]
    assert "10 / 10" in lines["steps"] and f"{final['tokens']:,}" in lines["tokens"]
    assert "tokens/s" in lines["throughput"] and str(Path(run.train.out_dir) / "metrics.jsonl") in lines["metrics"]


def test_progress_bar_on_a_terminal_shows_val_loss_and_tokens_per_s(tmp_path, monkeypatch):
    import io

    from scaling_runs import train as T

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    cfg = tiny_config(tmp_path, "bar", progress=True, max_steps=4, eval_every=2)
    last = T.train(cfg)
    shown = term.getvalue().split("\r")
    assert any("4/4" in s for s in shown), term.getvalue()
    final = [s for s in shown if "4/4" in s][-1]
    assert f"val={last['val_loss']:.3f}" in final and "tok/s=" in final and "loss=" in final
    assert "[train] step" not in term.getvalue()  # the bar replaces the per-evaluation lines


def test_a_log_gets_step_lines_between_evaluations(tmp_path, monkeypatch):
    """stderr not a terminal: besides the per-evaluation lines, a step line whenever
    ``Progress.line_every_s`` passed without a line (0 here: after every step), so a log is
    never silent for minutes."""
    import io

    from scaling_runs import train as T

    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(T.Progress, "line_every_s", 0.0)
    T.train(tiny_config(tmp_path, "lines", progress=True, max_steps=3, eval_every=3))
    steps = [ln for ln in log.getvalue().splitlines() if ln.startswith("[train] progress: step ")]
    assert [ln.split()[3] for ln in steps] == ["1/3", "2/3", "3/3"], log.getvalue()
    assert all("tok/s" in ln and "eta" in ln for ln in steps)
    monkeypatch.setattr(T.Progress, "line_every_s", 1e9)  # the default minute, never reached here
    log.truncate(0)
    T.train(tiny_config(tmp_path, "quiet", progress=True, max_steps=3, eval_every=3))
    assert "[train] progress:" not in log.getvalue() and "[train] step 3/3" in log.getvalue()


def test_format_summary_and_eval_line():
    from scaling_runs.train import eval_line, format_duration, format_summary

    row = {"step": 50, "tokens": 204800, "train_loss": 2.5, "val_loss": 2.25, "trailing_loss": 2.125,
           "tokens_per_s": 1234.5, "elapsed_s": 3725.0}
    text = format_summary(row, "/tmp/nowhere")
    assert "2.2500" in text and "2.1250" in text and "204,800" in text and "1,234 tokens/s" in text
    assert "1:02:05" in text and "/tmp/nowhere/metrics.jsonl" in text
    values = [ln[2:].split("  ", 1) for ln in text.splitlines()[1:]]
    assert len({len(k) + len(rest) - len(rest.lstrip()) for k, rest in values}) == 1  # one column
    assert format_summary({}, "/x").startswith("[train] /x: finished, no evaluation")
    line = eval_line(row, 100, 999.0, 61.0)
    assert line.startswith("[train] step 50/100 (50%)") and "val 2.2500" in line and "eta 1:01" in line
    assert format_duration(None) == "-" and format_duration(42.14) == "42.1 s"


@pytest.mark.parametrize(("kw", "dense"), [
    (dict(context=64, block_size=64), True),
    (dict(context=64, block_size=128), True),
    (dict(context=64, block_size=16, top_k=4), True),  # 4 blocks, all selected
    (dict(context=64, block_size=16, top_k=3), False),
    (dict(context=64, block_size=64, attention="full"), False),
    (dict(context=64, block_size=64, attention="hybrid", n_layer=2, n_full_layers=2), False),
    (dict(context=64, block_size=64, attention="hybrid", n_layer=2, n_full_layers=1), True),
])
def test_moba_settings_that_are_dense_attention_warn(kw, dense):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ModelConfig(**kw)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if dense:
        assert len(msgs) == 1 and "dense" in msgs[0] and "block_size" in msgs[0], msgs
        assert caught[0].filename == __file__  # points at the line that built the config
    else:
        assert msgs == []


def test_sweep_shows_run_i_of_n_and_an_eta(tmp_path, capsys):
    from scaling_runs import sweep as S

    corpus = make_text_corpus(tmp_path / "corpus", n_files=10, words=600)
    argv = ["--out", str(tmp_path / "sw"), "--data", str(corpus), "--val_fraction", "0.2", "--context", "32",
            "--block_size", "8", "--batch_size", "4", "--max_tokens", "256", "--eval_every", "2", "--eval_seqs", "4",
            "--progress", "false", "--launcher", "inline", "--kinds", "moba", "--threads", "1"]
    assert S.main(argv) == 0
    out = capsys.readouterr().out
    starts = [ln for ln in out.splitlines() if ln.startswith("[sweep] run ")]
    assert [ln.split()[2] for ln in starts] == ["1/3", "2/3", "3/3"], out
    assert "ETA after the first run" in starts[0] and "sweep ETA" in starts[1]
    assert "1 run(s) left, sweep ETA" in out and "no run left" in out


def test_sweep_eta_from_finished_runs(monkeypatch):
    from scaling_runs import sweep as S

    clock = [1000.0]
    monkeypatch.setattr(S.time, "time", lambda: clock[0])
    cfg = RunConfig(train=TrainConfig(out_dir="/nonexistent/run"))
    runs = [{"name": n, "config": cfg, "tokens": 100, "attn_aware_flops": f}
            for n, f in (("a", 1e9), ("b", 2e9), ("c", 4e9))]
    p = S.SweepProgress(runs)
    assert p.eta_s() is None
    p.start(runs[0])
    clock[0] += 2.0
    p.finish(runs[0], "done")
    assert p.eta_s() == pytest.approx(2.0 * (2e9 + 4e9) / 1e9)  # one run: proportional to FLOPs
    p.start(runs[1])
    clock[0] += 3.0
    p.finish(runs[1], "done")
    assert p.eta_s() == pytest.approx(1.0 + 4e9 * 1e-9)  # 2 s = 1 + 1e9 k, 3 s = 1 + 2e9 k
    p.start(runs[2])
    clock[0] += 2.0
    assert p.eta_s() == pytest.approx(3.0)  # what is left of run c's predicted 5 s
    assert "2/3" not in p.finish(runs[2], "failed (rc 1)") and p.eta_s() == 0.0
