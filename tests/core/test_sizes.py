"""moba._core.sizes: the one size parser of every command line."""

from __future__ import annotations

import pytest

from moba._core.sizes import parse_size


@pytest.mark.parametrize("text,value", [("512", 512), ("8k", 8192), ("2K", 2048), ("1.5k", 1536),
                                        ("1m", 2**20), (" 32k ", 32768)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12q", "k", "0", "0.3k", "1.0001", "-8k", "8kk"])
def test_bad_sizes_raise_value_error(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
