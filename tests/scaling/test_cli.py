"""The one command-line convention of the entry points (``scaling_runs.cli``, ``moba.demo``).

``--help`` anywhere on the line, an unknown option or a value of the wrong type is a usage
error (exit status 2, a suggestion, no traceback), every option has a help text that shows
its default, the config options come from the config dataclasses, and the commands the docs
tell users to type still parse. All cheap: nothing here trains except the ``--config`` round
trip (one step of a tiny model).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import signal

import pytest

import moba.demo
from scaling_runs import cli, config
from scaling_runs import train as T
from scaling_runs.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from tests._helpers import ROOT

# module -> arguments it needs before options (a positional), and a typo of one of its options
ENTRY_POINTS = {
    "scaling_runs.train": ([], "--n_layr", "--n_layer"),
    "scaling_runs.sweep": ([], "--dry-runn", "--dry_run"),
    "scaling_runs.demo": ([], "--outt", "--out"),
    "scaling_runs.budget_demo": ([], "--n_evall", "--n_eval"),
    "scaling_runs.eval_budget": (["."], "--budget", "--budgets"),
    "scaling_runs.fit": (["."], "--skip_fraction", "--skip_frac"),
    "scaling_runs.study": ([], "--jbs", "--jobs"),
    "scaling_runs.tasks": (["OUT"], "--sead", "--seed"),
    "moba.demo": ([], "--seq_length", "--seq_len"),
}


@pytest.fixture(autouse=True)
def _keep_sigterm():
    """``train.main`` / ``sweep.main`` install a SIGTERM handler: restore pytest's afterwards."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def run_main(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``module.main(argv)``, which must exit (help or usage error)."""
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


class _Captured(Exception):
    pass


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds (stopped at its first parse)."""
    if module == "moba.demo":
        return moba.demo.build_parser()

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    monkeypatch.setattr(cli.Parser, "parse_known_args", capture)
    positional = ENTRY_POINTS[module][0]
    with pytest.raises(_Captured) as exc:
        importlib.import_module(module).main([*positional, "--x"])
    return exc.value.args[0]


@pytest.mark.parametrize("module", ENTRY_POINTS)
@pytest.mark.parametrize("where", ["alone", "last", "after a bad value"])
def test_help_anywhere_on_the_line(module, where, capsys):
    positional, _typo, option = ENTRY_POINTS[module]
    argv = {"alone": ["--help"], "last": [*positional, "--help"],
            "after a bad value": [*positional, option, "not-a-value", "-h"]}[where]
    if module == "moba.demo" and where == "after a bad value":
        argv = ["--seq_len", "not-a-number", "--help"]  # plain argparse: help is read before the value
        with pytest.raises(SystemExit):
            moba.demo.main(argv)
        return
    code, out, _ = run_main(module, argv, capsys)
    assert code == 0 and out.startswith("usage:") and option in out


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_a_typo_is_a_usage_error_with_a_suggestion(module, capsys):
    positional, typo, option = ENTRY_POINTS[module]
    code, out, err = run_main(module, [*positional, typo, "1"], capsys)
    assert code == 2 and out == ""
    assert "usage:" in err and f"unrecognized arguments: {typo} 1" in err and "Traceback" not in err
    assert re.search(f"did you mean [^?]*{option}", err), err


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_option_has_help_that_shows_its_default(module, monkeypatch):
    parser = parser_of(module, monkeypatch)
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        shown = formatter._get_help_string(action) % {"default": action.default}
        assert "(default: " in shown, (action.option_strings, shown)
    assert not parser.allow_abbrev


@pytest.mark.parametrize("argv, message", [
    (["--n_layer", "two"], "argument --n_layer/--model.n_layer: invalid integer value: 'two'"),
    (["--n_layer", "2.5"], "invalid integer value: '2.5'"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--compile", "maybe"], "invalid boolean value: 'maybe'"),
    (["--attention", "sparse"], "invalid choice: 'sparse'"),
    (["--dtype", "bf16"], "invalid choice: 'bf16'"),
    (["--n_embd", "100", "--n_head", "3"], "n_embd (100) must be a multiple of n_head (3)"),
    (["--config", "/nonexistent/config.json"], "no such file"),
])
def test_a_wrong_value_is_a_usage_error(argv, message, capsys):
    code, _, err = run_main("scaling_runs.train", argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("module, argv, message", [
    ("scaling_runs.sweep", ["--mfu", "high"], "argument --mfu: expected a number > 0 and <= 1, got 'high'"),
    ("scaling_runs.sweep", ["--preset", "cpu-tny"], "invalid choice: 'cpu-tny'"),
    ("scaling_runs.eval_budget", [".", "--budgets", "1q"], "invalid size list value: '1q'"),
    ("scaling_runs.eval_budget", [".", "--pairs", "3y64"], "invalid BLOCK/TOP_K list value"),
    ("scaling_runs.budget_demo", ["--n_eval", "many"], "argument --n_eval: expected a whole number >= 1, got 'many'"),
    ("scaling_runs.budget_demo", ["--preset", "needle", "--reuse", "x"], "--reuse: not an option of --preset needle"),
    ("scaling_runs.budget_demo", ["--n_embd", "100", "--n_head", "3"], "must be a multiple of n_head"),
    ("scaling_runs.fit", [".", "--x", "flops"], "invalid choice: 'flops'"),
    ("moba.demo", ["--top_k", "99"], "--top_k (99)"),
])
def test_wrong_values_of_the_other_entry_points(module, argv, message, capsys):
    code, _, err = run_main(module, argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_config_options_come_from_the_dataclasses():
    """Every field is an option under its name and its qualified name, of the field's type."""
    parser = T.build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for qual, f in config.config_fields().items():
        action = by_dest[qual]
        assert action.option_strings == [f"--{f.name}", f"--{qual}"]
        assert action.default is argparse.SUPPRESS  # only what was typed overrides a --config file
    ns = T.build_parser().parse_args(["--n-layer", "3", "--model.top_k=2", "--max_tokens", "1e9",
                                      "--tokenizer", "none", "--progress", "off", "--mix_fraction", "0.25"])
    assert cli.config_overrides(ns) == {"model.n_layer": 3, "model.top_k": 2, "train.max_tokens": 10**9,
                                        "data.tokenizer": None, "train.progress": False, "data.mix_fraction": 0.25}


