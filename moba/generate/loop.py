"""Plain, speculative and staged speculative generation for transformers causal LMs.

Works with any ``transformers`` causal LM whose KV cache is a ``DynamicCache`` (MoBA via
``moba.integrations.transformers.register_moba``, or any other attention implementation).
Batch size 1; everything is device-agnostic (the tokens live on ``input_ids.device``).

* ``generate_plain``: autoregressive decoding with the model's KV cache (greedy, or sampling
  with temperature / top-k / top-p).
* ``generate_speculative``: a cheap drafter proposes ``gamma`` tokens, the target verifies
  them in ONE forward over its cache (for MoBA: a multi-token decode step, ``moba_decode``
  with ``Lq = gamma + 1``); greedy accepts the longest agreeing prefix, sampling uses the
  speculative-sampling rule (``speculative_accept``); the caches are rolled back with
  ``DynamicCache.crop`` after rejections. Greedy output is token-for-token that of
  ``generate_plain``; sampled output has the target's distribution.
* Drafters: ``ModelDraft`` (a smaller model with its own cache), ``NGramDraft`` (an n-gram
  table built from token sequences, no model at all) and ``StagedDraft`` (staged speculative
  decoding: the n-gram table speculates for the draft model, which verifies those guesses
  in one forward and proposes the result to the target).

Example::

    register_moba(block_size=64, top_k=3)
    target = AutoModelForCausalLM.from_pretrained(big, attn_implementation="moba")
    draft = AutoModelForCausalLM.from_pretrained(small, attn_implementation="moba")
    ids = tokenizer("...", return_tensors="pt").input_ids                       # (1, L)
    out, stats = generate_speculative(target, draft, ids, 128, gamma=4)          # (1, L + 128)
    out, stats = generate_speculative(target, draft, ids, 128, gamma=4,
                                      draft_drafter=NGramDraft(corpus, n=4))     # staged
    print(stats.acceptance_rate, stats.tokens_per_second)
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .._core.checks import check_bool, check_nonnegative_int, check_positive_int

__all__ = [
    "CachedModel",
    "GenerationStats",
    "ModelDraft",
    "NGramDraft",
    "Sampling",
    "StagedDraft",
    "TreeDraft",
    "generate_plain",
    "generate_speculative",
    "generate_tree_speculative",
    "speculative_accept",
    "speculative_step",
    "verify",
]


# -- sampling -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How next tokens are chosen: greedy (``do_sample=False``) or sampled from warped logits."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        check_bool("do_sample", self.do_sample)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real):
            raise TypeError(f"temperature must be a float > 0, got {type(self.temperature).__name__} "
                            f"{self.temperature!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.top_k is not None:
            check_positive_int("top_k", self.top_k)
        if self.top_p is not None:
            if isinstance(self.top_p, bool) or not isinstance(self.top_p, numbers.Real):
                raise TypeError(f"top_p must be a float in (0, 1] or None, got {type(self.top_p).__name__} "
                                f"{self.top_p!r}")
            if not 0 < self.top_p <= 1:  # NaN fails this too
                raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (..., V) float32 probabilities after temperature, top-k, top-p."""
        x = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = x.topk(self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_x, order = x.sort(dim=-1, descending=True)
            p = sorted_x.softmax(-1)
            drop = p.cumsum(-1) - p >= self.top_p  # keep the smallest prefix reaching top_p
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return x.softmax(-1)

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """One token from (V,) logits: argmax when greedy, else a sample of ``probs``."""
        if not self.do_sample:
            return int(logits.argmax())
        return int(torch.multinomial(self.probs(logits), 1, generator=generator))


def speculative_accept(p: torch.Tensor, q: torch.Tensor, token: int,
                       generator: torch.Generator | None = None) -> tuple[bool, int]:
    """The speculative-sampling rule for one drafted token (Leviathan et al.; Chen et al., 2023).

    p: (V,) target probabilities, q: (V,) draft probabilities, ``token`` drawn from q.
    Accept with probability ``min(1, p[token] / q[token])``; on rejection resample from
    ``norm(max(0, p - q))``. The returned token is distributed exactly as p.
    Returns ``(accepted, token)``.
    """
    pt, qt = float(p[token]), float(q[token])
    u = float(torch.rand((), generator=generator, device=p.device))
    if qt > 0 and u * qt < pt:  # u < p/q without dividing
        return True, int(token)
    residual = (p.float() - q.float()).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q (up to rounding): rejection had probability ~0
        residual = p.float()
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


# -- a model and its cache ------------------------------------------------------------------
class CachedModel:
    """A causal LM and its ``DynamicCache``, kept in step with a token sequence.

    ``logits(tokens, need)`` returns the logits of the last ``need`` positions of ``tokens``;
    it feeds only what the cache lacks: the cache is cropped to the longest common prefix of
    the cached tokens and ``tokens`` (leaving at least ``need`` tokens to feed), which is how
    rejected speculative tokens are rolled back.

    Attributes:
        tokens: the tokens whose keys/values are in the cache.
        forwards: number of model calls; fed: tokens fed through the model (all calls);
        crops: number of cache rollbacks.
    """

    def __init__(self, model, device: torch.device | str | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # transformers renamed the forward's ``past_key_values`` to ``cache`` in 5.24: read which one it takes
        params = inspect.signature(model.forward).parameters
        self._cache_keyword = "cache" if "cache" in params else "past_key_values"
        self.cache = None
        self.tokens: list[int] = []
        self.forwards = 0
        self.fed = 0
        self.crops = 0

    def _new_cache(self):
        if hasattr(self.model, "new_cache"):  # e.g. moba.generate.adapters.GPTAdapter
            return self.model.new_cache()
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def logits(self, tokens: list[int], need: int = 1) -> torch.Tensor:
        """(need, V) logits predicting the tokens after ``tokens[-need:]``' positions.

        Row ``i`` is the next-token distribution after ``tokens[: len(tokens) - need + 1 + i]``.
        """
        if not 1 <= need <= len(tokens):
            raise ValueError(f"need must be in [1, {len(tokens)}], got {need}")
        keep = 0
        for a, b in zip(self.tokens, tokens, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - need)
        if keep == 0:
            self.cache = self._new_cache()
        elif keep < len(self.tokens):
            self.cache.crop(keep - len(self.tokens))  # a negative count: tokens to remove
            self.crops += 1
        ids = torch.tensor([tokens[keep:]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=need, **{self._cache_keyword: self.cache})
        returned = getattr(out, self._cache_keyword, None)
        self.cache = returned if returned is not None else self.cache
        self.tokens = list(tokens)
        self.forwards += 1
        self.fed += ids.shape[1]
        return out.logits[0, -need:]


def verify(model: CachedModel, tokens: list[int], proposal: list[int], q: torch.Tensor | None,
           sampling: Sampling, generator: torch.Generator | None = None):
    """Check ``proposal`` (drafted continuations of ``tokens``) with ONE forward of ``model``.

    q: (len(proposal), V) draft probabilities of the proposed tokens, or None for a
    deterministic drafter (a point mass on each proposed token).
    Returns ``(n_accepted, next_token, p)``: the first ``n_accepted`` proposed tokens are kept,
    then ``next_token`` (the correction at the first rejection, or a bonus token when all were
    accepted); p: (n_accepted + 1, V) the model's probabilities at those positions when
    sampling (None when greedy).
    """
    g = len(proposal)
    logits = model.logits(tokens + proposal, need=g + 1)  # (g + 1, V)
    if not sampling.do_sample:
        choice = logits.argmax(-1).tolist()
        n = 0
        while n < g and proposal[n] == choice[n]:
            n += 1
        return n, choice[n], None
    p = sampling.probs(logits)
    for i, tok in enumerate(proposal):
        qi = q[i] if q is not None else torch.nn.functional.one_hot(torch.tensor(tok), p.shape[-1]).to(p)
        ok, new = speculative_accept(p[i], qi.to(p.device), tok, generator)
        if not ok:
            return i, new, p[: i + 1]
    return g, int(torch.multinomial(p[g], 1, generator=generator)), p


# -- drafters -------------------------------------------------------------------------------
# A drafter has ``propose(tokens, gamma, sampling, generator) -> (proposal, q)``: up to gamma
# tokens continuing ``tokens`` and their (len(proposal), V) draft probabilities, or None when
# the drafter is deterministic.


class ModelDraft:
    """A (small) causal LM proposing ``gamma`` tokens one by one with its own KV cache."""

    def __init__(self, model):
        self.model = model if isinstance(model, CachedModel) else CachedModel(model)

    def propose(self, tokens, gamma, sampling, generator=None):
        out, qs = [], []
        for _ in range(gamma):
            logits = self.model.logits(tokens + out)[-1]
            out.append(sampling.pick(logits, generator))
            if sampling.do_sample:
                qs.append(sampling.probs(logits))
        return out, (torch.stack(qs) if qs else None)


class NGramDraft:
    """A deterministic n-gram drafter built from token sequences (no model).

    ``propose`` extends the context token by token: the longest suffix (up to ``n - 1``
    tokens) seen in the corpus predicts its most frequent successor (ties: the smaller id);
    when a suffix is unseen it backs off to shorter ones; when none matches, it stops (it may
    propose fewer than gamma tokens, even none).

    The tables are built with numpy (a sort per order, no Python loop over tokens), so a
    training corpus of tens of millions of tokens takes seconds:
    ``NGramDraft([train_tokens], n=4)``. Contexts are encoded as integers in base
    ``vocab_size`` (the largest token + 1), so ``vocab_size ** n`` must stay below 2**63.

    corpus: an iterable of sequences (lists of ints, 1-d tensors or numpy arrays); n-grams
    never cross from one sequence into the next.
    """

    def __init__(self, corpus, n: int = 3):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an int >= 2, got {n!r}")
        self.n = n
        seqs = [_int_array(seq) for seq in corpus]
        self.vocab_size = max((int(s.max()) + 1 for s in seqs if s.size), default=0)
        if seqs and min((int(s.min()) for s in seqs if s.size), default=0) < 0:
            raise ValueError("corpus tokens must be >= 0")
        if self.vocab_size and self.vocab_size ** n >= 2**63:
            raise ValueError(f"n={n} is too large for a vocabulary of {self.vocab_size} tokens "
                             f"(contexts are int64 keys: vocab_size ** n must be < 2**63)")
        # order k -> (sorted context keys, most frequent successor of each)
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in range(1, n):
            pairs = [self._keys(s, k) * self.vocab_size + s[k:] for s in seqs if s.size > k]
            if not pairs:
                continue
            pair, count = np.unique(np.concatenate(pairs), return_counts=True)
            ctx, nxt = np.divmod(pair, self.vocab_size)
            order = np.lexsort((nxt, -count, ctx))  # by context, then most frequent, then smaller id
            ctx, nxt = ctx[order], nxt[order]
            first = np.concatenate([[True], ctx[1:] != ctx[:-1]])
            self.tables[k] = (ctx[first], nxt[first])

    def _keys(self, seq: np.ndarray, k: int) -> np.ndarray:
        """The int64 key of every length-k window of seq that has a successor."""
        key = np.zeros(seq.size - k, dtype=np.int64)
        for j in range(k):
            key = key * self.vocab_size + seq[j : seq.size - k + j]
        return key

    def next_token(self, context: list[int]) -> int | None:
        for k in range(min(self.n - 1, len(context)), 0, -1):
            if k not in self.tables or not all(0 <= t < self.vocab_size for t in context[-k:]):
                continue
            key = 0
            for t in context[-k:]:
                key = key * self.vocab_size + t
            keys, best = self.tables[k]
            i = int(np.searchsorted(keys, key))
            if i < keys.size and keys[i] == key:
                return int(best[i])
        return None

    def propose(self, tokens, gamma, sampling=None, generator=None):
        out: list[int] = []
        while len(out) < gamma:
            nxt = self.next_token(tokens + out)
            if nxt is None:
                break
            out.append(nxt)
        return out, None


def _int_array(seq) -> np.ndarray:
    if isinstance(seq, torch.Tensor):
        seq = seq.detach().cpu().numpy()
    arr = np.asarray(seq)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"each corpus sequence must be a 1-d sequence of integer tokens, got shape {arr.shape}, "
                         f"dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class StagedDraft:
    """Staged speculative drafting: ``inner`` (e.g. an ``NGramDraft``) speculates for the draft
    model, which verifies ``gamma_inner`` guesses per forward (``verify``) and proposes what it
    accepts (plus its own correction/bonus token) to the target.

    The proposals are distributed as the draft model's own (speculative sampling preserves
    it), so q is the draft model's probabilities at the proposed positions.
    """

    def __init__(self, draft_model, inner, gamma_inner: int = 2):
        gamma_inner = check_positive_int("gamma_inner", gamma_inner)
        self.model = draft_model if isinstance(draft_model, CachedModel) else CachedModel(draft_model)
        self.inner, self.gamma_inner = inner, gamma_inner
        self.proposed = self.accepted = 0  # inner stage: guesses made / accepted by the draft model

    def propose(self, tokens, gamma, sampling, generator=None):
        out, qs = [], []
        while len(out) < gamma:
            ctx = tokens + out
            g = min(self.gamma_inner, gamma - len(out) - 1)  # the verify adds one token of its own
            guess, q = self.inner.propose(ctx, g, sampling, generator) if g > 0 else ([], None)
            n, nxt, p = verify(self.model, ctx, guess, q, sampling, generator)
            self.proposed += len(guess)
            self.accepted += n
            out += guess[:n] + [nxt]
            if p is not None:
                qs.append(p)
        return out, (torch.cat(qs) if qs else None)


# -- generation -----------------------------------------------------------------------------
@dataclass
class GenerationStats:
    """Counters of one generation call.

    The prompt is prefilled first (all its tokens but the last, into every model's cache), and
    timed apart: ``prefill_seconds`` / ``prefill_tokens`` (per model). Everything else counts
    the decoding that follows: seconds, and tokens per second = new_tokens / seconds;
    proposed / accepted: drafted tokens sent to / accepted by the target; rounds: verify
    forwards of the target (one per speculative step); target_forwards / draft_forwards: model
    calls; target_tokens / draft_tokens: tokens fed through them;
    inner_proposed / inner_accepted: staged drafting only, the cheap drafter's guesses sent to
    / accepted by the draft model.
    """

    new_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    target_tokens: int = 0
    draft_tokens: int = 0
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    inner_proposed: int = 0
    inner_accepted: int = 0

    @property
    def inner_acceptance_rate(self) -> float:
        return self.inner_accepted / self.inner_proposed if self.inner_proposed else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Drafted tokens accepted per target verify forward."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _vocab_size(model) -> int | None:
    """Rows of the model's input embedding (None when it has none: a drafter, a custom model)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


def _check_ids(input_ids: torch.Tensor, *models) -> list[int]:
    """input_ids (1, L) integer tokens, each inside every given model's vocabulary."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        what = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {what}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"only batch size 1 is supported, got batch {input_ids.shape[0]}")
    if input_ids.shape[1] < 1 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold at least one integer token, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    tokens = [int(t) for t in input_ids[0].tolist()]
    sizes = [n for n in (_vocab_size(m) for m in models) if n is not None]
    limit = min(sizes) if sizes else None
    bad = [t for t in tokens if t < 0 or (limit is not None and t >= limit)]
    if bad:
        span = f"[0, {limit})" if limit is not None else ">= 0"
        raise ValueError(f"input_ids must be token ids in {span} (the model's vocabulary), got {bad[0]}")
    return tokens


def _check_max_new_tokens(max_new_tokens) -> int:
    return check_nonnegative_int("max_new_tokens", max_new_tokens)


def _finish(tokens: list[int], n_prompt: int, max_new: int, eos) -> tuple[list[int], bool]:
    """Cut at max_new new tokens and after the first eos among the new ones."""
    new = tokens[n_prompt : n_prompt + max_new]
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
        return tokens[:n_prompt] + new, True
    return tokens[:n_prompt] + new, len(new) >= max_new


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(runners: list[CachedModel], tokens: list[int], device: torch.device) -> tuple[float, int]:
    """Put the prompt but its last token into every runner's cache (decoding then feeds the
    last prompt token first); returns (seconds, tokens fed per runner)."""
    start = time.perf_counter()
    if len(tokens) > 1:
        for runner in runners:
            runner.logits(tokens[:-1])
    _sync(device)
    return time.perf_counter() - start, max(0, len(tokens) - 1)


class _Counter:
    """Forwards and fed tokens of a runner since construction (after the prefill)."""

    def __init__(self, runner: CachedModel | None):
        self.runner = runner
        self.start = (runner.forwards, runner.fed) if runner is not None else (0, 0)

    def counts(self) -> tuple[int, int]:
        if self.runner is None:
            return 0, 0
        return self.runner.forwards - self.start[0], self.runner.fed - self.start[1]


def generate_plain(model, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None, eos_token_id: int | None = None,
                   return_stats: bool = False):
    """Autoregressive decoding with the model's KV cache, one token per forward.

    input_ids: (1, L). Returns (1, L + n) token ids (n <= max_new_tokens, fewer only when
    ``eos_token_id`` is produced), and a ``GenerationStats`` when ``return_stats``.
    """
    tokens = _check_ids(input_ids, model)
    max_new_tokens = _check_max_new_tokens(max_new_tokens)
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    runner = CachedModel(model, input_ids.device)
    n_prompt, done = len(tokens), max_new_tokens <= 0
    prefill_seconds, prefill_tokens = _prefill([runner], tokens, input_ids.device) if not done else (0.0, 0)
    counter = _Counter(runner)
    start = time.perf_counter()
    while not done:
        tokens.append(sampling.pick(runner.logits(tokens)[-1], generator))
        tokens, done = _finish(tokens, n_prompt, max_new_tokens, eos_token_id)
    _sync(input_ids.device)
    out = torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)
    if not return_stats:
        return out
    forwards, fed = counter.counts()
    stats = GenerationStats(new_tokens=len(tokens) - n_prompt, target_forwards=forwards, rounds=forwards,
                            target_tokens=fed, seconds=time.perf_counter() - start,
                            prefill_seconds=prefill_seconds, prefill_tokens=prefill_tokens)
    return out, stats


def speculative_step(target: CachedModel, drafter, tokens: list[int], gamma: int, sampling: Sampling,
                     generator: torch.Generator | None = None, stats: GenerationStats | None = None) -> list[int]:
    """One round: draft up to ``gamma`` tokens, verify them in one target forward.

    Returns the new tokens (1 to gamma + 1: the accepted drafts, then the target's own token).
    """
    proposal, q = drafter.propose(tokens, gamma, sampling, generator) if gamma > 0 else ([], None)
    proposal = proposal[:gamma]
    q = q[: len(proposal)] if q is not None else None
    n, nxt, _ = verify(target, tokens, proposal, q, sampling, generator)
    if stats is not None:
        stats.rounds += 1
        stats.proposed += len(proposal)
        stats.accepted += n
        stats.accepted_per_round.append(n)
    return proposal[:n] + [nxt]


def generate_speculative(target, draft, input_ids: torch.Tensor, max_new_tokens: int, gamma: int = 4, *,
                         do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, generator: torch.Generator | None = None,
                         draft_drafter=None, gamma_inner: int = 2, eos_token_id: int | None = None,
                         return_stats: bool = True):
    """Speculative decoding of ``target`` with a draft model or drafter.

    Args:
        target: the causal LM whose output is produced (greedy: exactly ``generate_plain``'s
            tokens; sampling: the target's distribution).
        draft: a causal LM (wrapped in ``ModelDraft``), or any drafter with ``propose``
            (``NGramDraft``, ``StagedDraft``, ``ModelDraft``).
        input_ids: (1, L) prompt.
        gamma: tokens drafted per round (the target verifies gamma + 1 positions per forward).
        draft_drafter: with a draft model, a drafter (e.g. ``NGramDraft``) that speculates for
            the draft model: staged speculative decoding (``StagedDraft``, ``gamma_inner``
            guesses per draft-model forward).
        do_sample, temperature, top_k, top_p, generator: sampling settings (shared by all stages).
        eos_token_id: stop after this token.

    Returns:
        (1, L + n) token ids, and a ``GenerationStats`` when ``return_stats`` (the default).
    """
    tokens = _check_ids(input_ids, target, *([] if hasattr(draft, "propose") else [draft]))
    max_new_tokens = _check_max_new_tokens(max_new_tokens)
    gamma = check_nonnegative_int("gamma", gamma)
    gamma_inner = check_positive_int("gamma_inner", gamma_inner)
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    if hasattr(draft, "propose"):
        if draft_drafter is not None:
            raise ValueError("draft_drafter needs a draft model, not a drafter")
        drafter = draft
    elif draft_drafter is not None:
        drafter = StagedDraft(CachedModel(draft, input_ids.device), draft_drafter, gamma_inner)
    else:
        drafter = ModelDraft(CachedModel(draft, input_ids.device))
    runner = CachedModel(target, input_ids.device)
    draft_runner = getattr(drafter, "model", None)
    draft_runner = draft_runner if isinstance(draft_runner, CachedModel) else None
    stats = GenerationStats()
    n_prompt, done = len(tokens), max_new_tokens <= 0
    if not done:
        runners = [runner] + ([draft_runner] if draft_runner is not None else [])
        stats.prefill_seconds, stats.prefill_tokens = _prefill(runners, tokens, input_ids.device)
    target_counter, draft_counter = _Counter(runner), _Counter(draft_runner)
    inner_before = (getattr(drafter, "proposed", 0), getattr(drafter, "accepted", 0))
    start = time.perf_counter()
    while not done:
        left = max_new_tokens - (len(tokens) - n_prompt)
        tokens = tokens + speculative_step(runner, drafter, tokens, min(gamma, left - 1), sampling, generator, stats)
        tokens, done = _finish(tokens, n_prompt, max_new_tokens, eos_token_id)
    _sync(input_ids.device)
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = len(tokens) - n_prompt
    stats.target_forwards, stats.target_tokens = target_counter.counts()
    stats.draft_forwards, stats.draft_tokens = draft_counter.counts()
    if isinstance(drafter, StagedDraft):
        stats.inner_proposed = drafter.proposed - inner_before[0]
        stats.inner_accepted = drafter.accepted - inner_before[1]
    out = torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)
    return (out, stats) if return_stats else out


# -- tree-shaped drafts ---------------------------------------------------------------------
class TreeDraft:
    """A draft model proposing a *tree*: along its own greedy chain, the ``branching`` most
    likely tokens at every depth (the first continues the chain, the others are leaves).

    ``depth`` draft forwards give ``depth x branching`` nodes; the target checks all of them in
    one forward (``moba.decode.tree``), so a wrong chain token can still be saved by a sibling.
    """

    def __init__(self, model, branching: int = 2):
        if isinstance(branching, bool) or not isinstance(branching, int) or branching < 1:
            raise ValueError(f"branching must be an int >= 1, got {branching!r}")
        self.model = model if isinstance(model, CachedModel) else CachedModel(model)
        vocab = _vocab_size(self.model.model)
        if vocab is not None and branching > vocab:
            raise ValueError(f"branching must be <= the draft's vocabulary size ({vocab}), got {branching}")
        self.branching = branching

    def propose_tree(self, tokens: list[int], depth: int) -> tuple[list[int], list[int]]:
        """(node tokens, parents) of a tree continuing ``tokens``; parents -1 for the roots."""
        nodes, parents, chain, parent = [], [], [], -1
        for _ in range(depth):
            logits = self.model.logits(tokens + chain)[-1]
            if self.branching > logits.shape[-1]:
                raise ValueError(f"branching must be <= the vocabulary size ({logits.shape[-1]}), got {self.branching}")
            top = logits.topk(self.branching).indices.tolist()
            nodes += top
            parents += [parent] * len(top)
            parent = len(nodes) - len(top)  # the chain node: the draft's own greedy choice
            chain.append(top[0])
        return nodes, parents


class TreeTarget:
    """A target model with a ``moba.KVCache`` that verifies draft trees (greedy).

    The cache holds ``tokens[:cached]``; a round feeds the tokens it lacks (at least the last
    one, whose logits predict the tree's roots) plus the tree, in one forward
    (``model(..., tree=parents)``: the tree's keys and values are not cached).
    """

    def __init__(self, model, device):
        if not getattr(model, "supports_tree", False) or not hasattr(model, "new_cache"):
            raise TypeError("tree verification needs a model with moba tree attention, e.g. a scaling_runs "
                            "checkpoint through scaling_runs.checkpoint.load_gpt / moba.generate.adapters.GPTAdapter")
        self.model, self.device = model, torch.device(device)
        self.cache = model.new_cache()
        self.cached = self.forwards = self.fed = 0

    @torch.no_grad()
    def prefill(self, tokens: list[int]) -> None:
        if len(tokens) > 1:
            self.model(input_ids=torch.tensor([tokens[:-1]], device=self.device), cache=self.cache,
                       logits_to_keep=1)
            self.cached = len(tokens) - 1

    @torch.no_grad()
    def verify(self, tokens: list[int], nodes: list[int], parents: list[int]) -> tuple[list[int], int]:
        """(accepted node tokens along one path, the target's next token after them)."""
        new = tokens[self.cached :]
        ids = torch.tensor([new + nodes], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=self.cache, logits_to_keep=len(nodes) + 1,
                         tree=parents if nodes else None)
        self.cached = len(tokens)
        self.forwards += 1
        self.fed += ids.shape[1]
        choice = out.logits[0].argmax(-1).tolist()  # [0]: after the last token; [1 + i]: after node i
        accepted, nxt, node = [], choice[0], -1
        while True:
            match = next((i for i, p in enumerate(parents) if p == node and nodes[i] == nxt), None)
            if match is None:
                return accepted, nxt
            accepted.append(nxt)
            nxt, node = choice[1 + match], match


def generate_tree_speculative(target, draft, input_ids: torch.Tensor, max_new_tokens: int, depth: int = 4,
                              branching: int = 2, eos_token_id: int | None = None):
    """Greedy speculative decoding with tree-shaped drafts; output equals ``generate_plain``'s.

    Args:
        target: a model with tree attention (``moba.generate.adapters.GPTAdapter``).
        draft: a causal LM (wrapped in ``TreeDraft``) or a ``TreeDraft``.
        depth: drafted tokens along the chain per round; branching: candidates per depth.

    Returns (1, L + n) token ids and a ``GenerationStats`` (proposed = tree nodes sent to the
    target, accepted = tokens kept: the acceptance rate is per node, so compare trees by
    ``mean_accepted_length``).
    """
    tokens = _check_ids(input_ids, target, *([] if isinstance(draft, TreeDraft) else [draft]))
    max_new_tokens = _check_max_new_tokens(max_new_tokens)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, got {depth!r}")
    drafter = draft if isinstance(draft, TreeDraft) else TreeDraft(CachedModel(draft, input_ids.device), branching)
    runner = TreeTarget(target, input_ids.device)
    stats = GenerationStats()
    n_prompt, done = len(tokens), max_new_tokens <= 0
    if not done:
        start = time.perf_counter()
        runner.prefill(tokens)
        _, stats.prefill_tokens = _prefill([drafter.model], tokens, input_ids.device)
        stats.prefill_seconds = time.perf_counter() - start
    draft_counter = _Counter(drafter.model)
    start = time.perf_counter()
    while not done:
        left = max_new_tokens - (len(tokens) - n_prompt)
        nodes, parents = drafter.propose_tree(tokens, min(depth, left - 1))
        accepted, nxt = runner.verify(tokens, nodes, parents)
        stats.rounds += 1
        stats.proposed += len(nodes)
        stats.accepted += len(accepted)
        stats.accepted_per_round.append(len(accepted))
        tokens, done = _finish(tokens + accepted + [nxt], n_prompt, max_new_tokens, eos_token_id)
    _sync(input_ids.device)
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = len(tokens) - n_prompt
    stats.target_forwards, stats.target_tokens = runner.forwards, runner.fed
    stats.draft_forwards, stats.draft_tokens = draft_counter.counts()
    return torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device), stats


# -- roofline feed --------------------------------------------------------------------------
