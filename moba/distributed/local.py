"""Run a function on N local processes joined in a gloo process group (CPU), and collect results.

For trying context parallelism without torchrun, for the tests and for ``bench.context_parallel``.
The processes rendezvous through a file in a fresh temporary directory (no port to pick, so
no port collisions between concurrent runs). Whatever happens in the caller (an exception,
Ctrl-C), every child is terminated and reaped before ``run_local`` returns or raises.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank: int, world: int, store: str, timeout_s: float, results, fn, args) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        try:
            results.put((rank, True, fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))


def run_local(fn, world_size: int, *args, collective_timeout_s: float = 1800.0) -> list:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes (spawned) that share a
    gloo default process group; returns the list of return values in rank order.

    ``fn`` must be importable by the children (a module-level function) and its arguments and
    return value picklable. A child that raises makes ``run_local`` raise ``RuntimeError`` with
    that child's traceback. ``collective_timeout_s`` is gloo's timeout for one collective: a
    collective that some rank never enters fails after it instead of hanging forever (generous by
    default: a loaded machine may start one rank minutes after another).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = []
    with tempfile.TemporaryDirectory(prefix="moba-cp-") as tmp:
        store = os.path.join(tmp, "store")
        try:
            for rank in range(world_size):
                p = ctx.Process(target=_child, args=(rank, world_size, store, collective_timeout_s, results, fn, args),
                                daemon=True)
                p.start()
                procs.append(p)
            out, errors = {}, {}
            while len(out) + len(errors) < world_size:
                try:
                    rank, ok, value = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out and r not in errors]
                    if dead:
                        raise RuntimeError(f"run_local: rank(s) {dead} died (exit codes "
                                           f"{[procs[r].exitcode for r in dead]}) without a result") from None
                    continue
                (out if ok else errors)[rank] = value
                if errors:
                    break
            if errors:
                rank = min(errors)
                raise RuntimeError(f"run_local: rank {rank} raised:\n{errors[rank]}")
            return [out[r] for r in range(world_size)]
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
            results.close()