def test_value_parsers():
    assert config.parse_int("1e9") == 10**9 and config.parse_int("0x10") == 16 and config.parse_int("-3") == -3
    for bad in ("2.5", "1e-3", "inf", "nan", "four"):
        with pytest.raises(ValueError):
            config.parse_int(bad)
    assert config.value_parser(str | None)("None") is None and config.value_parser(int | None)("7") == 7
    assert config.value_parser(bool)("Yes") is True
    with pytest.raises(TypeError, match="config fields must be"):
        config.value_parser(list)
    with pytest.raises(ValueError, match=r"unknown option --n_layr \(did you mean --n_layer"):
        config.apply_overrides(RunConfig(), {"n_layr": "3"})
    assert not hasattr(config, "parse_overrides")  # one parser: argparse


def test_config_json_round_trips(tmp_path):
    """``--config RUN/config.json`` gives back the run's config (issue 16 item 7); options override it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 13}" for j in range(300)) + "\n")
    cfg = RunConfig(
        ModelConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, context=32, block_size=8, top_k=2),
        DataConfig(data=str(corpus), val_fraction=0.25, cache_dir=str(tmp_path / "cache")),
        TrainConfig(out_dir=str(tmp_path / "run"), batch_size=2, max_steps=1, eval_every=1, eval_seqs=2,
                    warmup_steps=1, progress=False, threads=1, seed=7))
    T.train(cfg)
    saved = tmp_path / "run" / "config.json"
    assert "data_config" in json.loads(saved.read_text())
    assert T.config_from_argv(["--config", str(saved)]) == cfg
    again = T.config_from_argv(["--config", str(saved), "--out_dir", str(tmp_path / "b"), "--model.top_k", "1"])
    assert again.model.top_k == 1 and again.train.out_dir == str(tmp_path / "b")
    assert again.data == cfg.data and again.train.seed == 7


def _doc_commands(text: str, module: str) -> list[list[str]]:
    """The ``python -m MODULE ...`` commands of the markdown's code blocks, as argument lists."""
    commands, pending, in_code = [], "", False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        line = pending + line.split("  #")[0].strip()
        pending = line[:-1] + " " if line.endswith("\\") else ""
        if pending:
            continue
        words = shlex.split(line.replace("`", " "), comments=True) if f"-m {module} " in line + " " else []
        if "-m" in words and words[words.index("-m") + 1] == module:
            args = words[words.index("-m") + 2:]
            if "..." not in args and "--help" not in args:  # --help exits: tests/test_docs.py runs it
                commands.append(args)
    return commands


@pytest.mark.parametrize("module", ["scaling_runs.train", "scaling_runs.sweep", "scaling_runs.demo",
                                    "scaling_runs.budget_demo", "scaling_runs.eval_budget"])
def test_documented_commands_parse(module):
    """The commands README.md, the docs/ pages, scaling_runs/README.md and GPU_RECIPE_budget.md
    tell users to type."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "scaling_runs" / "README.md",
            ROOT / "scaling_runs" / "GPU_RECIPE_budget.md"]
    commands = [c for d in docs for c in _doc_commands(d.read_text(), module)]
    parser = importlib.import_module(module).build_parser()
    for args in commands:
        args = [a.replace("$DATA", "stdlib") for a in args]
        parser.parse_args(args)  # a usage error fails the test (SystemExit)
    if module in ("scaling_runs.train", "scaling_runs.eval_budget", "scaling_runs.budget_demo"):
        assert commands, module  # the docs do show this one
