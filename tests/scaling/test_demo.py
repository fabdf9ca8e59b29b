"""``make demo`` (scaling_runs.demo): a short cpu-study. Argument handling only, nothing trains."""

from __future__ import annotations

import pytest

from scaling_runs import demo, study
from scaling_runs.presets import get_study


def study_args(argv: list[str]):
    """The parsed ``scaling_runs.study`` command line the demo's ``argv`` stands for."""
    return study.build_parser().parse_args(demo.study_argv(demo.build_parser().parse_args(argv)))


def plan_by_name(preset, tmp_path) -> dict:
    return {r["name"]: r for r in study.plan(preset, tmp_path, "DATA")}


def test_default_selection_is_a_subset_of_the_cpu_study(tmp_path):
    a = study_args(["--out", str(tmp_path)])
    assert a.preset == "cpu-study" and a.out == str(tmp_path) and a.set == []
    short, full = study.selected_preset(a), get_study("cpu-study")
    assert [s.name for s in short.sizes] == ["s1", "s2", "s3"]  # the three smallest
    assert short.arms == full.arms == ["full", "moba", "local", "random"]
    assert set(short.seeds) < set(full.seeds) and short.tpp == full.tpp
    runs, all_runs = plan_by_name(short, tmp_path), plan_by_name(full, tmp_path)
    assert runs and set(runs) < set(all_runs)
    for name, r in runs.items():  # the same runs as the full study's, token budgets included
        assert r["config"] == all_runs[name]["config"]


def test_config_options_reach_every_run_through_set(tmp_path):
    a = study_args(["--lr", "1e-2", "--compile", "false", "--sizes", "s2", "--arms", "moba,local",
                    "--seeds", "3", "--out", str(tmp_path)])
    assert sorted(a.set) == ["train.compile=False", "train.lr=0.01"]
    overrides = dict(kv.split("=", 1) for kv in a.set)
    runs = study.plan(study.selected_preset(a), tmp_path, "DATA", overrides)
    assert [r["name"] for r in runs] == ["s2-moba-seed3", "s2-local-seed3"]
    assert all(r["config"].train.lr == 0.01 and r["config"].train.compile is False for r in runs)


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "s1,s9"], "invalid list value: 's1,s9'"),
    (["--sizes", ""], "invalid list value"),
    (["--arms", "moba,sparse"], "invalid list value"),
    (["--seeds", "0,x"], "invalid seed list value"),
    (["--out_dir", "x"], "unrecognized arguments: --out_dir x"),  # the study sets these per run
    (["--seed", "1"], "unrecognized arguments: --seed 1"),
    (["--max_tokens", "100"], "unrecognized arguments: --max_tokens 100"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err


def test_help_names_the_study_and_its_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--sizes", "nope", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert exc.value.code == 0 and "cpu-study" in out and "(default: runs/demo)" in out
    assert "(default: s1,s2,s3)" in out and "--out_dir" not in out


def test_main_runs_the_study_with_those_arguments(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(study, "main", lambda argv: seen.append(argv) or 1)
    assert demo.main(["--out", str(tmp_path), "--jobs", "1"]) == 1  # the study's exit status
    assert seen == [demo.study_argv(demo.build_parser().parse_args(["--out", str(tmp_path), "--jobs", "1"]))]
    assert "python -m scaling_runs.study --preset cpu-study" in capsys.readouterr().out


def test_defaults_are_not_inside_the_committed_results():
    assert not demo.build_parser().parse_args([]).out.startswith("scaling_runs")
