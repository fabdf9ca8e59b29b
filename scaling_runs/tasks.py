"""Synthetic long-context tasks for byte-level models (issue 7): generated offline, by seed.

Three long-context tasks, each a prompt whose greedy continuation should be a short answer:

* ``passkey``: "The pass key is 48213. Remember it." hidden in filler text at a relative
  depth, the prompt ends with "What is the pass key? The pass key is" (answer "48213");
* ``multikey``: several "The code for <word> is <4 digits>." needles at different depths (the
  queried one at the requested depth), the prompt asks for one of them;
* ``mqar``: multi-query associative recall: ``key:value`` pairs (3 letters : 3 digits) fill
  the context, then several lookups ``key:value`` (all answered but the last, which shows
  the format); the last lookup's pair sits at the requested depth.

Two short-answer tasks (issue 16) that tiny byte models learn on CPU, answered by one digit:

* ``needle``: ``context_length - 2`` random non-digit filler bytes, one digit inserted at
  ``depth``, then ``"?"``; the answer is the digit (one hop: find the only digit);
* ``multineedle``: several ``<upper-case key><digit>`` pairs in the filler, the prompt ends
  with ``"?<key>"``, the answer is that key's digit (associative recall).

Their training data (``write_examples``, CLI ``--tasks needle``) is an ``.npz`` of solved
examples for ``scaling_runs.train --mix PATH.npz``: every training window starts at an
example's first byte and the loss counts the answer bytes only (``example_batch``).

Lengths are in tokens = bytes (the models are byte-level, vocab 256): every prompt is ASCII
and exactly ``context_length`` bytes long. ``depth`` in [0, 1] is the position of the queried
needle / pair inside the haystack (0 = start, 1 = right before the question).

Filler (passkey, multikey) comes from a ``Filler``: by default the held-out split of the
scaling runs' embedded corpus (``scaling_runs.data.build_stdlib_corpus``, bytes outside
printable ASCII replaced by spaces), else a deterministic pseudo-English fallback text. Pass
``filler="any text"`` (or a ``Filler``) to use your own (tests use a tiny text).

Determinism: every example is a pure function of (seed, task, context_length, depth, index,
filler text): its RNG is ``random.Random("seed|task|length|depth|index")``.

Scoring (``score``): exact match of the first whitespace-separated word of the prediction,
trailing ``.,;`` removed, against the answer; overall, per task and per (length, depth).
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

TASKS = ("passkey", "multikey", "mqar")

PASSKEY_NEEDLE = "\nThe pass key is {value}. Remember it.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
MULTIKEY_NEEDLE = "\nThe code for {key} is {value}.\n"
MULTIKEY_QUESTION = "\nWhat is the code for {key}? The code for {key} is"
MULTIKEY_WORDS = (
    "apple", "river", "tiger", "cloud", "stone", "maple", "eagle", "piano", "lemon", "ocean",
    "delta", "amber", "falcon", "cedar", "comet", "violet", "harbor", "willow", "copper", "canyon",
    "otter", "quartz", "saffron", "tundra", "walnut", "zephyr", "bison", "coral", "ember", "fjord",
)
MQAR_HEADER = "key:value pairs:\n"
MQAR_LOOKUP = "\nlookups:"
MIN_FILLER = 16  # bytes of filler a passkey / multikey prompt must keep at least


# ---------------------------------------------------------------------------------------
# examples


@dataclass
class Example:
    task: str
    prompt: str  # ASCII; len(prompt) == context_length bytes
    answer: str  # what the model must produce (after ``prefix``), e.g. "48213"
    context_length: int
    depth: float
    seed: int = 0
    index: int = 0
    meta: dict = field(default_factory=dict)  # needle offsets, keys, ...
    prefix: str = " "  # what precedes the answer in the ideal continuation ("" for mqar: "abc:123")

    @property
    def prompt_bytes(self) -> bytes:
        return self.prompt.encode("ascii")

    @property
    def target(self) -> str:
        """The ideal greedy continuation: ``prefix`` (a space, none for mqar) then the answer."""
        return self.prefix + self.answer

    def to_dict(self) -> dict:
        return {"task": self.task, "answer": self.answer, "context_length": self.context_length,
                "depth": self.depth, "seed": self.seed, "index": self.index, "meta": self.meta}


# ---------------------------------------------------------------------------------------
# filler


def _printable_ascii(data: bytes) -> str:
    """Bytes outside printable ASCII (plus tab / newline) become spaces."""
    table = bytes(b if (32 <= b < 127 or b in (9, 10)) else 32 for b in range(256))
    return data.translate(table).decode("ascii")


def fallback_text(n_chars: int = 200_000, seed: int = 0) -> str:
    """Deterministic pseudo-English filler (no digits), about ``n_chars`` characters."""
    words = ("the", "a", "grass", "sky", "is", "green", "blue", "and", "here", "we", "go", "there",
             "back", "again", "of", "to", "sun", "warm", "hills", "walk", "long", "day", "rain", "wind",
             "quiet", "town", "road", "river", "light", "old", "new", "under", "over", "near", "far")
    rnd = random.Random(seed)
    parts, n = [], 0
    while n < n_chars:
        sentence = " ".join(rnd.choice(words) for _ in range(rnd.randint(6, 14)))
        sentence = sentence[0].upper() + sentence[1:] + (".\n" if rnd.random() < 0.2 else ". ")
        parts.append(sentence)
        n += len(sentence)
    return "".join(parts)


class Filler:
    """A source of filler text: windows of ``text`` at random offsets (wrapping around)."""

    def __init__(self, text: str, name: str = "custom"):
        text = _printable_ascii(text.encode("utf-8", errors="replace")) if not text.isascii() else text
        if not text:
            raise ValueError("filler text is empty")
        self.text = text
        self.name = name

    def sample(self, rng: random.Random, n: int) -> str:
        if n <= 0:
            return ""
        start = rng.randrange(len(self.text))
        reps = (start + n) // len(self.text) + 1
        return (self.text * reps)[start : start + n]

    def __repr__(self) -> str:
        return f"Filler({self.name!r}, {len(self.text)} chars)"


@functools.lru_cache(maxsize=2)
def default_filler(max_chars: int = 2_000_000, split: str = "val") -> Filler:
    """The embedded corpus's held-out split (``split="train"`` for training corpora: keeps the
    validation split unseen), cached; else the deterministic fallback text."""
    try:
        from .data import build_stdlib_corpus

        data = build_stdlib_corpus(min_tokens=0)
        tokens = data.val if split == "val" else data.train
        raw = bytes(tokens[:max_chars])
        return Filler(_printable_ascii(raw), name=f"stdlib-{split}:{data.data_hash[:12]}")
    except Exception:  # noqa: BLE001 - no corpus here: the fallback keeps everything offline
        return Filler(fallback_text(), name="fallback")


def as_filler(filler: Filler | str | None) -> Filler:
    if filler is None:
        return default_filler()
    if isinstance(filler, Filler):
        return filler
    return Filler(filler)


def _rng(seed: int, task: str, length: int, depth: float, index: int) -> random.Random:
    return random.Random(f"{seed}|{task}|{length}|{depth!r}|{index}")


def _check(length: int, depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if length <= 0:
        raise ValueError(f"context_length must be positive, got {length}")


def _insert(filler: str, items: list[tuple[int, str]]) -> tuple[str, list[int]]:
    """Insert needle strings at filler offsets; returns the text and each needle's start offset."""
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    out, starts, prev, shift = [], [0] * len(items), 0, 0
    for i in order:
        pos, s = items[i]
        out.append(filler[prev:pos])
        starts[i] = pos + shift
        out.append(s)
        shift += len(s)
        prev = pos
    out.append(filler[prev:])
    return "".join(out), starts


