"""Checkpoints carry data, never code: a pickle that would run code is refused on every path
that loads a checkpoint (``load_file``, ``load_model`` / ``load_gpt``, train resume,
``bench.generate_speed --target-run``), with a clear error; ``trust_checkpoint=True`` is the
explicit, off-by-default opt-in for files written by an older version.

The malicious object's ``__reduce__`` writes a marker file: the file existing afterwards means
the load ran code. A valid checksum header is written for it (whoever writes a file can write
its header), so the checksum cannot be what stops it.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from scaling_runs import checkpoint as C
from scaling_runs import train as T
from scaling_runs.config import ModelConfig
from scaling_runs.model import GPT
from tests._helpers import tiny_config


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: code execution, harmless here."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(autouse=True)
def _keep_sigterm():
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def _tiny_gpt_state(data: dict | None = None) -> dict:
    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, context=32, vocab_size=256, block_size=8, top_k=2)
    config = {"model": dataclasses.asdict(cfg)}
    if data is not None:
        config["data"] = data
    return {"model": GPT(cfg).state_dict(), "step": 0, "config": config}


def _write_evil(path: Path, marker: Path, state: dict | None = None) -> Path:
    """A checkpoint with a valid sha256 header whose payload runs code when unpickled."""
    state = dict(state or _tiny_gpt_state())
    state["evil"] = _Payload(marker)
    header, payload = C.encode(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + bytes(payload))
    return path


def test_load_file_refuses_code_and_the_opt_in_runs_it(tmp_path):
    marker = tmp_path / "ran"
    path = _write_evil(tmp_path / "ckpt.pt", marker)
    with pytest.raises(C.UntrustedCheckpointError, match="refusing to load.*trust_checkpoint") as info:
        C.load_file(path)
    assert "names the Python object" in str(info.value)  # says what it refused
    assert not marker.exists()
    with pytest.raises(TypeError, match="trust_checkpoint must be True or False"):
        C.load_file(path, trust_checkpoint="yes")
    assert not marker.exists()
    # the explicit opt-in unpickles everything (this is what every path did before)
    C.load_file(path, trust_checkpoint=True)
    assert marker.exists()


def test_load_model_and_load_gpt_refuse_code(tmp_path):
    marker = tmp_path / "ran"
    path = _write_evil(tmp_path / "run" / C.CKPT, marker)
    for load in (C.load_gpt, C.load_model):
        for where in (path, path.parent):  # the file, and the run folder (load_latest)
            with pytest.raises(C.UntrustedCheckpointError):
                load(where)
    assert not marker.exists()
    assert path.exists() and not list(path.parent.glob("*.corrupt"))  # refused, not quarantined


def test_load_latest_does_not_fall_back_past_an_untrusted_file(tmp_path):
    C.save_checkpoint(tmp_path, {"step": 1})
    C.save_checkpoint(tmp_path, {"step": 2})
    _write_evil(tmp_path / C.CKPT, tmp_path / "ran", {"step": 3})
    with pytest.raises(C.UntrustedCheckpointError):
        C.load_latest(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_train_resume_refuses_code(tmp_path):
    cfg = tiny_config(tmp_path, "run", max_steps=3)
    out = Path(cfg.train.out_dir)
    marker = tmp_path / "ran"
    _write_evil(out / C.CKPT, marker, {"model": {}, "step": 1})
    with pytest.raises(C.UntrustedCheckpointError, match="--trust_checkpoint true"):
        T.train(cfg)
    assert not marker.exists() and (out / C.CKPT).exists() and not (out / "DONE").exists()


def test_train_cli_refuses_code_in_one_line(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "run", max_steps=3)
    marker = tmp_path / "ran"
    _write_evil(Path(cfg.train.out_dir) / C.CKPT, marker, {"model": {}, "step": 1})
    argv = ["--data", cfg.data.data, "--out_dir", cfg.train.out_dir, "--max_steps", "3", "--progress", "false"]
    with pytest.raises(SystemExit) as info:
        T.main(argv)
    assert info.value.code == 1 and not marker.exists()
    assert "refusing to load" in capsys.readouterr().err


def test_generate_speed_target_run_refuses_code(tmp_path):
    from bench import generate_speed

    marker = tmp_path / "ran"
    target = _write_evil(tmp_path / "target" / C.CKPT, marker)
    draft = _write_evil(tmp_path / "draft" / C.CKPT, marker)
    with pytest.raises(SystemExit, match="refusing to load") as info:
        generate_speed.main(["--target-run", str(target), "--draft-run", str(draft), "--device", "cpu",
                             "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1",
                             "--out", str(tmp_path / "out")])
    assert "\n" not in str(info.value.code)
    assert not marker.exists()


def test_a_trained_checkpoint_is_data_only_and_resumes(tmp_path):
    """What train saves loads with weights_only=True (RNG states as tensors and numbers), and
    restore_rng puts every generator back."""
    cfg = tiny_config(tmp_path, "run", max_steps=3, eval_every=3)
    T.train(cfg)
    state = C.load_file(Path(cfg.train.out_dir) / C.CKPT)
    rng = state["rng"]
    assert isinstance(rng["numpy"], dict) and isinstance(rng["python"], dict)
    import random

    C.restore_rng(rng, torch.device("cpu"))
    a = (torch.rand(3), np.random.rand(3), random.random())
    C.restore_rng(rng, torch.device("cpu"))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_an_older_checkpoint_needs_the_opt_in(tmp_path, monkeypatch):
    """Checkpoints of the previous format (numpy RNG state as an array) are refused by default
    and resume with ``trust_checkpoint=True``."""
    import random

    cfg = tiny_config(tmp_path, "run", max_steps=6, eval_every=3)
    monkeypatch.setenv("MOBA_SCALING_FAULT", "stop_after_step:3")
    with pytest.raises(T.InjectedFault):
        T.train(cfg)
    monkeypatch.delenv("MOBA_SCALING_FAULT")
    out = Path(cfg.train.out_dir)
    state = C.load_file(out / C.CKPT)
    state["rng"]["numpy"], state["rng"]["python"] = np.random.get_state(), random.getstate()  # the old form
    C.save_checkpoint(out, state)
    with pytest.raises(C.UntrustedCheckpointError):
        T.train(cfg)
    T.train(cfg, trust_checkpoint=True)
    assert (out / "DONE").exists()
