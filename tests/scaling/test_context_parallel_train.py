"""scaling_runs.train --context_parallel: a dp 2 x cp 2 run on 4 gloo processes (torchrun), killed
after a checkpoint and resumed, gives the losses of the same run in one process; bad settings give
a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._helpers import ROOT, metrics, tiny_config
from tests._subprocess import run_child


def _launch(cfg, nproc: int, fault: str | None = None) -> subprocess.CompletedProcess:
    path = Path(cfg.train.out_dir + ".json")
    path.write_text(json.dumps(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MOBA_SCALING_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["MOBA_SCALING_FAULT"] = fault  # exit_after_step:N: every rank exits abruptly (os._exit)
    head = [sys.executable, "-m"]
    if nproc > 1:
        head += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    return run_child(head + ["scaling_runs.train", "--config", str(path)], cwd=ROOT, env=env)


@pytest.mark.slow
def test_dp2_cp2_matches_one_process_and_resumes(tmp_path):
    from scaling_runs.train import train

    one = tiny_config(tmp_path, "one", max_steps=4, eval_every=2)
    four = tiny_config(tmp_path, "cp", max_steps=4, eval_every=2, context_parallel=2)
    train(one)
    cut = _launch(four, nproc=4, fault="exit_after_step:2")  # after the step-2 checkpoint
    assert cut.returncode != 0 and not (Path(four.train.out_dir) / "DONE").exists(), cut.stdout + cut.stderr
    assert [r["step"] for r in metrics(four)] == [2]
    p = _launch(four, nproc=4)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((Path(four.train.out_dir) / "config.json").read_text())["device"]["world_size"] == 4
    for ra, rb in zip(metrics(one), metrics(four), strict=True):
        assert ra["step"] == rb["step"] and ra["tokens"] == rb["tokens"]
        for key in ("train_loss", "val_loss", "trailing_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (key, ra, rb)


def test_context_parallel_must_divide_the_world(tmp_path):
    from scaling_runs.context_parallel import build_mesh

    with pytest.raises(ValueError, match="must divide the number of processes"):
        build_mesh(3, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="context_parallel must be an int >= 1"):
        build_mesh(4, 0, torch.device("cpu"))
