"""The cpu-study preset's pieces (issue 16): the random-block arm, the recall corpus, the fits
with bootstrap CIs, the summary schema, the trailing-loss window. Cheap (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moba
from scaling_runs import study
from scaling_runs.config import ModelConfig, RunConfig, TrainConfig
from scaling_runs.fit import mean_ci, paired_ratio, plot_study, power_law_ci, study_summary
from scaling_runs.flops import causal_sparsity, flops_per_token
from scaling_runs.model import GPT, RandomBlockAttention, random_block_indices
from scaling_runs.presets import ARMS, get_study
from scaling_runs.tasks import RECALL_CUE_BASE, RECALL_MEMBER_BASE, Filler, RecallSpec, recall_documents
from tests._helpers import ROOT


@pytest.mark.parametrize("seqlen,block,top_k", [(200, 32, 3), (512, 32, 3), (64, 16, 1), (40, 8, 6)])
def test_random_blocks_are_own_plus_distinct_past_blocks(seqlen, block, top_k):
    torch.manual_seed(0)
    idx = random_block_indices(3, seqlen, 2, block, top_k)
    n_blocks = -(-seqlen // block)
    assert idx.shape == (3, seqlen, 2, min(top_k, n_blocks)) and idx.dtype == torch.int64
    own = (torch.arange(seqlen) // block)[None, :, None]
    valid = idx != moba.PAD_INDEX
    # exactly min(top_k, own + 1) blocks: the own block and only past blocks, no repeats
    assert torch.equal(valid.sum(-1), torch.minimum(own + 1, torch.tensor(top_k)).expand(3, seqlen, 2))
    assert bool(((idx == own[..., None]) & valid).any(-1).all())
    assert bool((torch.where(valid, idx, -1) <= own[..., None]).all())
    assert bool((valid[..., 1:] <= valid[..., :-1]).all())  # padding only at the end
    both = valid[..., 1:] & valid[..., :-1]
    assert bool(torch.where(both, idx[..., 1:] > idx[..., :-1], True).all())  # ascending, distinct


def test_random_blocks_are_random_and_cover_the_past():
    torch.manual_seed(1)
    idx = random_block_indices(1, 512, 1, 32, 3)[0, -1, 0]  # last query: 15 past blocks
    draws = {tuple(random_block_indices(1, 512, 1, 32, 3)[0, -1, 0].tolist()) for _ in range(50)}
    assert len(draws) > 10 and idx[-1] == 15
    seen = torch.cat([random_block_indices(64, 512, 1, 32, 3)[:, -1, 0, :2].reshape(-1)]).unique()
    assert seen.tolist() == list(range(15))  # every past block gets drawn


def test_random_arm_attends_through_moba_with_those_blocks():
    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=2, context=96, block_size=16, top_k=3,
                      block_selection="random")
    core = GPT(cfg).blocks[0].attn.attn
    assert isinstance(core, RandomBlockAttention)
    q, k, v = (torch.randn(2, 96, 2, 16) for _ in range(3))
    torch.manual_seed(5)
    out = core(q, k, v)
    torch.manual_seed(5)
    idx = random_block_indices(2, 96, 2, 16, 3)
    ref = moba.moba_attn_func(q, k, v, 16, 3, backend="reference", block_indices=idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gated = moba.moba_attn_func(q, k, v, 16, 3, backend="torch")
    assert not torch.allclose(out, gated)  # not the gate's selection
    with pytest.raises(ValueError, match="block_selection"):
        ModelConfig(block_selection="gated")


def test_flops_and_sparsity_of_the_arms():
    assert causal_sparsity(512, "moba", 32, 3) == pytest.approx(1 - 38144 / (512 * 513 / 2))
    assert causal_sparsity(512, "moba", 32, 3) == pytest.approx(0.7096, abs=1e-4)
    assert causal_sparsity(8192, "moba", 512, 3) == pytest.approx(0.7109, abs=1e-4)
    assert causal_sparsity(512, "full", 32, 3) == 0.0
    base = ModelConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, context=512, block_size=32, top_k=3)
    gate = flops_per_token(base, 1000)
    rand = flops_per_token(ModelConfig(**{**base.__dict__, "block_selection": "random"}), 1000)
    assert rand["attention"] == gate["attention"] and rand["gate"] == 0 < gate["gate"]


def test_recall_documents():
    spec = RecallSpec(doc_len=128, member_span=40, query_span=40, n_groups=4, group_size=3)
    fill = Filler("the quick brown fox jumps over the lazy dog " * 20)
    docs = recall_documents(5, spec, fill, seed=3)
    assert docs.dtype == np.uint8 and docs.size == 5 * 129
    assert np.array_equal(docs, recall_documents(5, spec, fill, seed=3))
    for doc in docs.reshape(5, 129):
        assert doc[-1] == 0
        members = doc[:40][doc[:40] >= RECALL_MEMBER_BASE]
        assert sorted((members - RECALL_MEMBER_BASE) // 3) == [0, 1, 2, 3]  # one per group
        cues = np.flatnonzero(doc >= RECALL_CUE_BASE)
        assert len(cues) == 4 and cues.min() >= 128 - 40
        for c in cues:  # the byte after a cue is that document's member of the cue's group
            g = doc[c] - RECALL_CUE_BASE
            assert doc[c + 1] in members and (doc[c + 1] - RECALL_MEMBER_BASE) // 3 == g
        assert not (doc[40 : 128 - 40] >= RECALL_MEMBER_BASE).any()
    rnd = recall_documents(4, RecallSpec(**{**spec.__dict__, "filler": "random", "plain_fraction": 0.5}), fill, 0)
    plain = [d for d in rnd.reshape(4, 129) if not (d >= RECALL_CUE_BASE).any()]
    assert 0 < len(plain) < 4  # some plain text documents, some recall documents
    with pytest.raises(ValueError, match="filler"):
        RecallSpec(filler="noise")


def _power_law_points(n_seeds, rng, b=-0.1, a=3.0, noise=0.01):
    cs = np.logspace(-9, -7, 5)
    return {f"s{i}": [(c, a * c**b * np.exp(noise * rng.standard_normal())) for _ in range(n_seeds)]
            for i, c in enumerate(cs)}


def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    few = power_law_ci(_power_law_points(3, rng), n_boot=500)
    many = power_law_ci(_power_law_points(40, rng), n_boot=500)
    for f in (few, many):
        assert f["b_ci95"][0] <= f["b"] <= f["b_ci95"][1]
        assert f["a_ci95"][0] <= f["a"] <= f["a_ci95"][1]
    assert many["b_ci95"][0] <= -0.1 <= many["b_ci95"][1]
    width = lambda f: f["b_ci95"][1] - f["b_ci95"][0]  # noqa: E731
    assert width(many) < 0.6 * width(few)
    with pytest.raises(ValueError, match="two compute values"):
        power_law_ci({"s1": [(1e-8, 2.0), (1e-8, 2.1)]})
    # one seed per size: nothing to resample, so no interval (not a zero-width one)
    single = power_law_ci(_power_law_points(1, rng), n_boot=200)
    assert single["b_ci95"] is None and single["a_ci95"] is None and single["b"] == pytest.approx(-0.1, abs=0.05)


def test_mean_ci_and_paired_ratio():
    m = mean_ci([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["n_seeds"] == 3 and m["ci95"][0] < 2.0 < m["ci95"][1]
    assert mean_ci([2.5]) == {"mean": 2.5, "ci95": None, "n_seeds": 1}
    ref = {("s1", s): 2.0 for s in range(6)}
    arm = {("s1", s): 2.0 * (1.01 + 0.002 * s) for s in range(6)}
    r = paired_ratio(arm, ref)
    assert r["n_pairs"] == 6 and r["ci95"][0] <= r["mean"] <= r["ci95"][1] and r["ci95"][0] > 1.0
    with pytest.raises(ValueError, match="pair"):
        paired_ratio({("s2", 0): 1.0}, ref)


def _synthetic_points():
    rng = np.random.default_rng(1)
    pts = []
    for i, size in enumerate(["s1", "s2", "s3"]):
        for arm, shift in (("full", 1.0), ("moba", 1.002), ("local", 1.05), ("random", 1.03)):
            for seed in range(3):
                c = 1e-9 * 4**i
                loss = shift * 3 * c**-0.05 * (1 + 0.003 * rng.standard_normal())
                pts.append({"size": size, "arm": arm, "seed": seed, "val_loss": loss, "trailing_loss": loss * 0.95,
                            "pflops_days": c, "attn_aware_pflops_days": c * (1.1 if arm == "full" else 1.03)})
    return pts


def test_summary_has_the_issue_schema(tmp_path):
    spars = {a: 0.7 for a in ARMS} | {"full": 0.0}
    summary, details = study_summary(_synthetic_points(), "s3", spars, n_boot=200)
    assert set(summary) == {"arms", "fits", "ratios"}
    assert set(summary["arms"]) == set(ARMS)
    for arm, s in summary["arms"].items():
        assert set(s) == {"final_val_loss", "final_trailing_loss", "sparsity"}
        for key in ("final_val_loss", "final_trailing_loss"):
            assert set(s[key]) == {"mean", "ci95", "n_seeds"} and s[key]["n_seeds"] == 3
        assert set(summary["fits"][arm]) == {"lm", "trailing"}
        for f in summary["fits"][arm].values():
            assert set(f) == {"a", "b", "a_ci95", "b_ci95"}
    assert set(summary["ratios"]) == {"moba/full", "local/full", "random/full"}
    for r in summary["ratios"].values():
        assert set(r) == {"mean", "ci95"}
    assert summary["ratios"]["local/full"]["ci95"][0] > 1.0
    assert set(details["fits"]) == {"pflops_days", "attn_aware_pflops_days"}
    json.dumps(summary)  # plain JSON
    paths = plot_study(_synthetic_points(), details, tmp_path, 512, 32)
    assert all(p.exists() and p.stat().st_size > 10_000 for p in paths)


def test_an_empty_study_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no finished runs"):
        study_summary([], "s1", {})
    with pytest.raises(ValueError, match="no finished runs"):
        plot_study([], {}, tmp_path, 512, 32)
    preset = get_study("cpu-study")
    runs = study.plan(preset, tmp_path, "stdlib")
    with pytest.raises(ValueError, match="no finished run"):
        study.summarize(preset, runs, tmp_path, {})
    assert not (tmp_path / "summary.json").exists()


def test_cpu_study_preset():
    preset = get_study("cpu-study")
    m = preset.base.model
    assert m.context // m.block_size == 16 and m.top_k == 3
    assert preset.base.train.trailing_frac * m.context == m.context / 16
    assert len(preset.sizes) >= 5 and len(preset.seeds) >= 3 and set(preset.arms) == set(ARMS)
    runs = preset.runs("stdlib")
    assert len(runs) == len(preset.sizes) * len(ARMS) * len(preset.seeds)
    for _, meta, cfg in runs:
        n = __import__("scaling_runs.model", fromlist=["x"]).analytic_param_counts(cfg.model)["non_embedding"]
        assert cfg.train.max_tokens == pytest.approx(preset.tpp * n, rel=0.15)  # whole steps
        assert cfg.train.seed == meta["seed"]
    arms = {meta["arm"]: cfg.model for _, meta, cfg in runs}
    assert arms["local"].top_k == 1 and arms["random"].block_selection == "random"
    assert arms["full"].attention == "full" and arms["moba"].block_selection == "gate"


def test_trailing_loss_is_the_last_sixteenth():
    """train.evaluate's trailing loss with the preset's trailing_frac averages exactly the last
    context / 16 positions (a model whose loss at position t is t)."""
    from scaling_runs import train as train_mod

    ctx = 64

    class PositionLoss(torch.nn.Module):
        def forward(self, x, y, reduction="mean"):
            return torch.arange(x.shape[1], dtype=torch.float32).expand(x.shape[0], -1).clone()

    preset = get_study("cpu-study")
    cfg = RunConfig(ModelConfig(context=ctx, block_size=4), train=TrainConfig(
        eval_seqs=4, trailing_frac=preset.base.train.trailing_frac, n_buckets=4))
    ev = train_mod.evaluate(PositionLoss(), np.zeros(1000, dtype=np.uint8), cfg, torch.device("cpu"),
                            __import__("contextlib").nullcontext, 0, 1, 4)
    assert ev["trailing_loss"] == pytest.approx(np.mean(np.arange(ctx - ctx // 16, ctx)))


def test_cli_help_and_dry_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        study.main(["--help"])
    assert e.value.code == 0
    assert "--jobs" in capsys.readouterr().out
    cfg_dir = tmp_path / "st"
    preset = get_study("cpu-study")
    preset.data = "stdlib"
    runs = study.plan(preset, cfg_dir, "stdlib")
    assert len({r["name"] for r in runs}) == len(runs)
    assert all(str(r["config"].train.out_dir).startswith(str(cfg_dir / "runs")) for r in runs)


def test_headline_is_the_largest_size_with_every_seed():
    pts = [{"size": s, "arm": a, "seed": k} for s in ("s1", "s2", "s3") for a in ("full", "moba") for k in range(3)]
    assert study.headline_size(pts, ["s1", "s2", "s3"]) == "s3"
    pts = [p for p in pts if not (p["size"] == "s3" and p["seed"] > 0)]
    assert study.headline_size(pts, ["s1", "s2", "s3"]) == "s2"


def test_committed_study_summary_has_the_schema():
    """The committed cpu-study results (issue 16, item 6): summary.json's schema, >= 3 seeds at the
    headline size, >= 5 sizes in every fit, and the plots next to it."""

    folder = ROOT / "scaling_runs" / "results" / "cpu-study-2026-12-03"
    summary = json.loads((folder / "summary.json").read_text())
    details = json.loads((folder / "study.json").read_text())
    assert set(summary) == {"arms", "fits", "ratios"} and set(summary["arms"]) == set(ARMS)
    for arm, s in summary["arms"].items():
        assert set(s) == {"final_val_loss", "final_trailing_loss", "sparsity"}
        assert s["final_val_loss"]["n_seeds"] >= 3 and len(s["final_val_loss"]["ci95"]) == 2
        assert set(summary["fits"][arm]) == {"lm", "trailing"}
        assert all(set(f) == {"a", "b", "a_ci95", "b_ci95"} for f in summary["fits"][arm].values())
        assert len({p["size"] for p in details["points"] if p["arm"] == arm}) >= 5
    assert set(summary["ratios"]) == {"moba/full", "local/full", "random/full"}
    assert summary["arms"]["moba"]["sparsity"] == pytest.approx(0.7096, abs=1e-4)
    assert all((folder / p).exists() for p in ("scaling.png", "ratios.png"))


def test_trailing_study_is_a_longer_context_run_at_paper_sparsity():
    """cpu-study-trailing: the cpu-study's s5 at 4x the context, documents as long as the
    context, scored on the last 1/16 of positions; causal sparsity ~ the paper's 92%."""
    base, trailing = get_study("cpu-study"), get_study("cpu-study-trailing")
    m = trailing.base.model
    assert m.context == 4 * base.base.model.context and m.block_size == base.base.model.block_size
    assert trailing.recall_spec["doc_len"] == m.context
    assert trailing.base.train.trailing_frac == 1 / 16
    assert [s.name for s in trailing.sizes] == ["s5"] and set(trailing.arms) == {"full", "moba", "local"}
    assert causal_sparsity(m.context, "moba", m.block_size, m.top_k) == pytest.approx(0.9229, abs=1e-4)
