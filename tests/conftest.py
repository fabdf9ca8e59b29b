"""pytest setup shared by every test file.

* tests marked ``gpu`` are skipped when CUDA is not available (the markers ``gpu`` and
  ``slow`` are registered in pyproject.toml). ``torch.cuda.is_available()`` is only called
  inside the collection hook, never at import time.
* torch runs single-threaded per test process (override with MOBA_TEST_THREADS=n): the
  tests use small tensors, where intra-op threads only spin against each other and against
  the other pytest-xdist workers (about 5x slower with 2 threads per worker on 2 cores).
* every test starts from a torch RNG seeded from its own node id: reproducible, and
  different tests see different data.
* ``MOBA_TEST_SHARD=i/n`` keeps one shard of the collected tests (used by driver tests that
  run a slow file in a subprocess, in pieces that xdist workers share).
* tests in modules that start subprocesses through ``run_child`` get no pytest-timeout limit
  (``run_child``'s stall watchdog covers them); every other test has a 30-minute hang guard.
* SIGTERM raises ``KeyboardInterrupt`` (pytest stops the session), so children started
  through ``tests._subprocess.run_child`` are reaped when a run is stopped.
"""

from __future__ import annotations

import os
import signal
import threading
import zlib

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("MOBA_TEST_THREADS", "1")))
    # SIGTERM (make or CI stopping the run) unwinds like Ctrl-C, so that
    # ``tests._subprocess.run_child`` reaps the children it started instead of orphaning them.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # pytest stops the session on it, running teardowns


def _keep_shard(items):
    """MOBA_TEST_SHARD="i/n": keep every n-th collected test from the i-th (a driver test runs a
    slow file in n pieces this way; see tests/kernels/test_triton_interpret.py)."""
    shard = os.environ.get("MOBA_TEST_SHARD")
    if not shard:
        return
    index, count = (int(x) for x in shard.split("/"))
    items[:] = [item for n, item in enumerate(items) if n % count == index]


def pytest_collection_modifyitems(config, items):
    _keep_shard(items)
    # Modules that drive subprocesses (they import run_child) are watched for stalls instead of
    # timed: pytest-timeout's hang guard (pyproject.toml) would be a wall-clock limit there.
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and "run_child" in vars(module):
            item.add_marker(pytest.mark.timeout(0))
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
