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

from scaling_runs.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from tests.test_scaling_data import make_text_corpus

REPO = Path(__file__).resolve().parent.parent


def tiny_config(tmp_path: Path, out: str, **train) -> RunConfig:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        make_text_corpus(corpus, n_files=10, words=600)
    t = dict(out_dir=str(tmp_path / out), batch_size=4, max_steps=10, lr=1e-2, warmup_steps=2, eval_every=3,
             eval_seqs=4, threads=1, progress=False, seed=7)
    t.update(train)
    return RunConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, context=48, block_size=8, top_k=2,
                          attention="hybrid", n_full_layers=1),
        data=DataConfig(data=str(corpus), val_fraction=0.2),
        train=TrainConfig(**t),
    )


def metrics(cfg: RunConfig) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(cfg: RunConfig) -> list[tuple]:
    return [(r["step"], r["tokens"], r["train_loss"], r["val_loss"], r["trailing_loss"]) for r in metrics(cfg)]


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
    return subprocess.run(head + ["scaling_runs.train", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


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