# ---------------------------------------------------------------------------------------
# generators


def passkey(context_length: int, depth: float, seed: int = 0, index: int = 0,
            filler: Filler | str | None = None, digits: int = 5) -> Example:
    """A pass key hidden at ``depth`` of ``context_length`` bytes of filler."""
    _check(context_length, depth)
    fill = as_filler(filler)
    rng = _rng(seed, "passkey", context_length, depth, index)
    value = str(rng.randrange(10 ** (digits - 1), 10**digits))
    needle = PASSKEY_NEEDLE.format(value=value)
    n_fill = context_length - len(needle) - len(PASSKEY_QUESTION)
    if n_fill < MIN_FILLER:
        raise ValueError(f"context_length {context_length} is too short for a passkey prompt")
    pattern = re.compile(r"pass key is (\d+)")
    for _ in range(20):  # resample filler that happens to contain the needle's pattern
        text = fill.sample(rng, n_fill)
        pos = round(depth * n_fill)
        hay, (start,) = _insert(text, [(pos, needle)])
        if pattern.findall(hay) == [value]:
            break
    else:  # pragma: no cover - a filler full of pass keys
        raise ValueError("the filler text keeps containing 'pass key is <digits>'")
    prompt = hay + PASSKEY_QUESTION
    return Example("passkey", prompt, value, context_length, depth, seed, index,
                   {"needle_offset": start, "haystack_length": len(hay), "filler": fill.name})


