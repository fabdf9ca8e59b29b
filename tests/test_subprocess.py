"""tests/_subprocess.run_child: slow children are never killed, stalled ones are, and nothing
it started outlives it (the guarantees `make test` relies on to stay green on a busy machine)."""

from __future__ import annotations

import _thread
import sys
import threading
import time
from pathlib import Path

import pytest

from tests._subprocess import ChildStalled, run_child

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc: Linux")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_output_and_exit_status_come_back():
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    proc = run_child([sys.executable, "-c", code])
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    assert run_child(["cat"], input="abc").stdout == "abc"


def test_a_silent_child_that_uses_cpu_is_not_a_stall():
    # silent for several stall limits, but busy: a slow machine looks like this
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 2: pass\nprint('done')"
    proc = run_child([sys.executable, "-c", code], stall_s=1)
    assert (proc.returncode, proc.stdout) == (0, "done\n")


def test_a_stalled_child_is_killed_with_its_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(g.pid))\n"
            "print('waiting', flush=True); time.sleep(600)")
    with pytest.raises(ChildStalled, match="no output and no CPU time"):
        run_child([sys.executable, "-c", code], stall_s=2)
    assert not _alive(int(pidfile.read_text()))


def test_grandchildren_do_not_outlive_a_finished_child(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(g.pid))")
    assert run_child([sys.executable, "-c", code]).returncode == 0
    assert not _alive(int(pidfile.read_text()))


def test_an_interrupted_test_reaps_its_child(tmp_path):
    """Ctrl-C, SIGTERM (turned into KeyboardInterrupt by conftest) or pytest-timeout's signal
    arrive as an exception in the waiting thread: the child group is killed on the way out."""
    pidfile = tmp_path / "child.pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"

    def interrupt_once_started():
        while not pidfile.exists() or not pidfile.read_text():
            time.sleep(0.05)
        _thread.interrupt_main()  # KeyboardInterrupt in the thread waiting in run_child

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_child([sys.executable, "-c", code])
    assert not _alive(int(pidfile.read_text()))
