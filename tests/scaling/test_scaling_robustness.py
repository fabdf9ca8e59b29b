"""Training that refuses corrupt state (issue 13): checksummed checkpoints, non-finite losses,
config / data changes on resume, one writer per run folder, sweep exit status, no orphans.

Most runs are in-process (a tiny model, ~1 s each); the ``stop_after_step`` fault hook stops a
run with an exception where a kill would stop it. One test drives a real torchrun sweep and
kills it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from scaling_runs import checkpoint as C
from scaling_runs import sweep as S
from scaling_runs import train as T
from scaling_runs.config import RunConfig, config_differences
from tests._helpers import ROOT, losses, make_text_corpus, metrics, tiny_config


@pytest.fixture(autouse=True)
def _keep_sigterm():
    """``train.main`` / ``sweep.main`` install a SIGTERM handler: restore pytest's afterwards."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def stopped_run(tmp_path: Path, name: str, stop: int, monkeypatch, **train) -> RunConfig:
    """A run stopped (in-process) right after step ``stop``; eval and checkpoint every 3 steps."""
    cfg = tiny_config(tmp_path, name, **train)
    monkeypatch.setenv("MOBA_SCALING_FAULT", f"stop_after_step:{stop}")
    with pytest.raises(T.InjectedFault):
        T.train(cfg)
    monkeypatch.delenv("MOBA_SCALING_FAULT")
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of an uninterrupted 10-step in-process run."""
    cfg = tiny_config(tmp_path_factory.mktemp("ref"), "ref")
    T.train(cfg)
    return losses(cfg)


def flip_bit_in_a_tensor(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's bytes of a checkpoint file."""
    data = bytearray(path.read_bytes())
    start = C.HEADER_LEN if data.startswith(C.MAGIC) else 0
    with zipfile.ZipFile(io.BytesIO(bytes(data[start:]))) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED  # torch.save stores tensor bytes as they are
    off = start + info.header_offset  # local header: 30 bytes + name + extra, then the data
    name_len, extra_len = struct.unpack("<HH", data[off + 26 : off + 30])
    data[off + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_checksum_catches_a_flipped_tensor_bit(tmp_path, capsys):
    state = {"w": torch.arange(1000, dtype=torch.float32), "step": 3}
    path = C.save_checkpoint(tmp_path, state)
    assert torch.equal(C.load_file(path)["w"], state["w"])
    flip_bit_in_a_tensor(path)
    # torch.load alone accepts the flipped bit: a different tensor, no error
    payload = path.read_bytes()[C.HEADER_LEN :]
    assert not torch.equal(torch.load(io.BytesIO(payload), weights_only=False)["w"], state["w"])
    with pytest.raises(C.CheckpointError, match="checksum mismatch"):
        C.load_file(path)
    # a file without the header (the format before checksums) still loads, flagged unverified
    torch.save(state, tmp_path / "old.pt")
    assert C.load_file(tmp_path / "old.pt")["step"] == 3
    assert "no checksum" in capsys.readouterr().err


def test_save_keeps_the_last_two(tmp_path):
    for step in (1, 2, 3):
        C.save_checkpoint(tmp_path, {"step": step})
    assert C.load_file(tmp_path / C.CKPT)["step"] == 3 and C.load_file(tmp_path / C.CKPT_PREV)["step"] == 2
    assert not (tmp_path / (C.CKPT + ".tmp")).exists()
    assert C.load_latest(tmp_path / "empty") is None


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, capsys, reference):
    run = stopped_run(tmp_path, "flip", 7, monkeypatch)  # ckpt.pt: step 6, ckpt_prev.pt: step 3
    out = Path(run.train.out_dir)
    flip_bit_in_a_tensor(out / C.CKPT)
    capsys.readouterr()
    T.train(run)
    err = capsys.readouterr().err
    assert "rejected" in err and "checksum mismatch" in err and "using the older checkpoint" in err
    assert "ckpt_prev.pt (step 3)" in err
    assert (out / (C.CKPT + C.CORRUPT_SUFFIX)).exists()  # kept aside, out of the rotation
    assert losses(run) == reference  # bitwise the uninterrupted run
    assert (out / "DONE").exists()
    assert C.load_file(out / C.CKPT)["step"] == 10 and C.load_file(out / C.CKPT_PREV)["step"] == 9


