"""bench/generate_speed.py: the CPU smoke run end to end, its JSON, and its roofline points."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from bench import generate_speed, roofline  # noqa: E402  (after the importorskips)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    generate_speed.main(["--cpu", "--draft-noise", "0.05", "--gamma", "3", "--threads", "1", "--out", str(out)])
    return out


def test_cpu_run_writes_json(run_dir, capsys):
    data = json.loads((run_dir / "generate_speed.json").read_text())
    meta = data["metadata"]
    for key in ("device", "device_name", "torch", "transformers", "date", "git_commit", "config", "note"):
        assert key in meta
    assert meta["device"] == "cpu" and "say nothing about GPU" in meta["note"]
    assert meta["config"]["gamma"] == 3 and meta["config"]["draft_noise"] == 0.05
    assert set(data["modes"]) == {"plain", "speculative", "staged"}
    for mode, r in data["modes"].items():
        assert r["tokens_per_second"] > 0 and r["seconds"] > 0
        assert r["new_tokens"] == meta["config"]["new_tokens"]
        assert 0.0 <= r["acceptance_rate"] <= 1.0
        assert 0.0 <= r["mean_accepted_length"] <= 3
        assert r["matches_plain"], mode  # greedy speculative output is plain's, token for token
    plain, spec = data["modes"]["plain"], data["modes"]["speculative"]
    assert plain["acceptance_rate"] == 0 and plain["target_forwards"] == plain["new_tokens"]
    # a noisy copy of the target as draft: most drafts accepted, fewer target forwards
    assert spec["acceptance_rate"] > 0.2 and spec["target_forwards"] < plain["target_forwards"]
    assert spec["draft_forwards"] > 0 and data["modes"]["staged"]["draft_forwards"] > 0


def test_points_feed_roofline(run_dir):
    points = json.loads((run_dir / "points.json").read_text())["points"]
    assert [p["name"].split()[1] for p in points] == ["plain", "speculative", "staged"]
    for p in points:
        assert p["flops"] > 0 and p["bytes"] > 0 and p["seconds"] > 0
    # verifying gamma + 1 tokens per target forward raises the FLOPs per weight byte
    assert points[1]["flops"] / points[1]["bytes"] > points[0]["flops"] / points[0]["bytes"]
    png = run_dir / "roofline.png"
    res = roofline.main([str(run_dir / "points.json"), "--out", str(png), "--no-model",
                         "--peak-tflops", "0.1", "--peak-bw-tbs", "0.01"])
    assert png.exists() and png.stat().st_size > 1000
    names = [p["name"] for p in res["points"]]
    assert names == [p["name"] for p in points]
    assert all(p["achieved_flops_per_s"] for p in res["points"])


def test_gpt_adapter_drives_generate(tmp_path):
    """moba.generate.adapters: a scaling_runs GPT checkpoint decoded plain / speculative / staged."""
    import copy
    import dataclasses

    import torch

    from moba.generate import GPTAdapter, NGramDraft, generate_plain, generate_speculative
    from scaling_runs.checkpoint import load_gpt
    from scaling_runs.config import ModelConfig
    from scaling_runs.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=32, context=32, vocab_size=64, block_size=8, top_k=2)
    gpt = GPT(cfg).eval()
    torch.save({"model": gpt.state_dict(), "config": {"model": dataclasses.asdict(cfg)}, "step": 0},
               tmp_path / "ckpt.pt")
    target = load_gpt(tmp_path / "ckpt.pt")
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    plain = generate_plain(target, ids, 16)
    ref = ids
    with torch.no_grad():
        for _ in range(16):  # the GPT run over the whole sequence, no cache
            ref = torch.cat([ref, gpt(ref)[:, -1:].argmax(-1)], 1)
    assert torch.equal(plain, ref)
    draft = GPTAdapter(copy.deepcopy(gpt))
    out, st = generate_speculative(target, draft, ids, 16, gamma=3)
    assert torch.equal(out, plain) and st.acceptance_rate == 1.0 and st.target_forwards < 16
    out, st2 = generate_speculative(target, draft, ids, 16, gamma=3, draft_drafter=NGramDraft([ids[0]]))
    assert torch.equal(out, plain)
    p = generate_speed.roofline_point("gpt speculative", st, target, draft)
    assert p["flops"] > 0 and p["bytes"] > 0


def test_checkpoint_mode_uses_held_out_prompts_and_training_ngrams(tmp_path):
    """--target-run / --draft-run: two scaling_runs checkpoints, prompts from the held-out
    split, the staged n-gram table from the training split; greedy outputs equal plain."""
    import dataclasses
    import json

    import torch

    from scaling_runs.config import DataConfig, ModelConfig
    from scaling_runs.model import GPT

    text = tmp_path / "text"
    text.mkdir()
    for i in range(6):  # a single repeated sentence: the n-gram table predicts it well
        (text / f"f{i}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    data = dataclasses.asdict(DataConfig(data=str(text), val_fraction=0.3))
    for name, layers, seed in (("target", 2, 0), ("draft", 1, 1)):
        torch.manual_seed(seed)
        cfg = ModelConfig(n_layer=layers, n_head=2, n_kv_head=1, n_embd=32, context=64, vocab_size=256,
                          block_size=8, top_k=2)
        (tmp_path / name).mkdir()
        torch.save({"model": GPT(cfg).state_dict(), "step": 0,
                    "config": {"model": dataclasses.asdict(cfg), "data": data}}, tmp_path / name / "ckpt.pt")
    res = generate_speed.main(["--target-run", str(tmp_path / "target" / "ckpt.pt"), "--draft-run",
                   str(tmp_path / "draft" / "ckpt.pt"), "--prompt-len", "24", "--new-tokens", "8", "--prompts", "3",
                   "--repeats", "1", "--gamma", "3", "--device", "cpu", "--dtype", "float32",
                   "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "generate_speed.json").read_text())
    assert saved["metadata"]["config"]["ngram_corpus"] == "train"
    assert saved["metadata"]["config"]["block_size"] == 8  # reported as the run was trained
    for mode in ("speculative", "staged", "tree"):  # tree: checkpoints support tree verification
        assert res["modes"][mode]["matches_plain"] is True
    plain = res["modes"]["plain"]
    assert plain["new_tokens"] == 3 * 8 and plain["prefill_tokens"] == 3 * 23  # summed over the 3 prompts
    assert res["modes"]["staged"]["inner_proposed"] > 0
