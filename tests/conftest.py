"""pytest setup shared by every test file.

* tests marked ``gpu`` are skipped when CUDA is not available (the markers ``gpu`` and
  ``slow`` are registered in pyproject.toml). ``torch.cuda.is_available()`` is only called
  inside the collection hook, never at import time.
* torch runs single-threaded per test process (override with MOBA_TEST_THREADS=n): the
  tests use small tensors, where intra-op threads only spin against each other and against
  the other pytest-xdist workers (about 5x slower with 2 threads per worker on 2 cores).
* every test starts from a torch RNG seeded from its own node id: reproducible, and
  different tests see different data.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("MOBA_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_torch(request):
    """Seed torch's global RNG per test from the test's node id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