def test_no_valid_checkpoint_left_is_an_error(tmp_path, monkeypatch):
    run = stopped_run(tmp_path, "allbad", 7, monkeypatch)
    out = Path(run.train.out_dir)
    flip_bit_in_a_tensor(out / C.CKPT)
    (out / C.CKPT_PREV).write_bytes((out / C.CKPT_PREV).read_bytes()[:2000])  # torn
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(C.CheckpointError, match="no valid checkpoint left") as exc:
        T.train(run)
    assert "ckpt.pt" in str(exc.value) and "ckpt_prev.pt" in str(exc.value)
    assert (out / "metrics.jsonl").read_text() == before  # the metrics are not discarded
    assert not (out / "DONE").exists()
    # the command line stops with status 1 and the message
    launch = out.parent / "allbad.json"
    launch.write_text(json.dumps(run.to_dict()))
    with pytest.raises(SystemExit) as code:
        T.main(["--config", str(launch)])
    assert code.value.code == 1


# ----------------------------------------------------------------------------- non-finite losses


def test_nonfinite_train_loss_stops_without_done(tmp_path, monkeypatch):
    run = tiny_config(tmp_path, "nan")
    out = Path(run.train.out_dir)
    monkeypatch.setenv("MOBA_SCALING_FAULT", "nan_loss_at_step:5")
    with pytest.raises(T.NonFiniteLossError, match="non-finite train loss nan at step 5"):
        T.train(run)
    assert not (out / "DONE").exists()
    assert [r["step"] for r in metrics(run)] == [3] and C.load_file(out / C.CKPT)["step"] == 3
    # opting in: the bad step is skipped (no update) and counted; the option may change on resume
    skip = tiny_config(tmp_path, "nan", skip_nonfinite_steps=1)
    last = T.train(skip)
    assert (out / "DONE").exists() and last["skipped_steps"] == 1 and last["step"] == 10
    assert all(r["step"] < 6 or r["skipped_steps"] == 1 for r in metrics(skip))


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_diverging_run_stops_without_done(tmp_path, grad_clip):
    # lr 1e6: the loss stays finite a step longer than the gradients; without clipping the
    # gradient norm is checked all the same, so no non-finite update reaches a checkpoint
    run = tiny_config(tmp_path, "lr", lr=1e6, warmup_steps=0, grad_clip=grad_clip, eval_every=10,
                     ckpt_every=1)
    with pytest.raises(T.NonFiniteLossError, match="non-finite") as exc:
        T.train(run)
    assert not (Path(run.train.out_dir) / "DONE").exists()
    ckpt = C.load_file(Path(run.train.out_dir) / C.CKPT) if (Path(run.train.out_dir) / C.CKPT).exists() else None
    assert ckpt is None or all(torch.isfinite(v).all() for v in ckpt["model"].values()), str(exc.value)


def test_nonfinite_val_loss_stops_without_done(tmp_path, monkeypatch):
    run = tiny_config(tmp_path, "nanval")
    monkeypatch.setenv("MOBA_SCALING_FAULT", "nan_val_at_step:6")
    with pytest.raises(T.NonFiniteLossError, match="val_loss nan at step 6"):
        T.train(run)
    assert [r["step"] for r in metrics(run)] == [3]
    assert C.load_file(Path(run.train.out_dir) / C.CKPT)["step"] == 3
    assert not (Path(run.train.out_dir) / "DONE").exists()


# ----------------------------------------------------------------------------- resume checks


def test_resume_with_another_config_is_refused_naming_the_fields(tmp_path, monkeypatch, reference):
    run = stopped_run(tmp_path, "cfg", 4, monkeypatch)
    changed = tiny_config(tmp_path, "cfg", lr=2e-2, eval_seqs=8, threads=0)
    with pytest.raises(T.ConfigMismatchError) as exc:
        T.train(changed)
    msg = str(exc.value)
    assert "train.lr (checkpoint 0.01, now 0.02)" in msg and "train.eval_seqs (checkpoint 4, now 8)" in msg
    assert "threads" not in msg and "--allow_config_change" in msg
    assert not (Path(run.train.out_dir) / "DONE").exists()
    # options that change no number resume freely, and bitwise
    T.train(tiny_config(tmp_path, "cfg", threads=0, progress=True))
    assert losses(run) == reference


