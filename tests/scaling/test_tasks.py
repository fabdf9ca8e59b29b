"""Synthetic long-context tasks (scaling_runs.tasks): determinism, recoverable answers,
lengths / depths as requested, exact-match scoring."""

from __future__ import annotations

import re

import pytest

from scaling_runs import tasks as T

FILLER = T.Filler(
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n" * 3,
    name="tiny",
)
LENGTHS = (160, 300, 1000)
DEPTHS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _gen(task, length, depth, seed=0, index=0):
    return T.generate(task, length, depth, seed=seed, index=index, filler=FILLER)


@pytest.mark.parametrize("task", T.TASKS)
def test_deterministic_by_seed(task):
    a, b = _gen(task, 400, 0.3, seed=5), _gen(task, 400, 0.3, seed=5)
    assert a.prompt_bytes == b.prompt_bytes and a.answer == b.answer and a.meta == b.meta
    others = [_gen(task, 400, 0.3, seed=6), _gen(task, 400, 0.3, seed=5, index=1)]
    for c in others:
        assert c.prompt_bytes != a.prompt_bytes


def _recover(ex: T.Example) -> list[str]:
    """Brute force: every value the prompt's haystack states for the asked key."""
    hay = ex.prompt[: ex.meta["haystack_length"]]
    if ex.task == "passkey":
        assert ex.prompt.endswith("What is the pass key? The pass key is")
        return re.findall(r"pass key is (\d+)", hay)
    if ex.task == "multikey":
        key = re.search(r"What is the code for (\w+)\? The code for \1 is$", ex.prompt).group(1)
        return re.findall(rf"code for {key} is (\d+)", hay)
    key = re.search(r" ([a-z]{3}):$", ex.prompt).group(1)
    return re.findall(rf"\b{key}:(\d+)", hay)


@pytest.mark.parametrize("task", T.TASKS)
def test_answer_recoverable_length_and_depth(task):
    for length in LENGTHS:
        for depth in DEPTHS:
            ex = _gen(task, length, depth, seed=length)
            assert ex.task == task and ex.context_length == length and ex.depth == depth
            assert len(ex.prompt_bytes) == length  # exactly the requested length, ASCII
            assert _recover(ex) == [ex.answer]
            assert ex.answer.isdigit() and ex.target == ("" if task == "mqar" else " ") + ex.answer
            # the queried needle starts where meta says, at the requested relative depth
            off, hay = ex.meta["needle_offset"], ex.meta["haystack_length"]
            if task == "passkey":
                needle = T.PASSKEY_NEEDLE.format(value=ex.answer)
                assert ex.prompt.find(needle) == off
                assert abs(off / (hay - len(needle)) - depth) < 0.01
            elif task == "multikey":
                key = ex.meta["query_key"]
                needle = T.MULTIKEY_NEEDLE.format(key=key, value=ex.answer)
                assert ex.prompt.find(needle) == off
                others = sum(len(T.MULTIKEY_NEEDLE.format(key=k, value="0000")) for k in ex.meta["keys"][1:])
                tol = others / hay + 0.01  # the other needles shift it by at most their length
                assert abs(off / (hay - len(needle)) - depth) <= tol
                assert ex.meta["n_keys"] >= 2
            else:
                assert ex.prompt[off:].startswith(f"{ex.meta['query_key']}:{ex.answer} ")
                head = len(T.MQAR_HEADER)
                n = ex.meta["n_pairs"]
                assert (hay - head) // 8 == n and (off - head) % 8 == 0
                assert abs((off - head) / 8 / (n - 1) - depth) <= 0.5 / (n - 1) + 1e-9
                # several lookups, all but the last answered correctly
                lookups = ex.prompt.split(T.MQAR_LOOKUP)[1].split()
                assert len(lookups) == 4
                for item in lookups[:-1]:
                    k, v = item.split(":")
                    assert re.findall(rf"\b{k}:(\d+)", ex.prompt[:hay]) == [v]


