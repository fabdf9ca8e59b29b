"""Inference budget sweep (scaling_runs.eval_budget): budget parsing, the budget changes the
keys each query attends to (through moba.select_blocks), and an end-to-end sweep of a tiny
random-weight checkpoint saved the way scaling_runs.train saves it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from moba import PAD_INDEX, select_blocks
from scaling_runs import eval_budget as E
from scaling_runs import tasks as T
from scaling_runs.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from scaling_runs.model import GPT
from scaling_runs.train import save_checkpoint
from tests._helpers import make_text_corpus


def test_parse_sizes_pairs_and_settings():
    assert [E.parse_size(s) for s in ("512", "1k", "2K", "8k", "1m")] == [512, 1024, 2048, 8192, 2**20]
    assert E.fmt_size(8192) == "8k" and E.fmt_size(96) == "96"
    assert E.parse_pairs("64/3, 64/6,1k/3") == [(3, 64), (6, 64), (3, 1024)]
    for bad in ("64/0", "3x64"):  # the old TOPKxBLOCK form is refused: 64x3 once ran top_k=64, block 3
        with pytest.raises(ValueError):
            E.parse_pairs(bad)
    auto = E.budget_settings(512, max_context=8192)
    assert [s["budget"] for s in auto] == [512, 1024, 2048, 4096, 8192]
    assert [s["top_k"] for s in auto] == [1, 2, 4, 8, 16] and {s["block_size"] for s in auto} == {512}
    given = E.budget_settings(32, budgets=[64, 128, 100])
    assert [(s["top_k"], s["block_size"]) for s in given] == [(2, 32), (4, 32), (3, 32)]
    pairs = E.budget_settings(32, pairs=[(3, 64), (6, 32)])
    assert [(s["name"], s["budget"]) for s in pairs] == [("64/3", 192), ("32/6", 192)]


def test_budget_changes_attended_keys():
    torch.manual_seed(0)
    s, bs = 256, 32
    q, k = torch.randn(2, s, 4, 16), torch.randn(2, s, 2, 16)
    prev_blocks, prev_keys = 0.0, 0.0
    for budget in (32, 64, 128, 256):
        top_k = budget // bs
        idx = select_blocks(q, k, bs, top_k)
        n_blocks = (idx != PAD_INDEX).sum(-1).float()
        keys = E.attended_keys(q, k, bs, top_k)
        # every query: min(top_k, blocks up to its own) blocks; keys never above the budget
        own = torch.arange(s) // bs + 1
        assert torch.equal(n_blocks, torch.minimum(own, torch.tensor(top_k)).float()[None, :, None].expand_as(n_blocks))
        assert float(keys.max()) <= budget
        assert n_blocks.mean() > prev_blocks and keys.mean() > prev_keys
        prev_blocks, prev_keys = float(n_blocks.mean()), float(keys.mean())
    # the full budget attends to every causal key: (s + 1) / 2 on average
    assert prev_keys == pytest.approx((s + 1) / 2)


def _tiny_checkpoint(tmp_path):
    corpus = make_text_corpus(tmp_path / "corpus", n_files=6, words=300)
    cfg = RunConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, context=128, block_size=16, top_k=2),
        data=DataConfig(data=str(corpus), val_fraction=0.3),
        train=TrainConfig(out_dir=str(tmp_path / "run")),
    )
    torch.manual_seed(0)
    model = GPT(cfg.model)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, {"model": model.state_dict(), "step": 0, "config": cfg.to_dict()}, 0)
    return run, model


def test_sweep_end_to_end(tmp_path):
    run, model = _tiny_checkpoint(tmp_path)
    filler = T.Filler("Here we go, there and back again. The grass is green.\n" * 4, name="tiny")
    rec = E.run_sweep(run, out=tmp_path / "out", lengths=[128, 160], depths=[0.0, 1.0], n_per_cell=1,
                      loss_seqs=2, filler=filler, progress=False)
    out = tmp_path / "out"
    for name in ("budget_sweep.json", "performance_vs_budget.png", "answer_loss_vs_budget.png",
                 "accuracy_heatmap.png", "loss_by_position.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "budget_sweep.json").read_text())
    assert saved["settings"]["n_examples"] == rec["settings"]["n_examples"] == 3 * 2 * 2
    rows = saved["results"]
    assert [r["name"] for r in rows] == ["16", "32", "64", "128", "256", "dense"]
    assert [r["top_k"] for r in rows[:-1]] == [1, 2, 4, 8, 16]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["examples"]) == 12
        assert r["answer_nll"] > 0 and set(r["answer_nll_by_task"]) == set(T.TASKS)
        assert {"val_loss", "trailing_loss", "loss_by_bucket", "loss_by_position"} <= set(r)
        assert {(c["context_length"], c["depth"]) for c in r["by_length_depth"]} == {
            (L, d) for L in (128, 160) for d in (0.0, 1.0)}
    keys = [r["attended_keys_per_query"]["mean"] for r in rows[:-1]]
    assert all(a < b for a, b in zip(keys[:3], keys[1:4], strict=True))
    assert keys[0] <= 16 and rows[-1]["attended_keys_per_query"]["mean"] == pytest.approx(129 / 2)
    # a budget covering the whole window is dense attention: same loss
    assert rows[3]["val_loss"] == pytest.approx(rows[-1]["val_loss"], abs=1e-4)
    assert rows[0]["val_loss"] != pytest.approx(rows[-1]["val_loss"], abs=1e-6)
    # the model's own settings are restored afterwards
    m2, _, _ = E.load_model(run / "ckpt.pt")
    assert [(c.mode, c.top_k, c.block_size) for c in E.attention_modules(m2)] == [("moba", 2, 16)] * 2


def test_cli_pairs(tmp_path, capsys):
    run, _ = _tiny_checkpoint(tmp_path)
    fill = tmp_path / "filler.txt"
    fill.write_text("The sky is blue and the sun is warm.\n" * 10)
    E.main([str(run / "ckpt.pt"), "--pairs", "16/2,64/1", "--lengths", "128", "--depths", "0.5",
            "--tasks", "passkey,mqar", "--n_per_cell", "1", "--loss_seqs", "1", "--filler", str(fill),
            "--out", str(tmp_path / "cli"), "--no_plots"])
    rec = json.loads((tmp_path / "cli" / "budget_sweep.json").read_text())
    assert [(r["name"], r["budget"]) for r in rec["results"]] == [("16/2", 32), ("64/1", 64), ("dense", None)]
    assert not (tmp_path / "cli" / "performance_vs_budget.png").exists()
    assert '"16/2"' in capsys.readouterr().out


def test_answer_nll_matches_full_forward(tmp_path):
    run, model = _tiny_checkpoint(tmp_path)
    prompts, targets = [b"abc def ghi", b"xyz uvw rst", b"0123"], [b" 42", b" 17", b"9"]
    got = E.answer_nll(model, prompts, targets, batch=2)
    for p, t, v in zip(prompts, targets, got, strict=True):
        seq = torch.tensor([list(p + t)])
        with torch.no_grad():
            loss = model(seq[:, :-1], seq[:, 1:], reduction="none")[0, len(p) - 1 :]
        assert v == pytest.approx(float(loss.mean()), rel=1e-5)


def test_budgets_beyond_the_context_warn_that_they_are_dense():
    with pytest.warns(UserWarning, match="budgets 4k exceed the longest evaluated context"):
        settings = E.budget_settings(64, budgets=[128, 4096], max_context=1024)
    assert [s["budget"] for s in settings] == [128, 4096]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E.budget_settings(64, max_context=1024)  # automatic budgets stop at the context: silent
        E.budget_settings(64, budgets=[128, 1024], max_context=1024)