def test_resume_with_other_data_is_refused_unless_allowed(tmp_path, monkeypatch):
    run = stopped_run(tmp_path, "data", 4, monkeypatch)
    some = sorted((tmp_path / "corpus").rglob("*.txt"))[0]
    some.write_text(some.read_text() + "\nchanged words here\n")
    with pytest.raises(T.ConfigMismatchError, match="data_hash"):
        T.train(run)
    T.train(run, allow_config_change=True)
    rec = json.loads((Path(run.train.out_dir) / "config.json").read_text())
    assert rec["resumed_from_step"] == 3 and rec["resumed_with_changes"][0].startswith("data_hash")


def test_config_differences_treats_absent_fields_as_defaults():
    cfg = RunConfig().to_dict()
    old = json.loads(json.dumps(cfg))
    del old["train"]["skip_nonfinite_steps"], old["model"]["rope_theta"]
    assert config_differences(old, cfg) == []
    old["model"]["n_layer"] = 9
    assert config_differences(old, cfg) == ["model.n_layer (checkpoint 9, now 4)"]


def test_train_config_round_trip(tmp_path):
    run = tiny_config(tmp_path, "orig", max_steps=4)
    T.train(run)
    saved = Path(run.train.out_dir) / "config.json"
    again = T.config_from_argv(["--config", str(saved), "--out_dir", str(tmp_path / "copy")])
    assert again.to_dict() == {**run.to_dict(), "train": {**run.to_dict()["train"], "out_dir": str(tmp_path / "copy")}}
    T.main(["--config", str(saved), "--out_dir", str(tmp_path / "copy")])
    assert losses(again) == losses(run)
    # a config.json from before data_config existed is refused with a clear message
    legacy = json.loads(saved.read_text())
    del legacy["data_config"]
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="no 'data_config'"):
        T.config_from_argv(["--config", str(tmp_path / "legacy.json")])
    with pytest.raises(ValueError, match=r"unknown keys \['cache'\]"):
        RunConfig.from_dict({"data": {"cache": "x"}})


# ----------------------------------------------------------------------------- one writer


def test_second_trainer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    run = tiny_config(tmp_path, "lock", max_steps=3)
    out = Path(run.train.out_dir)
    with T.RunLock(out):
        with pytest.raises(T.RunLockedError, match=f"pid {os.getpid()}"):
            T.train(run)
    assert not (out / T.LOCK).exists()  # released
    # a lock left by a process that died (kill -9: the file stays, its pid is gone)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / T.LOCK).write_text(json.dumps({"pid": dead.pid, "host": T.socket.gethostname(), "start": "1"}))
    capsys.readouterr()
    T.train(run)
    assert f"stale lock in {out} (pid {dead.pid}" in capsys.readouterr().err
    assert (out / "DONE").exists() and not (out / T.LOCK).exists()