def multikey(context_length: int, depth: float, seed: int = 0, index: int = 0,
             filler: Filler | str | None = None, n_keys: int = 4, digits: int = 4) -> Example:
    """``n_keys`` "code for <word>" needles (fewer when they do not fit); the queried one at ``depth``.

    The other needles sit at random depths. ``meta["n_keys"]`` records how many were used.
    """
    _check(context_length, depth)
    fill = as_filler(filler)
    rng = _rng(seed, "multikey", context_length, depth, index)
    keys = rng.sample(MULTIKEY_WORDS, min(n_keys, len(MULTIKEY_WORDS)))
    values = rng.sample(range(10 ** (digits - 1), 10**digits), len(keys))
    needles = [MULTIKEY_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
    question = MULTIKEY_QUESTION.format(key=keys[0])
    while len(needles) > 1 and context_length - sum(map(len, needles)) - len(question) < MIN_FILLER:
        keys, values, needles = keys[:-1], values[:-1], needles[:-1]
    n_fill = context_length - sum(map(len, needles)) - len(question)
    if n_fill < MIN_FILLER:
        raise ValueError(f"context_length {context_length} is too short for a multikey prompt")
    for _ in range(20):
        text = fill.sample(rng, n_fill)
        positions = [round(depth * n_fill)] + [rng.randrange(n_fill + 1) for _ in needles[1:]]
        hay, starts = _insert(text, list(zip(positions, needles, strict=True)))
        ok = all(re.findall(rf"code for {k} is (\d+)", hay) == [str(v)] for k, v in zip(keys, values, strict=True))
        if ok:
            break
    else:  # pragma: no cover
        raise ValueError("the filler text keeps containing 'code for <key> is <digits>'")
    prompt = hay + question
    return Example("multikey", prompt, str(values[0]), context_length, depth, seed, index,
                   {"needle_offset": starts[0], "haystack_length": len(hay), "n_keys": len(keys),
                    "keys": keys, "query_key": keys[0], "filler": fill.name})


def mqar(context_length: int, depth: float, seed: int = 0, index: int = 0,
         filler: Filler | str | None = None, n_queries: int = 4) -> Example:
    """Multi-query associative recall: ``abc:123`` pairs, then ``n_queries`` lookups.

    The first ``n_queries - 1`` lookups are answered in the prompt; the last one (whose pair
    sits at ``depth`` of the pair list) is the question. ``filler`` is unused (the pairs fill
    the context); it is accepted for a uniform signature.
    """
    _check(context_length, depth)
    rng = _rng(seed, "mqar", context_length, depth, index)
    pair_len = len("abc:123 ")
    query_len = len(" abc:123")
    fixed = len(MQAR_HEADER) + len(MQAR_LOOKUP) + (n_queries - 1) * query_len + len(" abc:")
    n_pairs = (context_length - fixed) // pair_len
    if n_pairs < n_queries:
        raise ValueError(f"context_length {context_length} is too short for {n_queries} mqar lookups")
    letters = "abcdefghijklmnopqrstuvwxyz"
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < n_pairs:
        k = "".join(rng.choice(letters) for _ in range(3))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = [str(rng.randrange(100, 1000)) for _ in range(n_pairs)]
    target = round(depth * (n_pairs - 1))
    others = rng.sample([i for i in range(n_pairs) if i != target], n_queries - 1)
    pairs = "".join(f"{k}:{v} " for k, v in zip(keys, values, strict=True))
    pad = context_length - fixed - len(pairs)
    lookups = "".join(f" {keys[i]}:{values[i]}" for i in others) + f" {keys[target]}:"
    prompt = MQAR_HEADER + pairs + " " * pad + MQAR_LOOKUP + lookups
    offset = len(MQAR_HEADER) + target * pair_len
    return Example("mqar", prompt, values[target], context_length, depth, seed, index,
                   {"needle_offset": offset, "haystack_length": len(MQAR_HEADER) + len(pairs),
                    "n_pairs": n_pairs, "query_key": keys[target], "pair_index": target}, prefix="")


GENERATORS: dict[str, Callable[..., Example]] = {"passkey": passkey, "multikey": multikey, "mqar": mqar}


def generate(task: str, context_length: int, depth: float, seed: int = 0, index: int = 0,
             filler: Filler | str | None = None, **kwargs) -> Example:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return GENERATORS[task](context_length, depth, seed=seed, index=index, filler=filler, **kwargs)


def make_suite(tasks: Iterable[str] = TASKS, lengths: Iterable[int] = (256,),
               depths: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0), n_per_cell: int = 2, seed: int = 0,
               filler: Filler | str | None = None) -> tuple[list[Example], list[dict]]:
    """Examples for every (task, length, depth) cell; cells whose length is too short are
    skipped and returned as ``[{"task", "context_length", "reason"}]``."""
    fill = None
    examples, skipped = [], []
    for task in tasks:
        if task != "mqar" and fill is None:
            fill = as_filler(filler)
        for length in lengths:
            for depth in depths:
                try:
                    examples += [generate(task, length, float(depth), seed, i, fill) for i in range(n_per_cell)]
                except ValueError as exc:
                    skipped.append({"task": task, "context_length": length, "depth": depth, "reason": str(exc)})
    return examples, skipped


# ---------------------------------------------------------------------------------------
# scoring