def test_filler_comes_from_the_source_and_bad_inputs():
    ex = _gen("passkey", 500, 0.5)
    hay = ex.prompt[: ex.meta["haystack_length"]].replace(T.PASSKEY_NEEDLE.format(value=ex.answer), "")
    assert hay in FILLER.text * 20
    with pytest.raises(ValueError):
        _gen("passkey", 500, 1.5)
    with pytest.raises(ValueError):
        _gen("passkey", 60, 0.5)
    with pytest.raises(ValueError):
        T.generate("nope", 500, 0.5)
    text = T.fallback_text(5000)
    assert text == T.fallback_text(5000) and not any(c.isdigit() for c in text) and text.isascii()
    # a filler that contains the needle's pattern is resampled, never yields two pass keys
    tricky = T.Filler("bla bla. The pass key is 11111. bla bla bla bla bla bla bla bla bla bla bla. " * 2 +
                      "x" * 5000)
    for i in range(5):
        e = T.passkey(300, 0.5, seed=1, index=i, filler=tricky)
        assert re.findall(r"pass key is (\d+)", e.prompt) == [e.answer]


def test_make_suite_cells_and_skips():
    examples, skipped = T.make_suite(T.TASKS, (80, 300), (0.0, 1.0), n_per_cell=2, seed=3, filler=FILLER)
    cells = {(e.task, e.context_length, e.depth) for e in examples}
    assert ("passkey", 300, 1.0) in cells and ("mqar", 300, 0.0) in cells
    assert len(examples) == 2 * len(cells)
    assert {(s["task"], s["context_length"]) for s in skipped} >= {("passkey", 80)}


def test_score_exact_match_and_buckets():
    def ex(task, length, depth, answer):
        return T.Example(task, "x" * length, answer, length, depth)

    examples = [ex("passkey", 100, 0.0, "48213"), ex("passkey", 100, 0.0, "11111"),
                ex("passkey", 100, 1.0, "22222"), ex("mqar", 200, 0.0, "123"), ex("mqar", 200, 0.0, "456")]
    preds = [" 48213", " 11112", "22222. Remember", " 123\n", " 4567"]
    s = T.score(preds, examples)
    assert s["correct"] == 3 and s["n"] == 5 and s["accuracy"] == pytest.approx(0.6)
    cells = {(c["context_length"], c["depth"]): c for c in s["by_length_depth"]}
    assert cells[(100, 0.0)]["accuracy"] == 0.5 and cells[(100, 0.0)]["n"] == 2
    assert cells[(100, 1.0)]["accuracy"] == 1.0
    assert cells[(200, 0.0)]["accuracy"] == 0.5
    assert s["by_task"]["passkey"] == {"accuracy": 2 / 3, "correct": 2, "n": 3}
    assert T.is_correct(" 48213.", "48213") and not T.is_correct("4821", "48213") and not T.is_correct("", "1")
    with pytest.raises(ValueError):
        T.score(preds[:2], examples)


def test_write_corpus_is_training_text(tmp_path):
    from scaling_runs.config import DataConfig
    from scaling_runs.data import load_data

    info = T.write_corpus(tmp_path / "c", 40, lengths=(200, 300), seed=9, filler=FILLER, n_files=4)
    assert info["examples"] == 40 and sum(info["by_task"].values()) == 40
    text = "".join((tmp_path / "c" / f"tasks_{j:03d}.txt").read_text() for j in range(4))
    assert text.count("What is the pass key? The pass key is ") == info["by_task"].get("passkey", 0)
    assert re.findall(r"lookups:.* [a-z]{3}:(\d{3})\n", text) and not re.findall(r" [a-z]{3}: \d", text)
    T.write_corpus(tmp_path / "d", 40, lengths=(200, 300), seed=9, filler=FILLER, n_files=4)
    assert text == "".join((tmp_path / "d" / f"tasks_{j:03d}.txt").read_text() for j in range(4))
    data = load_data(DataConfig(data=str(tmp_path / "c")))
    assert data.vocab_size == 256 and data.train.size + data.val.size == len(text) + 4