def test_lock_of_a_live_process_is_refused_and_a_reused_pid_is_not(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    parent = os.getppid()  # alive, and not this process
    held = {"pid": parent, "host": T.socket.gethostname(), "start": T._proc_start_time(parent)}
    (out / T.LOCK).write_text(json.dumps(held))
    with pytest.raises(T.RunLockedError, match=f"pid {parent} on"):
        T.RunLock(out).acquire()
    # the same pid with another start time is a reused pid: the lock is stale
    (out / T.LOCK).write_text(json.dumps({**held, "start": "1"}))
    with T.RunLock(out, log=lambda msg: None):
        assert json.loads((out / T.LOCK).read_text())["pid"] == os.getpid()


def test_stopping_a_sweep_signals_each_child_group(tmp_path):
    # a child in its own session with a grandchild in the same group, like torchrun + trainer
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    group: list[int] = []
    while len(group) < 2 and proc.poll() is None:  # however slow the machine is to start the grandchild
        time.sleep(0.1)
        group = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == proc.pid]
    assert len(group) == 2
    S._stop_children([(proc,)], signal.SIGTERM, grace_s=10)
    assert proc.returncode == -signal.SIGTERM
    time.sleep(0.5)
    assert [p for p in group if Path(f"/proc/{p}").exists() and _state(p) != "Z"] == []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                pids.append(int(p.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux")
def test_killed_torchrun_sweep_leaves_no_orphans_and_resumes_cleanly(tmp_path):
    corpus = make_text_corpus(tmp_path / "corpus", n_files=10, words=600)
    sweep_dir = tmp_path / "sweep"
    opts = {"data": str(corpus), "val_fraction": "0.2", "context": "32", "block_size": "8", "batch_size": "4",
            "max_tokens": "640", "eval_every": "1", "ckpt_every": "2", "eval_seqs": "4", "progress": "false",
            "threads": "1"}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MOBA_SCALING_FAULT="sleep_after_step:3")
    cmd = [sys.executable, "-m", "scaling_runs.sweep", "--preset", "cpu-tiny", "--out", str(sweep_dir),
           "--launcher", "torchrun", *[x for k, v in opts.items() for x in (f"--{k}", v)]]
    sweep = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = sweep_dir / "s1-moba"
    try:
        while True:  # until the trainer sleeps after step 3 (rows 1-3, checkpoint 2); no clock: a slow
            # machine only makes this wait longer, and a sweep that dies fails the assertion
            mpath = run_dir / "metrics.jsonl"
            if mpath.exists() and len(mpath.read_text().splitlines()) >= 3 and (run_dir / T.LOCK).exists():
                break
            assert sweep.poll() is None, (run_dir / "train.log").read_text()
            time.sleep(0.5)
        trainer = json.loads((run_dir / T.LOCK).read_text())["pid"]
        cfg = RunConfig.from_saved(json.loads((run_dir / "launch.json").read_text()))
        with pytest.raises(T.RunLockedError, match=f"pid {trainer}"):  # one run folder, one writer
            T.train(cfg)
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()
        deadline = time.time() + 600  # parent-death signals act at once; only a loaded machine is slow
        while _processes_mentioning(str(run_dir)) and time.time() < deadline:
            time.sleep(0.5)
        assert _processes_mentioning(str(run_dir)) == []  # torchrun and its trainer are gone
    finally:
        if sweep.poll() is None:
            sweep.kill()
        for pid in _processes_mentioning(str(run_dir)):
            os.kill(pid, signal.SIGKILL)
    assert not (run_dir / "DONE").exists()
    T.train(cfg)  # the rerun resumes from step 2 and redoes step 3
    assert [r["step"] for r in metrics(cfg)] == [1, 2, 3, 4, 5]
    ref = RunConfig.from_saved({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "out_dir": str(tmp_path / "r")}})
    T.train(ref)
    assert losses(cfg) == losses(ref)


# ----------------------------------------------------------------------------- sweep exit status


SWEEP_OPTS = ["--context", "32", "--block_size", "8", "--batch_size", "4", "--max_tokens", "384",
              "--eval_every", "1", "--eval_seqs", "4", "--progress", "false", "--launcher", "inline"]


def test_sweep_exit_status(tmp_path, capsys):
    # every run fails (no such data): status 1, naming the runs
    assert S.main(["--out", str(tmp_path / "fail"), "--data", str(tmp_path / "missing"), *SWEEP_OPTS]) == 1
    assert "6 of 6 run(s) failed" in capsys.readouterr().err
    # an empty plan: nothing ran, status 2
    assert S.main(["--out", str(tmp_path / "none"), "--kinds", "", *SWEEP_OPTS]) == 2
    assert "nothing to run" in capsys.readouterr().err
    # every run already DONE: a success, said as such
    done = tmp_path / "done"
    for r in S.plan(S.get_preset("cpu-tiny"), done):
        Path(r["config"].train.out_dir).mkdir(parents=True)
        (Path(r["config"].train.out_dir) / "DONE").write_text("{}")
    assert S.main(["--out", str(done), *SWEEP_OPTS]) == 0
    assert "all 6 runs were already DONE: nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:  # a usage error, before anything runs
        S.main(["--out", str(tmp_path / "bad"), "--kinds", "moba,sparse", *SWEEP_OPTS])
    assert usage.value.code == 2 and "unknown attention kind 'sparse'" in capsys.readouterr().err
    assert S.exit_status([{"run": "a", "status": "done"}, {"run": "b", "status": "interrupted (rc -15)"}])[0] == 1