def normalize(prediction: str) -> str:
    """First whitespace-separated word of the prediction, trailing ``.,;`` removed."""
    words = prediction.split()
    return words[0].rstrip(".,;") if words else ""


def is_correct(prediction: str, answer: str) -> bool:
    return normalize(prediction) == answer


def score(predictions: Sequence[str], examples: Sequence[Example]) -> dict:
    """Exact-match accuracy: overall, per task, per (context length, depth) and per (task,
    context length, depth). Accuracies are fractions in [0, 1]."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    cells: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    tasks: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    task_cells: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    correct = 0
    for pred, ex in zip(predictions, examples, strict=True):
        ok = int(is_correct(pred, ex.answer))
        correct += ok
        for acc in (cells[(ex.context_length, ex.depth)], tasks[ex.task],
                    task_cells[(ex.task, ex.context_length, ex.depth)]):
            acc[0] += ok
            acc[1] += 1
    n = len(examples)
    return {
        "accuracy": correct / n if n else float("nan"),
        "correct": correct,
        "n": n,
        "by_task": {t: {"accuracy": c / m, "correct": c, "n": m} for t, (c, m) in sorted(tasks.items())},
        "by_length_depth": [{"context_length": L, "depth": d, "accuracy": c / m, "correct": c, "n": m}
                            for (L, d), (c, m) in sorted(cells.items())],
        "by_task_length_depth": [{"task": t, "context_length": L, "depth": d, "accuracy": c / m, "correct": c,
                                  "n": m} for (t, L, d), (c, m) in sorted(task_cells.items())],
    }


# ---------------------------------------------------------------------------------------
# training corpora (mixing task data into a run without touching the trainer)


def write_corpus(out_dir, n_examples: int, tasks: Iterable[str] = TASKS, lengths: Iterable[int] = (256,),
                 seed: int = 1000, filler: Filler | str | None = None, n_files: int = 8) -> dict:
    """Write ``n_examples`` solved task examples (prompt + " " + answer + newline) as text files
    ``tasks_NNN.txt`` under ``out_dir``, for ``python -m scaling_runs.train --data out_dir``.

    Task, length and depth (uniform in [0, 1]) are drawn per example from
    ``random.Random(f"corpus|{seed}")``; the default filler is the embedded corpus's
    *training* split, so the runs' held-out loss stays clean. Use a seed other than the
    evaluation seed. Returns a summary dict.
    """
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fill = as_filler(filler) if filler is not None else default_filler(split="train")
    tasks, lengths = list(tasks), list(lengths)
    rng = random.Random(f"corpus|{seed}")
    docs: list[list[str]] = [[] for _ in range(n_files)]
    counts: dict[str, int] = defaultdict(int)
    made = 0
    for i in range(n_examples * 4):
        if made == n_examples:
            break
        task, length, depth = rng.choice(tasks), rng.choice(lengths), round(rng.random(), 4)
        try:
            ex = generate(task, length, depth, seed=seed, index=i, filler=fill)
        except ValueError:
            continue
        docs[made % n_files].append(ex.prompt + ex.target + "\n")
        counts[task] += 1
        made += 1
    for j, parts in enumerate(docs):
        (out / f"tasks_{j:03d}.txt").write_text("".join(parts))
    return {"out": str(out), "examples": made, "by_task": dict(counts), "lengths": lengths, "seed": seed,
            "filler": fill.name, "files": n_files}


# ---------------------------------------------------------------------------------------
# short-answer tasks (issue 16): one byte to answer, learnable by tiny models on CPU

SHORT_TASKS = ("needle", "multineedle")
NEEDLE_ALPHABET = "abcdefghijklmnopqrstuvwxyz "  # filler bytes: no digits (and no upper case)
DIGITS = "0123456789"
KEY_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _check_alphabet(alphabet: str) -> None:
    if not alphabet or not alphabet.isascii():
        raise ValueError(f"alphabet must be non-empty ASCII, got {alphabet!r}")
    bad = sorted(set(alphabet) & set(DIGITS + KEY_LETTERS + "?"))
    if bad:
        raise ValueError(f"alphabet must not contain digits, upper-case letters or '?', got {''.join(bad)!r}")


def needle(context_length: int, depth: float, seed: int = 0, index: int = 0, filler=None,
           alphabet: str = NEEDLE_ALPHABET) -> Example:
    """One-hop needle: ``context_length - 2`` filler bytes (from ``alphabet``, no digits), one
    digit inserted at ``depth``, then ``"?"``; the answer is the digit (prompt = context_length bytes).

    ``filler`` is accepted for a uniform signature and unused (the filler is random letters).
    """
    _check(context_length, depth)
    _check_alphabet(alphabet)
    n_fill = context_length - 2
    if n_fill < 1:
        raise ValueError(f"context_length must be >= 3 for a needle prompt, got {context_length}")
    rng = _rng(seed, "needle", context_length, depth, index)
    digit = rng.choice(DIGITS)
    text = "".join(rng.choice(alphabet) for _ in range(n_fill))
    pos = round(depth * n_fill)
    prompt = text[:pos] + digit + text[pos:] + "?"
    return Example("needle", prompt, digit, context_length, depth, seed, index,
                   {"needle_offset": pos, "n_filler": n_fill}, prefix="")


def multineedle(context_length: int, depth: float, seed: int = 0, index: int = 0, filler=None,
                n_needles: int = 4, alphabet: str = NEEDLE_ALPHABET) -> Example:
    """Multi-needle (associative) variant: ``n_needles`` pairs ``<upper-case key><digit>`` in
    random non-digit filler, distinct keys; the prompt ends with ``"?" + key`` of the queried
    pair (which sits at ``depth``; the others at random positions) and the answer is its digit.

    Needles never touch each other (one filler byte at least between two), so every key is
    followed by its own digit. Prompt = ``context_length`` bytes.
    """
    _check(context_length, depth)
    _check_alphabet(alphabet)
    if not 1 <= n_needles <= len(KEY_LETTERS):
        raise ValueError(f"n_needles must be in [1, {len(KEY_LETTERS)}], got {n_needles}")
    n_fill = context_length - 2 - 2 * n_needles
    if n_fill < n_needles + 1:
        raise ValueError(f"context_length {context_length} is too short for {n_needles} needles")
    rng = _rng(seed, "multineedle", context_length, depth, index)
    keys = rng.sample(KEY_LETTERS, n_needles)
    digits = [rng.choice(DIGITS) for _ in keys]
    text = "".join(rng.choice(alphabet) for _ in range(n_fill))
    # insertion points in the filler: distinct and not adjacent (1..n_fill-1 keeps a filler byte
    # on both sides of the set); the queried one as close to `depth` as that allows
    free = list(range(1, n_fill))
    target = min(free, key=lambda p: abs(p - depth * n_fill))
    points = [target]
    candidates = [p for p in free if abs(p - target) > 1]
    while len(points) < n_needles:
        p = rng.choice(candidates)
        points.append(p)
        candidates = [c for c in candidates if abs(c - p) > 1]
    hay, starts = _insert(text, [(p, k + d) for p, k, d in zip(points, keys, digits, strict=True)])
    prompt = hay + "?" + keys[0]
    return Example("multineedle", prompt, digits[0], context_length, depth, seed, index,
                   {"needle_offset": starts[0], "n_needles": n_needles, "keys": keys, "query_key": keys[0]},
                   prefix="")


GENERATORS["needle"] = needle
GENERATORS["multineedle"] = multineedle


def n_filler_to_length(task: str, n_filler: int, n_needles: int = 4) -> int:
    """Prompt length (bytes) of a short-answer task with ``n_filler`` filler bytes."""
    if task == "needle":
        return n_filler + 2
    if task == "multineedle":
        return n_filler + 2 + 2 * n_needles
    raise ValueError(f"n_filler applies to {SHORT_TASKS}, not {task!r}")


def sample_examples(task: str, n: int, context_length: int, seed: int = 0, **opts) -> list[Example]:
    """``n`` examples of ``task`` at ``context_length``, depth uniform in [0, 1] per example
    (drawn from ``random.Random(f"sample|task|length|seed")``); index i is example i."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"sample|{task}|{context_length}|{seed}")
    return [generate(task, context_length, round(rng.random(), 6), seed=seed, index=i, **opts) for i in range(n)]


