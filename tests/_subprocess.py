"""Run a child process from a test: no wall-clock limit, a stall watchdog, and no orphans.

Tests that start Python in a subprocess (kernel compiles, the interpreter suite, CLIs) must
pass on a slow or busy machine, so nothing here limits how long a child may take. What a test
must never do is hang forever or leave processes behind, so:

* the child runs in its own session (process group); on any exit from ``run_child`` (normal,
  assertion, ``KeyboardInterrupt``, pytest-timeout's signal, SIGTERM turned into ``SystemExit``
  by ``tests/conftest.py``) every process still in that group is terminated, then killed;
* a *stall* watchdog kills the group only when the child has been idle for ``stall_s`` seconds:
  it wrote no output **and** its process group used no CPU time. A busy machine slows a child
  but does not stop it from using CPU, so a slow child is never killed; a deadlocked or
  blocked one is. The limit scales with ``MOBA_TEST_STALL_FACTOR`` (default 1).

CPU time is read from ``/proc`` (Linux); elsewhere only output counts as progress.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

DEFAULT_STALL_S = 600.0
_POLL_S = 1.0
_LIVE_GROUPS: set[int] = set()


def _group_cpu_ticks(pgid: int) -> int | None:
    """utime + stime (+ reaped children's) of every process in group ``pgid``; None without /proc."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    total = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces: split after its closing parenthesis
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:  # field 5: pgrp
            total += sum(int(x) for x in fields[11:15])  # fields 14-17: utime stime cutime cstime
    return total


def _kill_group(pgid: int, leader: subprocess.Popen | None = None) -> None:
    """SIGTERM the group, give it a moment, then SIGKILL whatever is left.

    ``leader`` (the child we started) is polled so that it does not linger as a zombie.
    """
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if leader is not None:
                leader.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                _LIVE_GROUPS.discard(pgid)
                return
            time.sleep(0.1)
    _LIVE_GROUPS.discard(pgid)


@atexit.register
def _reap_all() -> None:
    for pgid in list(_LIVE_GROUPS):
        _kill_group(pgid)


class ChildStalled(AssertionError):
    """The child printed nothing and used no CPU for the stall limit: treated as a hang."""


def run_child(
    cmd: list[str],
    *,
    cwd=None,
    env: dict[str, str] | None = None,
    stall_s: float = DEFAULT_STALL_S,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion and return its ``CompletedProcess`` (text stdout / stderr).

    Args:
        cmd: the command line.
        cwd, env: as for ``subprocess.run`` (``PYTHONUNBUFFERED=1`` is added so a Python child's
            progress shows up as it happens).
        stall_s: idle seconds (no output and no CPU time in the child's process group) after
            which the child counts as hung: the group is killed and ``ChildStalled`` raised.
        input: text written to the child's standard input (else it reads from /dev/null).

    Never raises for a non-zero exit: the caller asserts on ``returncode``.
    """
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    stall_s *= float(os.environ.get("MOBA_TEST_STALL_FACTOR", "1"))
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, text=True, start_new_session=True,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    pgid = proc.pid  # a new session: the child leads its own process group
    _LIVE_GROUPS.add(pgid)
    chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}
    last_output = [time.monotonic()]

    def pump(name: str, stream) -> None:
        for piece in iter(lambda: stream.read(1), ""):  # char by char: pytest's dots have no newline
            chunks[name].append(piece)
            last_output[0] = time.monotonic()

    readers = [threading.Thread(target=pump, args=(n, s), daemon=True)
               for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for reader in readers:
        reader.start()
    try:
        if input is not None:
            proc.stdin.write(input)
            proc.stdin.close()
        last_cpu, last_cpu_change = _group_cpu_ticks(pgid), time.monotonic()
        while proc.poll() is None:
            time.sleep(_POLL_S)
            cpu = _group_cpu_ticks(pgid)
            if cpu != last_cpu:
                last_cpu, last_cpu_change = cpu, time.monotonic()
            idle = time.monotonic() - max(last_output[0], last_cpu_change)
            if idle > stall_s:
                _kill_group(pgid, proc)
                tail = "".join(chunks["stdout"])[-3000:] + "".join(chunks["stderr"])[-3000:]
                raise ChildStalled(f"{' '.join(map(str, cmd))!r}: no output and no CPU time for "
                                   f"{idle:.0f} s (a hang); it was killed. Last output:\n{tail}")
        _kill_group(pgid, proc)  # grandchildren (process pools) that outlived the child would hold the pipes
        for reader in readers:
            reader.join()
    finally:
        if pgid in _LIVE_GROUPS:
            _kill_group(pgid, proc)
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(chunks["stdout"]), "".join(chunks["stderr"]))
