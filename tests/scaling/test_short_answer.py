"""Short-answer tasks (issue 16): the needle generators, example-aligned answer-only training
windows (and the trainer's --mix PATH.npz path), binomial CIs, budget.json and the chart."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from scaling_runs import eval_budget as E
from scaling_runs import tasks as T
from scaling_runs.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from scaling_runs.model import GPT
from scaling_runs.train import save_checkpoint, task_step_at, train
from tests._helpers import make_text_corpus

# ---------------------------------------------------------------------------------------
# generators


@pytest.mark.parametrize("length", [3, 10, 66, 258])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_answer_is_the_only_digit(length, depth):
    for i in range(5):
        ex = T.needle(length, depth, seed=2, index=i)
        assert len(ex.prompt_bytes) == length and ex.prompt.endswith("?")
        digits = [c for c in ex.prompt if c.isdigit()]
        assert digits == [ex.answer] and ex.answer in T.DIGITS and ex.target == ex.answer
        assert ex.prompt[ex.meta["needle_offset"]] == ex.answer
        assert ex.meta["needle_offset"] == round(depth * (length - 2))
        filler = ex.prompt[: ex.meta["needle_offset"]] + ex.prompt[ex.meta["needle_offset"] + 1 : -1]
        assert len(filler) == length - 2 and set(filler) <= set(T.NEEDLE_ALPHABET)
    assert T.needle(64, 0.5, seed=1).prompt == T.needle(64, 0.5, seed=1).prompt
    assert T.needle(64, 0.5, seed=1).prompt != T.needle(64, 0.5, seed=1, index=1).prompt


@pytest.mark.parametrize("n_needles", [1, 3, 8])
def test_multineedle_answer_follows_the_queried_key(n_needles):
    for i in range(10):
        ex = T.multineedle(80, 0.5, seed=3, index=i, n_needles=n_needles)
        assert len(ex.prompt_bytes) == 80 and ex.prompt[-2] == "?"
        key, hay = ex.prompt[-1], ex.prompt[:-2]
        assert key == ex.meta["query_key"] and hay.count(key) == 1
        assert hay[hay.index(key) + 1] == ex.answer
        assert sum(c.isdigit() for c in hay) == n_needles and sum(c.isupper() for c in hay) == n_needles
        for k in ex.meta["keys"]:  # every key is followed by its digit
            assert hay[hay.index(k) + 1].isdigit()


def test_short_task_bad_inputs_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="alphabet"):
        T.needle(20, 0.5, alphabet="ab1")
    with pytest.raises(ValueError, match="context_length"):
        T.needle(2, 0.5)
    with pytest.raises(ValueError, match="too short"):
        T.multineedle(12, 0.5, n_needles=4)
    with pytest.raises(ValueError, match="n_needles"):
        T.multineedle(200, 0.5, n_needles=0)
    assert T.n_filler_to_length("needle", 254) == 256 and T.n_filler_to_length("multineedle", 10, 3) == 18
    T.main([str(tmp_path / "d"), "--tasks", "needle", "--n_filler", "30", "--n", "50", "--alphabet", "xyz "])
    info = json.loads(capsys.readouterr().out)
    ex = T.ExampleSet.load(tmp_path / "d" / T.EXAMPLES_FILE)
    assert info["examples"] == len(ex) == 50 and info["context_length"] == 32 and ex.tokens.size == 50 * 33
    assert set(ex.tokens.tobytes().decode()) <= set("xyz ?" + T.DIGITS)
    T.main([str(tmp_path / "m.npz"), "--tasks", "multineedle", "--lengths", "40", "--n", "5", "--n_needles", "2"])
    assert T.ExampleSet.load(tmp_path / "m.npz").info["options"] == {"alphabet": T.NEEDLE_ALPHABET, "n_needles": 2}
    with pytest.raises(SystemExit):
        T.main([str(tmp_path / "x"), "--tasks", "needle,passkey"])


# ---------------------------------------------------------------------------------------
# example-aligned windows, answer-only loss


def test_example_batch_windows_start_at_examples_and_mask_all_but_answers():
    examples = T.sample_examples("multineedle", 40, 30, seed=5, n_needles=2)
    ex = T.ExampleSet.from_examples(examples)
    mask = ex.answer_mask()
    assert mask.sum() == 40 and all(mask[a] for a in ex.answer_start)
    starts = {int(s) for s in ex.starts}
    for context in (30, 20, 50):  # x + y = exactly one example (30 + 1 bytes), shorter, longer (runs into the next one)
        x, y = T.example_batch(ex, context, 8, seed=1, step=3)
        assert x.shape == y.shape == (8, context) and x.dtype == y.dtype == torch.int64
        stream = ex.tokens.tobytes()
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            start = stream.find(bytes(row_x[: min(context, 30)]))
            assert start in starts  # the window begins at an example's first byte
            for j, t in enumerate(row_y):
                pos = (start + 1 + j) % len(stream)
                assert (t != T.IGNORE_INDEX) == bool(mask[pos])
                if t != T.IGNORE_INDEX:
                    assert t == stream[pos] and chr(t).isdigit()
        if context == 30:  # one example per window: the only target is its answer, the last one
            assert (y[:, :-1] == T.IGNORE_INDEX).all() and (y[:, -1] != T.IGNORE_INDEX).all()
    a, b = T.example_batch(ex, 31, 8, 1, 3), T.example_batch(ex, 31, 8, 1, 3, start=2, stop=5)
    assert torch.equal(a[0][2:5], b[0]) and not torch.equal(a[0], T.example_batch(ex, 31, 8, 1, 4)[0])


def test_answer_only_loss_is_the_cross_entropy_of_the_answer_bytes():
    ex = T.ExampleSet.from_examples(T.sample_examples("needle", 6, 32, seed=0))
    x, y = T.example_batch(ex, 32, 6, seed=0, step=0)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, context=32, block_size=8, top_k=2))
    logits = model(x)
    want = torch.nn.functional.cross_entropy(logits[:, -1].float(), y[:, -1])
    assert model(x, y).item() == pytest.approx(want.item(), rel=1e-6)
    # changing any non-answer target byte cannot change the loss: they are ignored
    x2 = x.clone()
    x2[:, 0] = (x2[:, 0] + 1) % 256  # inputs do matter (sanity)
    assert model(x2, y).item() != pytest.approx(want.item(), rel=1e-9)


def test_trainer_mix_npz_trains_task_steps(tmp_path):
    corpus = make_text_corpus(tmp_path / "corpus", n_files=6, words=300)
    npz = tmp_path / "tasks" / "train.npz"
    T.write_examples(npz, "needle", 64, 64, seed=1000)
    steps = [task_step_at(1, s, 0.5) for s in range(200)]
    assert 70 < sum(steps) < 130 and steps == [task_step_at(1, s, 0.5) for s in range(200)]
    assert not any(task_step_at(1, s, 0.0) for s in range(50))
    cfg = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, context=64, block_size=16,
                                      top_k=2),
                    data=DataConfig(data=str(corpus), val_fraction=0.3, mix=str(npz), mix_fraction=0.5),
                    train=TrainConfig(out_dir=str(tmp_path / "run"), batch_size=4, max_steps=4, eval_every=4,
                                      eval_seqs=2, warmup_steps=1, progress=False, seed=1))
    short = RunConfig(model=dataclasses.replace(cfg.model, context=32), data=cfg.data,
                      train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "short")))
    with pytest.raises(ValueError, match="context must be >= 64"):
        train(short)
    last = train(cfg)
    assert math.isfinite(last["train_loss"]) and (tmp_path / "run" / "DONE").exists()
    mix = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["mix"]
    assert mix["format"] == "examples" and mix["answer_only_loss"] and mix["examples"] == 64
    assert mix["task"]["task"] == "needle" and mix["examples_hash"] == T.ExampleSet.load(npz).data_hash()
    # other examples under the same path: the resume is refused (data_hash), not silently mixed
    T.write_examples(npz, "needle", 64, 64, seed=1001)
    (tmp_path / "run" / "DONE").unlink()  # an unfinished run being resumed
    with pytest.raises(Exception, match="data_hash"):
        train(cfg)


# ---------------------------------------------------------------------------------------
# CIs, the sweep, budget.json and the chart


def test_binomial_ci_hand_cases():
    lo, hi = E.binomial_ci(0, 10)  # Wilson, z = 1.96: upper = z^2 / (n + z^2)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(1.96**2 / (10 + 1.96**2), rel=1e-3)
    lo, hi = E.binomial_ci(5, 10)  # symmetric around 0.5: 0.5 -+ 0.2366
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-3)
    lo, hi = E.binomial_ci(10, 10, method="exact")  # Clopper-Pearson: 0.025^(1/10)
    assert lo == pytest.approx(0.025 ** 0.1, rel=1e-6) and hi == 1.0
    lo, hi = E.binomial_ci(100, 200)
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 200), rel=0.02)
    for bad in [(1, 0), (3, 2), (-1, 5), (1.5, 3)]:
        with pytest.raises(ValueError):
            E.binomial_ci(*bad)
    with pytest.raises(ValueError, match="method"):
        E.binomial_ci(1, 2, method="wald")


def _fake_entry(name, attention, accs, n=200):
    budgets = [16, 32, 64, 128, 1024][: len(accs)]
    correct = [round(a * n) for a in accs]
    return {"task": "needle", "model": name, "trained_attention": attention, "budgets": budgets,
            "accuracy": [c / n for c in correct], "ci95": [list(E.binomial_ci(c, n)) for c in correct],
            "n": [n] * len(budgets)}


def test_budget_json_and_chart_from_a_fake_sweep(tmp_path):
    entries = [_fake_entry("MoBA-trained", "moba", [0.1, 0.4, 0.7, 0.9, 1.0]),
               _fake_entry("Full-attention-trained", "full", [0.15, 0.45, 0.75, 0.95, 1.0])]
    path = E.write_budget_json(entries, tmp_path / "r" / "budget.json")
    saved = json.loads(path.read_text())
    assert [e["model"] for e in saved] == ["MoBA-trained", "Full-attention-trained"]
    for e in saved:
        assert {"task", "model", "budgets", "accuracy", "ci95", "n"} <= set(e)
        assert all(lo <= a <= hi for a, (lo, hi) in zip(e["accuracy"], e["ci95"], strict=True))
    png = E.plot_budget_chart(entries, tmp_path / "r" / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [E._budget_tick(b) for b in (16, 512, 1024, 2048)] == ["16", "512", "1K", "2K"]


def test_empty_sweep_is_an_error(tmp_path):
    for bad in ([], [_fake_entry("m", "moba", [])]):
        with pytest.raises(ValueError, match="empty sweep"):
            E.write_budget_json(bad, tmp_path / "b.json")
        with pytest.raises(ValueError, match="empty sweep"):
            E.plot_budget_chart(bad, tmp_path / "b.png")
    broken = _fake_entry("m", "moba", [0.5, 0.6])
    broken["n"] = [200]
    with pytest.raises(ValueError, match="n has 1 values"):
        E.write_budget_json([broken], tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "b.png").exists()


def test_short_answer_sweep_on_a_tiny_checkpoint(tmp_path):
    cfg = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, context=64, block_size=16,
                                      attention="full"),
                    train=TrainConfig(out_dir=str(tmp_path / "run")))
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, {"model": GPT(cfg.model).state_dict(), "step": 0, "config": cfg.to_dict()}, 0)
    rec = E.short_answer_sweep(run, "needle", n=20, budgets=[16, 32], progress=False)
    assert rec["budgets"] == [16, 32, 64] and rec["n"] == [20] * 3 and rec["trained_attention"] == "full"
    assert [s["mode"] for s in rec["settings"]] == ["moba", "moba", "full"]
    assert [s["top_k"] for s in rec["settings"][:2]] == [1, 2]
    assert all(0 <= c <= 20 and a == c / 20 for c, a in zip(rec["correct"], rec["accuracy"], strict=True))
    with pytest.raises(ValueError, match="multiples of block_size"):
        E.short_answer_sweep(run, "needle", n=4, budgets=[24], progress=False)
