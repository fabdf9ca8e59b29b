"""moba.generate: plain, speculative and staged speculative decoding on tiny random Llama models."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moba.integrations.transformers as mt  # noqa: E402
from moba.generate import (  # noqa: E402
    CachedModel,
    GenerationStats,
    ModelDraft,
    NGramDraft,
    Sampling,
    StagedDraft,
    generate_plain,
    generate_speculative,
    speculative_accept,
    speculative_step,
)

VOCAB, BS = 64, 4
IMPL = "moba_gen"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    mt.register_moba(BS, 2, name=IMPL)  # blocks of 4: decoding crosses many blocks


def _model(seed: int, layers: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0, eos_token_id=None, bos_token_id=None, initializer_range=0.3)
    return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=IMPL).eval()


@pytest.fixture(scope="module")
def models():
    return _model(0), _model(1, layers=1)  # target, draft (different random weights)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def plain(models, prompt):
    return generate_plain(models[0], prompt, 24)


class WrongDraft:
    """Always proposes a token the target's greedy decoding does not produce."""

    def __init__(self, reference: list[int]):
        self.reference = reference

    def propose(self, tokens, gamma, sampling, generator=None):
        nxt = self.reference[len(tokens)] if len(tokens) < len(self.reference) else 0
        return [(nxt + 1) % VOCAB] * gamma, None