# ---------------------------------------------------------------------------------------
# solved examples as training data: example-aligned windows, answer-only loss


EXAMPLES_FILE = "examples.npz"
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


@dataclass
class ExampleSet:
    """Solved examples as one byte stream: example i is ``tokens[starts[i]:starts[i+1]]``
    (prompt then answer), its answer bytes are ``tokens[answer_start[i]:answer_end[i]]``."""

    tokens: np.ndarray  # (T,) uint8
    starts: np.ndarray  # (N,) int64
    answer_start: np.ndarray  # (N,) int64
    answer_end: np.ndarray  # (N,) int64
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.starts.size)

    @classmethod
    def from_examples(cls, examples: Sequence[Example], info: dict | None = None) -> ExampleSet:
        if not examples:
            raise ValueError("no examples")
        parts, starts, a0, a1, pos = [], [], [], [], 0
        for ex in examples:
            prompt, target = ex.prompt_bytes, ex.target.encode("ascii")
            starts.append(pos)
            a0.append(pos + len(prompt))
            a1.append(pos + len(prompt) + len(target))
            parts.append(prompt + target)
            pos += len(prompt) + len(target)
        tokens = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
        as64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        return cls(tokens, as64(starts), as64(a0), as64(a1), dict(info or {}))

    def save(self, path) -> None:
        import io
        import json as _json

        from .checkpoint import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, tokens=self.tokens, starts=self.starts, answer_start=self.answer_start,
                 answer_end=self.answer_end, info=np.array(_json.dumps(self.info)))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path) -> ExampleSet:
        import json as _json

        with np.load(path) as z:
            return cls(z["tokens"], z["starts"], z["answer_start"], z["answer_end"], _json.loads(str(z["info"])))

    def data_hash(self) -> str:
        """sha256 of the stream and the example / answer boundaries."""
        import hashlib

        h = hashlib.sha256()
        for a in (self.tokens, self.starts, self.answer_start, self.answer_end):
            h.update(np.ascontiguousarray(a).view(np.uint8))
            h.update(b"|")
        return h.hexdigest()

    def answer_mask(self) -> np.ndarray:
        """(T,) bool: True at every answer byte of the stream."""

        delta = np.zeros(self.tokens.size + 1, dtype=np.int64)
        np.add.at(delta, self.answer_start, 1)
        np.add.at(delta, self.answer_end, -1)
        return np.cumsum(delta[:-1]) > 0


