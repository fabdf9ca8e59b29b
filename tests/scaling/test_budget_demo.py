"""The inference-budget demo (scaling_runs.budget_demo) end to end on a tiny config: task data,
training with the task data mixed in, the budget sweep, resume (a second call trains nothing)."""

from __future__ import annotations

import json

import pytest

from scaling_runs import budget_demo as D
from tests._helpers import make_text_corpus

TINY = {"n_layer": "1", "n_head": "2", "n_kv_head": "1", "n_embd": "32", "context": "128", "block_size": "16",
        "top_k": "2", "batch_size": "4", "max_tokens": "0", "max_steps": "3", "warmup_steps": "1",
        "eval_every": "3", "eval_seqs": "2"}
FILLER = "Here we go, there and back again. The grass is green and the sky is blue.\n" * 4


def test_budget_demo_end_to_end(tmp_path, capsys):
    corpus = make_text_corpus(tmp_path / "corpus", n_files=6, words=400)
    out = tmp_path / "demo"
    opts = dict(n_tasks="24", task_lengths="128", budgets="16,32,64,128", lengths="128", depths="0,1",
                n_per_cell="1", loss_seqs="2")
    summary = D.run_demo(out, None, {**TINY, "data": str(corpus), "val_fraction": "0.3"}, FILLER,
                         progress=False, **opts)

    run = out / "moba-mix"
    assert (run / "DONE").exists() and (run / "ckpt.pt").exists()
    saved = json.loads((run / "config.json").read_text())
    mix = saved["data"]["mix"]  # config.json's "data" is the loaded data's description
    assert mix["source"] == str(out / "tasks") and mix["fraction"] == 0.5 and mix["tokens"] > 0
    assert saved["model"]["attention"] == "moba" and saved["model"]["block_size"] == 16
    assert json.loads((out / "tasks.json").read_text())["examples"] == 24
    assert any(p.read_text() for p in (out / "tasks").glob("tasks_*.txt"))

    sweep = out / "budget_sweep"
    rec = json.loads((sweep / "budget_sweep.json").read_text())
    assert [r["budget"] for r in rec["results"]] == [16, 32, 64, 128, None]
    assert [r["name"] for r in rec["results"]] == ["16", "32", "64", "128", "dense"]
    assert rec["trained"]["block_size"] == 16 and rec["settings"]["n_examples"] == 3 * 2
    for name in ("performance_vs_budget.png", "answer_loss_vs_budget.png", "accuracy_heatmap.png",
                 "loss_by_position.png"):
        assert (sweep / name).stat().st_size > 0, name
    assert summary["plots"] and set(summary["results"]) == {"16", "32", "64", "128", "dense"}
    assert json.loads((out / "demo.json").read_text())["json"] == str(sweep / "budget_sweep.json")
    printed = capsys.readouterr().out
    assert "sweep json:" in printed and "performance_vs_budget.png" in printed

    # resumable: the second call reuses the task data and skips training (DONE)
    mtime = (run / "ckpt.pt").stat().st_mtime_ns
    D.run_demo(out, None, {**TINY, "data": str(corpus), "val_fraction": "0.3"}, FILLER, progress=False, **opts)
    assert (run / "ckpt.pt").stat().st_mtime_ns == mtime
    assert "already DONE" in capsys.readouterr().out


def test_reuse_skips_training(tmp_path):
    corpus = make_text_corpus(tmp_path / "corpus", n_files=6, words=400)
    first = D.run_demo(tmp_path / "a", None, {**TINY, "data": str(corpus), "val_fraction": "0.3"}, FILLER,
                       progress=False, n_tasks="12", task_lengths="128", budgets="16,128", lengths="128",
                       depths="0.5", n_per_cell="1", loss_seqs="1")
    fill = tmp_path / "filler.txt"
    fill.write_text(FILLER)
    second = D.main(["--out", str(tmp_path / "b"), "--reuse", first["run_dir"], "--filler", str(fill),
                     "--n_tasks", "6", "--task_lengths", "128", "--budgets", "16,128", "--lengths", "128",
                     "--depths", "0.5", "--n_per_cell", "1", "--loss_seqs", "1"])
    assert second["reused"] and not (tmp_path / "b" / "moba-mix").exists()
    assert [r["budget"] for r in json.loads(open(second["json"]).read())["results"]] == [16, 128, None]


def test_needle_preset_end_to_end(tmp_path, capsys):
    corpus = make_text_corpus(tmp_path / "corpus", n_files=6, words=300)
    out = tmp_path / "needle"
    tiny = {"n_layer": "1", "n_embd": "32", "batch_size": "4", "max_steps": "3", "eval_every": "3",
            "eval_seqs": "2", "warmup_steps": "1", "data": str(corpus), "val_fraction": "0.3"}
    summary = D.main(["--preset", "needle", "--out", str(out), "--n_filler", "62", "--n_train", "40",
                      "--n_eval", "12", "--budgets", "16,32", "--progress", "false",
                      *[x for k, v in tiny.items() for x in (f"--{k}", v)]])
    saved = json.loads((out / "budget.json").read_text())
    assert [e["model"] for e in saved] == ["MoBA-trained", "Full-attention-trained"]
    assert [e["trained_attention"] for e in saved] == ["moba", "full"]
    for e in saved:
        assert e["task"] == "needle" and e["budgets"] == [16, 32, 64] and e["n"] == [12] * 3
        assert len(e["ci95"]) == 3 and e["train_vs_eval_full"]["train_n"] == 12
    assert (out / "performance_vs_budget.png").stat().st_size > 0
    assert json.loads((out / "moba" / "config.json").read_text())["model"]["context"] == 64
    assert summary["task"]["distinct_prompts"] == 40 and (out / "demo.json").exists()
    assert "Full-attention-trained" in capsys.readouterr().out
    with pytest.raises(ValueError, match="arms"):
        D.run_needle_demo(out, arms="moba,local")