def test_plain_greedy_equals_transformers_generate(models, prompt, plain):
    target = models[0]
    ref = target.generate(prompt, max_new_tokens=24, do_sample=False)
    assert plain.shape == (1, 31) and torch.equal(plain, ref)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_speculative_equals_plain(models, prompt, plain, gamma, monkeypatch):
    target, draft = models
    chunks = []
    real = mt.moba_decode
    monkeypatch.setattr(mt, "moba_decode", lambda q, *a, **k: (chunks.append(q.shape[1]), real(q, *a, **k))[1])
    out, stats = generate_speculative(target, draft, prompt, 24, gamma=gamma)
    assert torch.equal(out, plain)
    assert max(chunks) == gamma + 1  # the target verifies with multi-token MoBA decode steps
    assert stats.new_tokens == 24 and stats.rounds == stats.target_forwards
    assert stats.draft_forwards > 0 and 0 <= stats.acceptance_rate <= 1
    # a fully accepted draft: the target drafting for itself
    out, stats = generate_speculative(target, target, prompt, 24, gamma=gamma)
    assert torch.equal(out, plain) and stats.acceptance_rate == 1.0
    assert stats.target_forwards == -(-24 // (gamma + 1))  # gamma + 1 tokens per target forward
    # always rejected at the first token: one target token per round, still exact
    out, stats = generate_speculative(target, WrongDraft(plain[0].tolist()), prompt, 24, gamma=gamma)
    assert torch.equal(out, plain) and stats.accepted == 0 and stats.target_forwards == 24


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_staged_and_ngram_drafting_equal_plain(models, prompt, plain, gamma):
    target, draft = models
    seq = plain[0].tolist()
    good = NGramDraft([seq], n=4)  # has seen the answer: mostly accepted
    bad = NGramDraft([[(t + 1) % VOCAB for t in seq]], n=4)  # shifted: wrong guesses
    for ngram in (good, bad):
        out, stats = generate_speculative(target, draft, prompt, 24, gamma=gamma, draft_drafter=ngram, gamma_inner=2)
        assert torch.equal(out, plain)
        assert stats.draft_forwards > 0
        out, stats = generate_speculative(target, ngram, prompt, 24, gamma=gamma)  # n-gram drafts for the target
        assert torch.equal(out, plain)
    # the target as the draft model, fed by the good n-gram: everything accepted
    staged = StagedDraft(target, good, gamma_inner=3)
    out, stats = generate_speculative(target, staged, prompt, 24, gamma=gamma)
    assert torch.equal(out, plain) and stats.acceptance_rate == 1.0
    assert staged.accepted > 0 or gamma == 1  # gamma 1: no room for inner guesses


def test_ngram_draft_longest_suffix_and_backoff():
    ng = NGramDraft([[1, 2, 3, 4], [9, 3, 7], [3, 7]], n=3)
    assert ng.propose([1, 2], 3) == ([3, 4], None)  # (1, 2) -> 3, (2, 3) -> 4, then (3, 4) unseen: 4 unseen
    assert ng.propose([9, 3], 2) == ([7], None)  # the bigram (9, 3) beats the unigram 3 (-> 4 or 7)
    assert ng.propose([5, 3], 1) == ([7], None)  # backoff to 3: 7 twice, 4 once
    assert ng.propose([5], 4) == ([], None)


def test_sampling_warps():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.equal(Sampling(True, top_k=2).probs(logits) > 0, torch.tensor([True, True, False, False]))
    p = logits.softmax(-1)  # 0.64, 0.24, 0.09, 0.03
    assert torch.equal(Sampling(True, top_p=0.8).probs(logits) > 0, torch.tensor([True, True, False, False]))
    assert torch.equal(Sampling(True, top_p=0.5).probs(logits) > 0, torch.tensor([True, False, False, False]))
    torch.testing.assert_close(Sampling(True, temperature=2.0).probs(logits), (logits / 2).softmax(-1))
    torch.testing.assert_close(Sampling(True).probs(logits), p)
    with pytest.raises(ValueError):
        Sampling(True, temperature=0)


@pytest.mark.parametrize("case", ["random", "disjoint", "point_mass"])
def test_acceptance_rule_preserves_the_target_distribution(case):
    gen = torch.Generator().manual_seed(123)
    v, trials = 5, 20000
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    q = {"random": torch.tensor([0.1, 0.1, 0.2, 0.5, 0.1]),
         "disjoint": torch.tensor([0.0, 0.0, 0.0, 0.3, 0.7]),  # mass where p has little
         "point_mass": torch.nn.functional.one_hot(torch.tensor(1), v).float()}[case]
    drafted = torch.multinomial(q, trials, replacement=True, generator=gen).tolist()
    counts = torch.zeros(v)
    accepted = 0
    for tok in drafted:
        ok, out = speculative_accept(p, q, tok, gen)
        counts[out] += 1
        accepted += ok
    freq = counts / trials
    assert (freq - p).abs().max() < 0.012, (freq, p)  # ~3.5 sigma for p = 0.4 at 20k trials
    chi2 = float(((counts - trials * p) ** 2 / (trials * p)).sum())
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom: p-value ~0.001
    expected_accept = float(torch.minimum(p, q).sum())  # P(accept) = sum min(p, q)
    assert abs(accepted / trials - expected_accept) < 0.015


def test_sampled_generation_runs_and_is_reproducible(models, prompt):
    target, draft = models
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95)
    a, sa = generate_speculative(target, draft, prompt, 16, gamma=3, generator=torch.Generator().manual_seed(0), **kw)
    b, _ = generate_speculative(target, draft, prompt, 16, gamma=3, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b) and a.shape == (1, 23) and sa.new_tokens == 16
    c, sc = generate_speculative(target, draft, prompt, 16, gamma=3, draft_drafter=NGramDraft([a[0].tolist()]),
                                 generator=torch.Generator().manual_seed(1), **kw)
    assert c.shape == (1, 23) and isinstance(sc, GenerationStats)
    d = generate_plain(target, prompt, 16, generator=torch.Generator().manual_seed(0), **kw)
    assert d.shape == (1, 23) and int(d.max()) < VOCAB
    # self-drafting with sampling accepts everything (p == q)
    _, ss = generate_speculative(target, target, prompt, 16, gamma=3, generator=torch.Generator().manual_seed(0), **kw)
    assert ss.acceptance_rate == 1.0