def example_batch(ex: ExampleSet, context: int, batch: int, seed: int, step: int, start: int = 0,
                  stop: int | None = None, mask: np.ndarray | None = None):
    """Rows ``start:stop`` of the global batch of ``step``: windows of ``context + 1`` stream bytes
    that each begin at an example's first byte (examples chosen by ``(seed, step)``, the stream
    wraps around at its end). Returns ``x, y`` int64 (B, context); ``y`` is ``IGNORE_INDEX``
    everywhere but at answer bytes, so the mean cross-entropy is the answer-only loss.
    ``mask``: ``ex.answer_mask()`` precomputed (it is recomputed otherwise).
    """
    import torch

    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got {context}, {batch}")
    mask = ex.answer_mask() if mask is None else mask
    pick = np.random.default_rng([seed, step, 16]).integers(0, len(ex), size=batch)[start:stop]
    idx = ex.starts[pick, None] + np.arange(context + 1)[None, :]
    seq = np.take(ex.tokens, idx, mode="wrap").astype(np.int64)
    keep = np.take(mask, idx, mode="wrap")
    x = torch.from_numpy(seq[:, :-1].copy())
    y = torch.from_numpy(np.where(keep[:, 1:], seq[:, 1:], IGNORE_INDEX))
    return x, y


def write_examples(out_path, task: str, n: int, context_length: int, seed: int = 1000, **opts) -> dict:
    """Write ``n`` solved ``task`` examples (``sample_examples``) to an ``.npz`` for
    ``scaling_runs.train --mix PATH.npz`` (example-aligned windows, answer-only loss).
    Use a seed other than the evaluation seed. Returns a summary dict."""
    from pathlib import Path

    examples = sample_examples(task, n, context_length, seed, **opts)
    distinct = len({e.prompt for e in examples})
    info = {"task": task, "examples": n, "distinct_prompts": distinct, "context_length": context_length,
            "seed": seed, "options": opts}
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ExampleSet.from_examples(examples, info).save(path)
    return {"out": str(path), **info}


def _alphabet(text: str) -> str:
    """``--alphabet``: filler bytes, at least two, no digits or upper case (the answers use those)."""
    if len(set(text)) < 2 or any(c.isdigit() or c.isupper() for c in text) or not text.isascii():
        raise ValueError(f"expected at least two ASCII characters, no digits or upper case, got {text!r}")
    return text


def build_parser():
    from moba._core import cli

    from .cli import Parser

    p = Parser(
        "python -m scaling_runs.tasks",
        "Write training data of solved task examples. Long tasks (passkey, multikey, mqar): "
                    "text files in OUT (see write_corpus). Short-answer tasks (needle, multineedle): "
                    "OUT/examples.npz (or OUT itself when it ends in .npz) for `train --mix PATH.npz` "
                    "(example-aligned windows, answer-only loss; see write_examples).")
    p.add_argument("out_dir", help="output folder (or an .npz path for short-answer tasks)")
    p.add_argument("--n", type=cli.positive_int, default=2000, help="examples")
    p.add_argument("--tasks", type=cli.names(TASKS + SHORT_TASKS, "task"), default=list(TASKS),
                   help=f"comma-separated, from {','.join(TASKS + SHORT_TASKS)}; a short-answer task goes alone")
    p.add_argument("--lengths", type=cli.size_list, default=[256],
                   help="prompt lengths in bytes, comma-separated (one for short tasks)")
    p.add_argument("--n_filler", type=cli.positive_int, default=None,
                   help="short tasks: filler bytes instead of --lengths (needle: prompt = n_filler + 2 bytes)")
    p.add_argument("--n_needles", type=cli.positive_int, default=4, help="multineedle: key/digit pairs per prompt")
    p.add_argument("--alphabet", type=cli.checked(_alphabet), default=NEEDLE_ALPHABET,
                   help="short tasks: filler bytes (no digits / upper case)")
    p.add_argument("--seed", type=int, default=1000, help="random seed of the generated examples")
    p.add_argument("--files", type=cli.positive_int, default=8, help="long tasks: text files the examples are spread over")
    p.add_argument("--filler", type=cli.existing_file, default=None,
                   help="text file for the filler (default: embedded corpus, train split)")
    return p


