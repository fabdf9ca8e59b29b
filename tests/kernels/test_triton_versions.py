"""The checked Triton releases: declared once in pyproject.toml, matched by the kernels' list, and
an unchecked release warns exactly once."""

from __future__ import annotations

import re
import warnings

import pytest
import tomllib
from moba.triton_kernels import versions

from tests._helpers import ROOT


def test_pyproject_declares_the_checked_releases():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["moba"]["checked-triton"]
    assert tuple(declared) == versions.CHECKED_TRITON


def test_the_locked_triton_is_checked():
    locked = re.search(r"^triton==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert versions.triton_minor(locked) in versions.CHECKED_TRITON


@pytest.mark.parametrize(("version", "minor"), [("3.6.0", "3.6"), ("3.9.0+git1a2b3c", "3.9"), ("10.12", "10.12"),
                                                ("nightly", "nightly")])
def test_triton_minor(version, minor):
    assert versions.triton_minor(version) == minor


def test_unchecked_release_warns_once(monkeypatch):
    monkeypatch.setattr(versions, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert versions.check_triton_version("3.6.0") is True
        assert versions.check_triton_version("3.9.1") is True
        assert not caught
        assert versions.check_triton_version("3.4.0") is False
        assert versions.check_triton_version("3.5.1") is False  # still unchecked, no second warning
    assert len(caught) == 1 and issubclass(caught[0].category, versions.UncheckedTritonWarning)
    assert "3.4.0" in str(caught[0].message) and "3.6, 3.9" in str(caught[0].message)


def test_config_overrides_apply_to_their_release_only(monkeypatch):
    from moba.triton_kernels import attention as attn

    for release, tables in attn.TRITON_CONFIG_OVERRIDES.items():
        assert release in versions.CHECKED_TRITON
        for name in tables:
            monkeypatch.setattr(attn, name, dict(getattr(attn, name)))  # restored after the test
        before = {name: dict(getattr(attn, name)) for name in tables}
        attn._apply_config_overrides("2.0.0")  # another release: nothing changes
        assert {name: getattr(attn, name) for name in tables} == before
        attn._apply_config_overrides(f"{release}.1")
        for name, entries in tables.items():
            for head_dim, config in entries.items():
                assert head_dim in before[name] and getattr(attn, name)[head_dim] == config