def test_caches_are_rolled_back_after_rejections(models, prompt):
    target, draft = models
    t_runner, d_runner = CachedModel(target), CachedModel(draft)
    drafter = ModelDraft(d_runner)
    tokens = prompt[0].tolist()
    sampling = Sampling()
    stats = GenerationStats()
    probe = torch.randint(1, VOCAB, (3,), generator=torch.Generator().manual_seed(9)).tolist()
    for _ in range(6):
        tokens = tokens + speculative_step(t_runner, drafter, tokens, 4, sampling, stats=stats)
        for runner, model in ((t_runner, target), (d_runner, draft)):
            # the next step over the cache == a fresh full forward over the accepted tokens (+ new ones)
            got = runner.logits(tokens + probe, need=len(probe) + 1)
            with torch.no_grad():
                expected = model(torch.tensor([tokens + probe])).logits[0, -len(probe) - 1:]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            assert runner.cache.get_seq_length() == len(tokens) + len(probe)
    assert stats.accepted < stats.proposed, "no rejection: the test does not exercise rollback"
    assert t_runner.crops > 0 and d_runner.crops > 0


def test_bad_inputs():
    target = _model(0, layers=1)
    with pytest.raises(ValueError, match="batch size 1"):
        generate_plain(target, torch.ones(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="batch size 1"):
        generate_speculative(target, target, torch.ones(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="draft model"):
        generate_speculative(target, NGramDraft([[1, 2]]), torch.ones(1, 3, dtype=torch.long), 2,
                             draft_drafter=NGramDraft([[1, 2]]))
    with pytest.raises(ValueError, match="n must be"):
        NGramDraft([], n=1)


def test_eos_stops_generation(models, prompt, plain):
    target, draft = models
    eos = plain[0, 7 + 5].item()  # the 6th new token (or an earlier copy of it)
    first = plain[0, 7:].tolist().index(eos)
    out = generate_plain(target, prompt, 24, eos_token_id=eos)
    assert torch.equal(out, plain[:, : 7 + first + 1])
    out, _ = generate_speculative(target, draft, prompt, 24, gamma=3, eos_token_id=eos)
    assert torch.equal(out, plain[:, : 7 + first + 1])


@pytest.mark.parametrize("staged", [False, True])
def test_sampled_proposals_report_the_draft_models_probabilities(models, prompt, staged):
    """q handed to the target's acceptance rule == the draft model's (warped) probabilities at the
    proposed positions, also when an n-gram speculates for the draft model (staged)."""
    _, draft = models
    sampling = Sampling(True, temperature=1.5, top_k=30)
    tokens = prompt[0].tolist()
    gen = torch.Generator().manual_seed(3)
    ngram = NGramDraft([torch.randint(1, VOCAB, (200,), generator=gen).tolist(), tokens * 3], n=3)
    drafter = StagedDraft(draft, ngram, gamma_inner=2) if staged else ModelDraft(draft)
    for _ in range(3):
        proposal, q = drafter.propose(tokens, 5, sampling, gen)
        assert len(proposal) == 5 and q.shape == (5, VOCAB)
        with torch.no_grad():
            logits = draft(torch.tensor([tokens + proposal])).logits[0, len(tokens) - 1 : -1]
        torch.testing.assert_close(q, sampling.probs(logits), rtol=1e-4, atol=1e-5)
        assert bool((q[torch.arange(5), proposal] > 0).all())
        tokens = tokens + proposal[:2]  # the target accepted 2 of them
    if staged:
        assert drafter.proposed > 0


def test_staged_speculative_sampling_matches_the_target_distribution():
    """End to end (draft model + n-gram, gamma 2): the first three sampled tokens follow the
    target's distribution (exact reference from full forwards; chi-square at p ~0.001)."""
    v, n_trials, temperature = 6, 1000, 2.0

    def tiny(seed):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                       eos_token_id=None, bos_token_id=None, initializer_range=0.5)
        return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=IMPL).eval()

    target, draft = tiny(0), tiny(1)
    prompt = [1, 2, 3, 4, 5]
    sampling = Sampling(True, temperature=temperature)
    with torch.no_grad():
        def nxt(ctx):
            return sampling.probs(target(torch.tensor([ctx]), use_cache=False).logits[0, -1])

        joint = torch.stack([nxt(prompt)[a] * nxt(prompt + [a]) for a in range(v)])  # (v, v)
        third = sum(joint[a, b] * nxt(prompt + [a, b]) for a in range(v) for b in range(v))
    ngram = NGramDraft([[1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]], n=3)
    gen = torch.Generator().manual_seed(0)
    pairs, thirds = torch.zeros(v, v), torch.zeros(v)
    accepted = proposed = 0
    for _ in range(n_trials):
        out, stats = generate_speculative(target, draft, torch.tensor([prompt]), 3, gamma=2, do_sample=True,
                                          temperature=temperature, generator=gen, draft_drafter=ngram, gamma_inner=1)
        a, b, c = out[0, 5:].tolist()
        pairs[a, b] += 1
        thirds[c] += 1
        accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
    assert 0 < accepted < proposed  # both paths (accept, reject) ran

    def chi2(counts, probs):
        expected = probs.flatten() * n_trials
        return float(((counts.flatten() - expected) ** 2 / expected).sum())

    assert chi2(pairs, joint) < 66.6  # 35 degrees of freedom
    assert chi2(pairs.sum(1), joint.sum(1)) < 20.5  # 5 degrees of freedom
    assert chi2(pairs.sum(0), joint.sum(0)) < 20.5
    assert chi2(thirds, third) < 20.5