def main(argv: list[str] | None = None) -> None:
    import json
    from pathlib import Path

    p = build_parser()
    a = p.parse_args(argv)
    tasks = a.tasks
    short = [t for t in tasks if t in SHORT_TASKS]
    if short:
        if len(tasks) != 1:
            p.error(f"a short-answer task ({', '.join(short)}) must be the only --tasks entry")
        task = tasks[0]
        opts = {"alphabet": a.alphabet} | ({"n_needles": a.n_needles} if task == "multineedle" else {})
        if a.n_filler is not None:
            length = n_filler_to_length(task, a.n_filler, a.n_needles)
        else:
            if len(a.lengths) != 1:
                p.error("short-answer tasks take one --lengths value (or --n_filler)")
            length = a.lengths[0]
        out = Path(a.out_dir)
        out = out if out.suffix == ".npz" else out / EXAMPLES_FILE
        print(json.dumps(write_examples(out, task, a.n, length, a.seed, **opts)))
        return
    filler = Filler(Path(a.filler).read_text(errors="replace"), name=a.filler) if a.filler else None
    info = write_corpus(a.out_dir, a.n, tasks, a.lengths, a.seed, filler, a.files)
    print(json.dumps(info))


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "scaling_runs.tasks"))


# ---------------------------------------------------------------------------------------
# a language-modelling corpus with long-range structure (issue 16, the cpu-study preset)

RECALL_MEMBER_BASE = 0x80  # member bytes: RECALL_MEMBER_BASE + group * group_size + member
RECALL_CUE_BASE = 0xE0  # cue bytes: RECALL_CUE_BASE + group (never in the ASCII filler)


@dataclass(frozen=True)
class RecallSpec:
    """Shape of a recall document (``recall_documents``).

    A document is ``doc_len`` bytes of ASCII filler text. In its first ``member_span`` bytes one
    *member* byte of each of ``n_groups`` groups (``group_size`` members per group, bytes
    ``0x80 + g * group_size + m``) replaces a filler byte at a random position; in its last
    ``query_span`` bytes every group is queried once, in random order: a *cue* byte ``0xE0 + g``
    followed by that document's member of group g. The answer byte is predictable only by
    attending from the cue back to the member (one hop, content-based, ``query_span`` to
    ``doc_len`` bytes away): without it, the best guess costs ``ln(group_size)`` nats.

    ``filler``: "stdlib" (the embedded corpus's text), "random" (bytes drawn uniformly from
    ``NEEDLE_ALPHABET``: nothing to learn in them beyond their frequencies, so the recall is
    the only structure left, as in the needle task) or "topic" (every document draws its bytes
    uniformly from its own random subset of ``topic_size`` lower-case letters: the bytes seen
    anywhere earlier in the document tell which letters come next, ``ln(topic_size)`` nats per
    byte for a model that knows the subset against ``ln(26)`` for one that does not; a window
    that crosses into the next document must stop using the previous one's bytes).
    ``n_groups = 0``: no recall pairs. ``plain_fraction``: share of documents that are plain
    stdlib text of the same length, without synthetic structure (a mix of natural text and the
    synthetic long-range component).
    """

    doc_len: int = 448
    member_span: int = 192
    query_span: int = 128
    n_groups: int = 8
    group_size: int = 8
    filler: str = "stdlib"
    plain_fraction: float = 0.0
    topic_size: int = 8

    def __post_init__(self):
        if self.n_groups < 0 or self.group_size < 1:
            raise ValueError(f"n_groups must be >= 0 and group_size >= 1, got {self.n_groups}, {self.group_size}")
        if RECALL_MEMBER_BASE + self.n_groups * self.group_size > RECALL_CUE_BASE:
            raise ValueError(f"n_groups * group_size must be <= {RECALL_CUE_BASE - RECALL_MEMBER_BASE}, "
                             f"got {self.n_groups * self.group_size}")
        if RECALL_CUE_BASE + self.n_groups > 256:
            raise ValueError(f"n_groups must be <= {256 - RECALL_CUE_BASE}, got {self.n_groups}")
        if self.member_span < self.n_groups:
            raise ValueError(f"member_span ({self.member_span}) must be >= n_groups ({self.n_groups})")
        if self.n_groups and self.query_span < 2 * self.n_groups + 1:
            raise ValueError(f"query_span ({self.query_span}) must be >= 2 * n_groups + 1")
        if self.filler not in ("stdlib", "random", "topic"):
            raise ValueError(f"filler must be 'stdlib', 'random' or 'topic', got {self.filler!r}")
        if self.filler == "topic" and not 1 <= self.topic_size <= 26:
            raise ValueError(f"topic_size must be in [1, 26], got {self.topic_size}")
        if not 0.0 <= self.plain_fraction < 1.0:
            raise ValueError(f"plain_fraction must be in [0, 1), got {self.plain_fraction}")
        if self.member_span + self.query_span > self.doc_len:
            raise ValueError(f"member_span + query_span ({self.member_span + self.query_span}) must be "
                             f"<= doc_len ({self.doc_len})")


