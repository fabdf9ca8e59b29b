"""Every command-line tool of ``bench/`` and ``scaling_runs/`` answers bad input in one line.

The table ``BAD`` runs bad values, missing files and empty folders through each tool's real
entry point (``python -m MODULE``'s ``__main__`` block, in a subprocess per tool): the exit
status is not 0, stderr ends in one ``python -m MODULE: error: ...`` line that names the
option, and no Python traceback is printed (unless ``--debug``). Also: every bench tool runs
both as ``python bench/TOOL.py`` (from the repository root and from elsewhere) and as
``python -m bench.TOOL``; every tool spells its options one way (underscores, dashes accepted),
suggests the nearest option for a typo, and reads ``BLOCK/TOP_K`` the same way. Nothing here
trains or measures anything: every case stops at its argument check.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from moba._core import cli
from moba._core.sizes import parse_block_topk
from tests._helpers import ROOT
from tests._subprocess import run_child


def _tools(folder: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / folder).glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


BENCH_TOOLS = _tools("bench")
SCALING_TOOLS = _tools("scaling_runs")
ALL_TOOLS = [f"bench.{t}" for t in BENCH_TOOLS] + [f"scaling_runs.{t}" for t in SCALING_TOOLS]


def test_the_tool_lists_are_complete():
    assert set(BENCH_TOOLS) >= {"attn_speed", "roofline", "generate_speed", "torch_path_cpu", "perf_model"}
    assert set(SCALING_TOOLS) >= {"train", "sweep", "study", "fit", "eval_budget", "tasks"}
    assert {m.split(".")[0] for m, *_ in BAD} == {"bench", "scaling_runs"}
    assert {m for m, *_ in BAD} == set(ALL_TOOLS), set(ALL_TOOLS) - {m for m, *_ in BAD}


# ----------------------------------------------------------------------------- bench tools run as files
def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | extra


def _help(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    return run_child(cmd, cwd=cwd, env=_env())


def test_bench_tools_run_as_files_and_as_modules(tmp_path):
    """``python bench/TOOL.py --help`` from another folder (and the mission's command from the
    root), and ``python -m bench.TOOL --help`` from the root: all print the help and exit 0."""
    jobs = {}
    jobs[("attn_speed", "file, from the root")] = ([sys.executable, "bench/attn_speed.py", "--help"], ROOT)
    for tool in BENCH_TOOLS:  # (the file form differs from the root only in the working folder)
        jobs[(tool, "file, from elsewhere")] = ([sys.executable, str(ROOT / "bench" / f"{tool}.py"), "--help"], tmp_path)
        jobs[(tool, "module, from the root")] = ([sys.executable, "-m", f"bench.{tool}", "--help"], ROOT)
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(jobs, pool.map(lambda job: _help(*job), jobs.values()), strict=True))
    for (tool, how), proc in done.items():
        assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m bench."), (tool, how, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (tool, how, proc.stderr)
    assert not list(tmp_path.iterdir())  # --help writes nothing


# ----------------------------------------------------------------------------- the table of bad inputs
CPU_ONLY = not __import__("torch").cuda.is_available()

# (module, argv, substrings the last stderr line must hold). Paths are relative to a scratch
# folder holding: notjson.txt (text), empty/ (an empty folder), norun/ (a folder without runs).
BAD = [
    ("bench.attn_speed", ["--seqlens", "0"], ["--seqlens", ">= 1"]),
    ("bench.attn_speed", ["--heads", "0"], ["--heads", ">= 1"]),
    ("bench.attn_speed", ["--block_size", "big"], ["--block_size", "512, 8k"]),
    ("bench.attn_speed", ["--providers", "moba-trito"], ["--providers", "did you mean 'moba-triton'"]),
    ("bench.attn_speed", ["--modes", "forward"], ["--modes", "expected some of"]),
    ("bench.attn_speed", ["--device", "gpu"], ["--device", "cuda:1"]),
    ("bench.attn_speed", ["--dtype", "bf61"], ["--dtype", "did you mean 'bf16'"]),
    ("bench.attn_speed", ["--seqlen", "8k"], ["--seqlen", "did you mean --seqlens"]),
    ("bench.attn_speed", ["--cpu", "--heads", "3", "--kv-heads", "2"], ["--heads", "--kv_heads"]),
    ("bench.context_parallel", ["--methods", "ulyses"], ["--methods", "did you mean 'ulysses'"]),
    ("bench.context_parallel", ["--worlds", "0"], ["--worlds"]),
    ("bench.context_parallel", ["--hq", "0"], ["--hq", ">= 1"]),
    ("bench.device_check", ["--steps", "instal"], ["--steps", "did you mean 'install'"]),
    ("bench.device_check", ["--budget_s", "-1"], ["--budget_s", "> 0"]),
    ("bench.gate_fallback", ["--settings", "64x3"], ["--settings", "ambiguous", "64/3"]),
    ("bench.gate_fallback", ["--settings", "64/1"], ["--settings", ">= 2"]),
    ("bench.gate_fallback", ["--dtypes", "bf8"], ["--dtypes", "bf16"]),
    ("bench.generate_speed", ["--target_run", "missing", "--draft_run", "missing"], ["--target_run", "no such file"]),
    ("bench.generate_speed", ["--gamma", "0"], ["--gamma", ">= 1"]),
    ("bench.generate_speed", ["--temperature", "-1"], ["--temperature", ">= 0"]),
    ("bench.kernel_report", ["--cc", "75"], ["--cc", "[80, 90]"]),
    ("bench.kernel_report", ["--jobs", "0"], ["--jobs", ">= 1"]),
    ("bench.perf_model", ["--settings", "512x3"], ["--settings", "ambiguous", "BLOCK/TOP_K"]),
    ("bench.perf_model", ["--designs", "main-unoin"], ["--designs", "did you mean 'main-union'"]),
    ("bench.perf_model", ["--seqlens", "-5"], ["--seqlens"]),
    ("bench.roofline", ["missing.json"], ["inputs", "no such file"]),
    ("bench.roofline", ["notjson.txt"], ["notjson.txt", "not a JSON file"]),
    ("bench.roofline", ["empty"], ["inputs", "is a folder"]),
    ("bench.roofline", ["--peak_tflops", "900"], ["--peak_tflops", "--peak_bw_tbs"]),
    ("bench.roofline", ["--no_model"], ["nothing to plot", "--no_model"]),
    ("bench.roofline", ["--device_name", "H1OO"], ["--device_name", "H1OO"]),
    ("bench.torch_path_cpu", ["--seqlens", "abc"], ["--seqlens", "512, 8k"]),
    ("bench.torch_path_cpu", ["--repeats", "0"], ["--repeats", ">= 1"]),
    ("scaling_runs.train", ["--n_layer", "0"], ["n_layer", ">= 1"]),
    ("scaling_runs.train", ["--n_head", "0"], ["n_head", ">= 1"]),
    ("scaling_runs.train", ["--context", "0"], ["context", ">= 2"]),
    ("scaling_runs.train", ["--lr", "-1"], ["lr", "> 0"]),
    ("scaling_runs.train", ["--device", "cudaa"], ["device", "cuda:N"]),
    ("scaling_runs.train", ["--config", "missing.json"], ["--config", "no such file"]),
    ("scaling_runs.train", ["--n_layr", "2"], ["--n_layr", "did you mean --n_layer"]),
    ("scaling_runs.sweep", ["--kinds", "mob"], ["--kinds", "did you mean 'moba'"]),
    ("scaling_runs.sweep", ["--mfu", "0"], ["--mfu", "> 0"]),
    ("scaling_runs.sweep", ["--preset", "gpu-smal"], ["--preset", "did you mean 'gpu-small'"]),
    *([("scaling_runs.sweep", ["--preset", "gpu-small", "--out", "out"], ["--preset gpu-small", "no CUDA GPU",
                                                                           "--allow_cpu"])] if CPU_ONLY else []),
    ("scaling_runs.study", ["--seeds", "a", "--dry_run"], ["--seeds", ">= 0"]),
    ("scaling_runs.study", ["--arms", "mob", "--dry_run"], ["--arms", "did you mean 'moba'"]),
    ("scaling_runs.study", ["--set", "lrr=1", "--dry_run"], ["--set", "did you mean --lr"]),
    ("scaling_runs.study", ["--set", "lr", "--dry_run"], ["--set", "KEY=VALUE"]),
    ("scaling_runs.study", ["--jobs", "0"], ["--jobs", ">= 1"]),
    ("scaling_runs.study", ["--preset", "cpu-stdy"], ["--preset", "did you mean 'cpu-study'"]),
    ("scaling_runs.eval_budget", ["missing"], ["checkpoint missing", "no such file"]),
    ("scaling_runs.eval_budget", ["empty", "--pairs", "64x3"], ["--pairs", "ambiguous", "64/3"]),
    ("scaling_runs.eval_budget", ["empty", "--depths", "2"], ["--depths", "<= 1"]),
    ("scaling_runs.eval_budget", ["empty", "--tasks", "pasky"], ["--tasks", "did you mean 'passkey'"]),
    ("scaling_runs.eval_budget", ["empty", "--batch", "0"], ["--batch", ">= 1"]),
    ("scaling_runs.fit", ["missing"], ["sweep_dir", "no such folder"]),
    ("scaling_runs.fit", ["empty"], ["sweep_dir", "is empty"]),
    ("scaling_runs.fit", ["norun"], ["sweep_dir", "no run folders"]),
    ("scaling_runs.fit", ["norun", "--skip_frac", "1"], ["--skip_frac", "< 1"]),
    ("scaling_runs.tasks", ["out", "--tasks", "pasky"], ["--tasks", "did you mean 'passkey'"]),
    ("scaling_runs.tasks", ["out", "--n", "-5"], ["--n", ">= 1"]),
    ("scaling_runs.tasks", ["out", "--lengths", "0"], ["--lengths", ">= 1"]),
    ("scaling_runs.tasks", ["out", "--filler", "missing.txt"], ["--filler", "no such file"]),
    ("scaling_runs.demo", ["--jobs", "0"], ["--jobs", ">= 1"]),
    ("scaling_runs.demo", ["--sizes", "s9"], ["--sizes"]),
    ("scaling_runs.budget_demo", ["--n_eval", "0", "--preset", "needle"], ["--n_eval", ">= 1"]),
    ("scaling_runs.budget_demo", ["--preset", "needel"], ["--preset", "did you mean 'needle'"]),
    ("scaling_runs.budget_demo", ["--filler", "missing.txt"], ["--filler", "no such file"]),
]

# Runs each case through the module's real __main__ block (runpy), in one process per module.
_DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
module, cases = sys.argv[1], json.loads(sys.argv[2])
out = []
for argv in cases:
    err = io.StringIO()
    sys.argv = [module] + argv
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                err.write(str(e.code) + "\n")
        except BaseException:
            code = "crashed"
            err.write(traceback.format_exc())
    out.append({"argv": argv, "code": code, "stderr": err.getvalue()})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> dict:
    """``{(module, argv): {"code", "stderr"}}`` of every ``BAD`` case."""
    work = tmp_path_factory.mktemp("cli")
    (work / "notjson.txt").write_text("not json\n")
    (work / "empty").mkdir()
    (work / "norun").mkdir()
    (work / "norun" / "notes.txt").write_text("no runs here\n")
    by_module: dict[str, list] = {}
    for module, argv, _ in BAD:
        by_module.setdefault(module, []).append(argv)

    def one(module):
        proc = run_child([sys.executable, "-c", _DRIVER, module, json.dumps(by_module[module])], cwd=work,
                         env=_env(PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(2) as pool:
        rows = dict(zip(by_module, pool.map(one, by_module), strict=True))
    assert not [p.name for p in (work / "empty").iterdir()]
    return {(module, tuple(r["argv"])): r for module, results in rows.items() for r in results}


@pytest.mark.parametrize("module, argv, says", BAD, ids=[f"{m} {' '.join(a)}" for m, a, _ in BAD])
def test_bad_input_is_a_one_line_error(answers, module, argv, says):
    r = answers[(module, tuple(argv))]
    err = r["stderr"]
    assert r["code"] not in (0, "crashed"), err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"python -m {module}: error: "), err
    for text in says:
        assert text in last, (text, last)
    assert "--debug" not in last, last  # a user error, not an unexpected one


def test_debug_shows_the_traceback(tmp_path):
    proc = run_child([sys.executable, "-m", "bench.roofline", "--no_model", "--debug"], cwd=ROOT, env=_env())
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CliError: nothing to plot" in proc.stderr


# ----------------------------------------------------------------------------- in-process checks of the parsers
def _parser(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


@pytest.mark.parametrize("module", ALL_TOOLS)
def test_options_are_spelled_one_way_and_show_their_defaults(module):
    parser = _parser(module)
    assert isinstance(parser, cli.Parser) and not parser.allow_abbrev
    formatter = parser._get_formatter()
    names = parser.option_names()
    assert "--debug" in names
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        for name in action.option_strings:
            assert name.startswith("-h") or "-" not in name[2:], (module, name)  # --block_size, never --block-size
        shown = formatter._get_help_string(action) % {"default": action.default}
        assert action.help and "default" in shown.lower(), (module, action.option_strings, shown)
        assert shown.count("(default") <= 1, (module, shown)  # no doubled "(default: x) (default: x)"


@pytest.mark.parametrize("module", ALL_TOOLS)
def test_dashes_work_as_underscores(module):
    """``--no-plots`` is ``--no_plots``, wherever the tool has such an option."""
    parser = _parser(module)
    flags = [a for a in parser._actions if isinstance(a, argparse._StoreTrueAction) and "_" in a.option_strings[0]]
    if not flags:
        pytest.skip("no underscored on/off option")
    underscored = flags[0].option_strings[0]
    dashed = "--" + underscored[2:].replace("_", "-")
    positional = {"scaling_runs.eval_budget": ["."], "scaling_runs.fit": ["."], "scaling_runs.tasks": ["out"]}
    ns_dashed, _ = parser.parse_known_args([*positional.get(module, []), dashed])
    ns_under, _ = parser.parse_known_args([*positional.get(module, []), underscored])
    assert getattr(ns_dashed, flags[0].dest) is True and vars(ns_dashed) == vars(ns_under)


def test_dashed_options_of_the_old_bench_spelling_still_parse():
    from bench import attn_speed

    old = attn_speed.build_parser().parse_args(["--block-size", "4k", "--top-k", "3", "--kv-heads", "2", "--no-causal"])
    new = attn_speed.build_parser().parse_args(["--block_size", "4k", "--top_k", "3", "--kv_heads", "2", "--no_causal"])
    assert vars(old) == vars(new) and new.block_size == 4096 and new.causal is False


@pytest.mark.parametrize("module, typo, meant", [
    ("bench.attn_speed", "--top-kk", "--top_k"), ("bench.roofline", "--peak_tflop", "--peak_tflops"),
    ("bench.generate_speed", "--new_token", "--new_tokens"), ("bench.perf_model", "--setting", "--settings"),
    ("bench.kernel_report", "--markdwn", "--markdown"), ("bench.torch_path_cpu", "--repeat", "--repeats"),
    ("bench.gate_fallback", "--seqlens", "--seqlen"), ("bench.device_check", "--budget", "--budget_s"),
])
def test_bench_typos_name_the_nearest_option(module, typo, meant, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser(module).parse_args([f"{typo}=1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"did you mean {meant}" in err, err


# ----------------------------------------------------------------------------- the (block size, top-k) notation
def test_one_block_topk_notation():
    assert parse_block_topk("512/3") == (512, 3)
    assert parse_block_topk(" 4k/12 ") == (4096, 12)
    for bad, says in [("64x3", "ambiguous"), ("3x64", "64/3"), ("512", "BLOCK/TOP_K"), ("0/3", "block size"),
                      ("512/0", "top-k"), ("512/1.5", "top-k"), ("a/b", "block size")]:
        with pytest.raises(ValueError, match=says):
            parse_block_topk(bad)
    assert cli.block_topk_list("512/3,128/8") == [(512, 3), (128, 8)]


def test_eval_budget_pairs_read_block_then_top_k():
    from scaling_runs import eval_budget as E

    assert E.parse_pairs("64/3,1k/2") == [(3, 64), (2, 1024)]  # (top_k, block_size) inside
    with pytest.raises(ValueError, match="ambiguous"):
        E.parse_pairs("64x3")  # once top_k=64 with blocks of 3, silently


# ----------------------------------------------------------------------------- run(): one line, --debug, exit codes
def test_run_prints_one_line_and_returns_the_status(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tool"])
    monkeypatch.delenv("MOBA_DEBUG", raising=False)

    def user_error():
        raise cli.fail("--x: expected a whole number >= 1, got '0'")

    def bug():
        raise KeyError("oops")

    assert cli.run(user_error, "pkg.tool") == 2
    assert capsys.readouterr().err == "python -m pkg.tool: error: --x: expected a whole number >= 1, got '0'\n"
    assert cli.run(lambda: open("/nonexistent/file"), "pkg.tool") == 2
    assert "No such file" in capsys.readouterr().err
    assert cli.run(bug, "pkg.tool") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError" in err and "--debug" in err
    assert cli.run(lambda: 3) == 3 and cli.run(lambda: {"rows": []}) == 0 and cli.run(lambda: None) == 0
    monkeypatch.setattr(sys, "argv", ["tool", "--debug"])
    with pytest.raises(KeyError):
        cli.run(bug, "pkg.tool")