def test_roofline_point_speculation_raises_intensity(models, prompt):
    from bench.generate_speed import roofline_point  # the roofline model lives with its benchmark

    target, draft = models
    _, plain_stats = generate_plain(target, prompt, 12, return_stats=True)
    # the prompt (7 tokens) is prefilled apart (all but its last token), then one token per forward
    assert (plain_stats.prefill_tokens, plain_stats.target_tokens, plain_stats.target_forwards) == (6, 12, 12)
    _, spec_stats = generate_speculative(target, target, prompt, 12, gamma=3)  # all accepted
    assert spec_stats.draft_tokens > 0
    base = roofline_point("plain", plain_stats, target)
    spec = roofline_point("speculative", spec_stats, target)  # the draft's cost left out
    both = roofline_point("speculative+draft", spec_stats, target, target)
    assert set(base) == {"name", "flops", "bytes", "seconds"} and base["seconds"] > 0
    assert spec["flops"] / spec["bytes"] > 2 * base["flops"] / base["bytes"]
    assert both["flops"] > spec["flops"] and both["bytes"] > spec["bytes"]


def test_ngram_tables_match_a_brute_force_count():
    """The numpy-built tables agree with counting every n-gram by hand (longest suffix first,
    most frequent successor, ties to the smaller id, no n-gram across sequences)."""
    from collections import Counter

    gen = torch.Generator().manual_seed(0)
    corpus = [torch.randint(0, 5, (int(n),), generator=gen).tolist() for n in (40, 1, 0, 25, 3)]
    n = 4
    counts: dict[tuple, Counter] = {}
    for seq in corpus:
        for i in range(1, len(seq)):
            for k in range(1, min(n - 1, i) + 1):
                counts.setdefault(tuple(seq[i - k : i]), Counter())[seq[i]] += 1

    def brute(ctx):
        for k in range(min(n - 1, len(ctx)), 0, -1):
            c = counts.get(tuple(ctx[-k:]))
            if c:
                return min(c, key=lambda t: (-c[t], t))
        return None

    ng = NGramDraft(corpus, n=n)
    contexts = [torch.randint(0, 6, (int(m),), generator=gen).tolist() for m in torch.randint(1, 6, (300,), generator=gen)]
    assert sum(brute(c) is not None for c in contexts) > 200
    for ctx in contexts:  # 5 is never in the corpus: its contexts back off or stop
        assert ng.next_token(ctx) == brute(ctx), ctx
    with pytest.raises(ValueError, match="integer tokens"):
        NGramDraft([[0.5, 1.5]])
    with pytest.raises(ValueError, match="too large"):
        NGramDraft([[0, 50_000]], n=5)