def recall_documents(n_docs: int, spec: RecallSpec, filler: Filler, seed: int) -> np.ndarray:
    """``n_docs`` recall documents (``RecallSpec``), each followed by a 0 byte: (n_docs * (doc_len + 1),) uint8.

    Deterministic in (n_docs, spec, filler text, seed).
    """
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    rng = np.random.default_rng([seed, spec.doc_len, spec.n_groups, spec.group_size])
    text = np.frombuffer(filler.text.encode("ascii"), dtype=np.uint8)
    reps = -(-(spec.doc_len + 1) // text.size) + 1
    text = np.tile(text, reps) if reps > 1 else text
    out = np.zeros((n_docs, spec.doc_len + 1), dtype=np.uint8)  # last column: the 0 separator
    starts = rng.integers(0, text.size - spec.doc_len, size=n_docs)
    groups = np.arange(spec.n_groups)
    q_slots = np.arange(spec.doc_len - spec.query_span, spec.doc_len - 1, 2)  # pairs never overlap
    alphabet = np.frombuffer(NEEDLE_ALPHABET.encode("ascii"), dtype=np.uint8)
    letters = np.arange(ord("a"), ord("z") + 1, dtype=np.uint8)
    plain = rng.random(n_docs) < spec.plain_fraction
    for i in range(n_docs):
        doc = out[i]
        doc[: spec.doc_len] = text[starts[i] : starts[i] + spec.doc_len]
        if plain[i]:
            continue
        if spec.filler == "random":
            doc[: spec.doc_len] = alphabet[rng.integers(0, alphabet.size, spec.doc_len)]
        elif spec.filler == "topic":
            topic = rng.choice(letters, spec.topic_size, replace=False)
            doc[: spec.doc_len] = topic[rng.integers(0, spec.topic_size, spec.doc_len)]
        if not spec.n_groups:
            continue
        members = RECALL_MEMBER_BASE + groups * spec.group_size + rng.integers(0, spec.group_size, spec.n_groups)
        doc[rng.choice(spec.member_span, spec.n_groups, replace=False)] = members
        order = rng.permutation(spec.n_groups)
        at = np.sort(rng.choice(q_slots, spec.n_groups, replace=False))
        doc[at] = RECALL_CUE_BASE + order
        doc[at + 1] = members[order]
    return out.reshape(-1)


def write_recall_corpus(out_dir, train_tokens: int, val_tokens: int, spec: RecallSpec | None = None,
                        seed: int = 0) -> dict:
    """llm.c shards ``OUT/train.bin`` and ``OUT/val.bin`` of recall documents for ``--data OUT``.

    Filler: the embedded corpus's train split for train.bin, its validation split for val.bin
    (so validation text is unseen). Returns a description (also written to ``OUT/recall.json``).
    An existing corpus with the same description is kept (the shards are deterministic).
    """
    import json
    from pathlib import Path

    from .data import write_shard

    spec = spec or RecallSpec()
    out = Path(out_dir)
    info = {"format": "recall documents (scaling_runs.tasks.recall_documents)", "spec": spec.__dict__,
            "seed": seed, "train_tokens": 0, "val_tokens": 0}
    per_doc = spec.doc_len + 1
    n_train, n_val = -(-train_tokens // per_doc), -(-val_tokens // per_doc)
    info.update(train_tokens=n_train * per_doc, val_tokens=n_val * per_doc)
    meta = out / "recall.json"
    if meta.exists() and json.loads(meta.read_text()).get("request") == info and (out / "train.bin").exists():
        return json.loads(meta.read_text())
    out.mkdir(parents=True, exist_ok=True)
    train_fill, val_fill = default_filler(4_000_000, "train"), default_filler(2_000_000, "val")
    write_shard(out / "train.bin", recall_documents(n_train, spec, train_fill, seed))
    write_shard(out / "val.bin", recall_documents(n_val, spec, val_fill, seed + 1))
    full = {"request": info, **info, "filler": {"train": train_fill.name, "val": val_fill.name},
            "answer_bytes_per_doc": spec.n_groups, "doc_bytes": per_doc,
            "nats_per_answer_without_recall": math.log(spec.group_size)}
    meta.write_text(json.dumps(full, indent=2))
    return full
