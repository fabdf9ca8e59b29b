"""Context-parallel MoBA (moba.distributed) equals the single-process op, on 2 and 4 gloo processes.

Each world size is one spawn (``run_local``): the ranks run every case and return what they
saw; the test asserts. float64 throughout: outputs, lse and dq/dk/dv within 1e-10 of
``moba_attn_func`` on the whole sequence, sharded the same way. Bad input must raise on every
rank (a rank left waiting in a collective would make the spawn fail on gloo's timeout, never
pass). Nothing here is timed.
"""

from __future__ import annotations

import pytest
import torch

from moba import select_blocks
from moba.distributed import cost, run_local

TOL = 1e-10

# (name, batch, seqlen, Hq, Hkv, head_dim, block_size, top_k): seqlen is a multiple of 2P for
# P = 2 and 4; block sizes 5 and 7 straddle the chunks (12 / 6 tokens), so selections cross
# shard boundaries; top_k 1, 3, and beyond the block count (dense).
CASES = [
    ("mha-bs5-top3", 1, 48, 4, 4, 4, 5, 3),
    ("gqa-bs7-top3", 2, 48, 4, 2, 4, 7, 3),
    ("mqa-bs8-top1", 1, 48, 4, 1, 4, 8, 1),
    ("gqa-bs5-top100", 1, 48, 4, 2, 4, 5, 100),
    ("gqa-replicated-bs6-top2", 1, 48, 12, 3, 4, 6, 2),
    ("bs-longer-than-seq", 1, 48, 4, 2, 4, 64, 2),
    ("bs1-top4", 1, 24, 4, 2, 4, 1, 4),
]
METHODS = ("ulysses", "sparse", "auto")
AUTO_CASES = ("gqa-bs7-top3", "mqa-bs8-top1", "gqa-replicated-bs6-top2")  # auto picks each method in these


def _data(batch, seqlen, hq, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seqlen, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seqlen, hkv, d, generator=g, dtype=torch.float64)
    w = torch.randn(batch, seqlen, hq, d, generator=g, dtype=torch.float64)
    return q, k, v, w


def _compare(q, k, v, w, bs, top_k, causal, method, rows=slice(None)):
    """Max abs differences (out, lse, dq, dk, dv) between the CP op and the whole-sequence op,
    over the batch rows ``rows``; and the CommStats of the CP call."""
    from moba import moba_attn_func
    from moba.distributed import CommStats, moba_attn_func_cp, shard_sequence

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, lse_ref = moba_attn_func(qr, kr, vr, bs, top_k, causal=causal, return_lse=True)
    torch.where(torch.isfinite(ref), ref * w, 0.0).sum().backward()
    ql, kl, vl = (shard_sequence(t).requires_grad_() for t in (q, k, v))
    stats = CommStats()
    out, lse = moba_attn_func_cp(ql, kl, vl, bs, top_k, causal=causal, method=method, return_lse=True, stats=stats)
    wl = shard_sequence(w)
    torch.where(torch.isfinite(out), out * wl, 0.0).sum().backward()
    pairs = [(out, shard_sequence(ref)), (lse, shard_sequence(lse_ref, dim=2)), (ql.grad, shard_sequence(qr.grad)),
             (kl.grad, shard_sequence(kr.grad)), (vl.grad, shard_sequence(vr.grad))]
    errs = []
    for got, want in pairs:
        got, want = got[rows], want[rows]
        same_nan = bool((got.isnan() == want.isnan()).all())
        diff = (got - want).nan_to_num(nan=0.0).abs().max().item() if got.numel() else 0.0
        errs.append(diff if same_nan else float("inf"))
    return errs, stats


def _expect_error(fn, kind):
    """'ok' if fn raises ``kind``, else a description (an error here is a test failure, not a crash)."""
    try:
        fn()
    except kind as e:
        return ("ok", str(e))
    except Exception as e:  # noqa: BLE001
        return ("wrong", f"{type(e).__name__}: {e}")
    return ("wrong", "no error")


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from moba.distributed import CommStats, gather_sequence, moba_attn_func_cp, shard_sequence

    report = {"exact": {}, "bytes": {}, "errors": {}}
    for name, batch, seqlen, hq, hkv, d, bs, top_k in CASES:
        data = _data(batch, seqlen, hq, hkv, d)
        for causal in (True, False):
            for method in METHODS:
                if (method == "ulysses" and hq % world) or (method == "auto" and name not in AUTO_CASES):
                    continue
                errs, stats = _compare(*data, bs, top_k, causal, method)
                key = f"{name}-{'causal' if causal else 'noncausal'}-{method}"
                report["exact"][key] = errs
                report["bytes"][key] = (stats.method, stats.sent_bytes, stats.recv_bytes, dict(stats.by_phase))

    # NaN in one sequence of the batch (a key on this rank's shard of sequence 0) stays there.
    q, k, v, w = _data(2, 48, 4, 2, 4, seed=1)
    k[0, 47 - 3, 1, 2] = float("nan")  # held by rank 0 (the last chunk)
    v[0, 13, 0, 0] = float("nan")  # held by rank 1 with P = 2 and 4
    for method in ("ulysses", "sparse"):
        errs, _ = _compare(q, k, v, w, 5, 3, True, method, rows=slice(1, 2))
        report["exact"][f"nan-isolation-{method}"] = errs

    # gather_sequence: inverse of shard_sequence, differentiable.
    x = torch.randn(2, 48, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xl = shard_sequence(x).requires_grad_()
    full = gather_sequence(xl)
    (full * torch.arange(48, dtype=torch.float64)[None, :, None]).sum().backward()
    want_grad = world * shard_sequence(torch.arange(48, dtype=torch.float64)[None, :, None].expand(2, 48, 3))
    report["exact"]["gather-roundtrip"] = [(full - x).abs().max().item(), (xl.grad - want_grad).abs().max().item()]

    # Bad input: every rank raises; the group stays usable afterwards.
    q, k, v, _ = _data(1, 48, 4, 2, 4)
    ql, kl, vl = (shard_sequence(t) for t in (q, k, v))
    bad = report["errors"]
    bad["odd-length"] = _expect_error(lambda: moba_attn_func_cp(ql[:, 1:], kl[:, 1:], vl[:, 1:], 5, 3), ValueError)
    cut = 2 if rank == 0 else 0  # rank 0's shard is shorter than the others'
    bad["mismatched-shards"] = _expect_error(
        lambda: moba_attn_func_cp(ql[:, cut:], kl[:, cut:], vl[:, cut:], 5, 3), ValueError)
    top = 3 if rank == world - 1 else 2
    bad["mismatched-top_k"] = _expect_error(lambda: moba_attn_func_cp(ql, kl, vl, 5, top), ValueError)
    heads = 3 if rank == 1 else 2  # rank 1's k has a head count that does not divide Hq
    kk = torch.randn(1, ql.shape[1], heads, 4, dtype=torch.float64)
    bad["one-rank-invalid"] = _expect_error(lambda: moba_attn_func_cp(ql, kk, kk, 5, 3), ValueError)
    bad["unknown-method"] = _expect_error(lambda: moba_attn_func_cp(ql, kl, vl, 5, 3, method="ring"), ValueError)
    bad["ulysses-heads"] = _expect_error(
        lambda: moba_attn_func_cp(ql[:, :, :1], kl[:, :, :1], vl[:, :, :1], 5, 3, method="ulysses"), ValueError)
    singles = [dist.new_group([r]) for r in range(world)]
    bad["group-of-one"] = _expect_error(lambda: moba_attn_func_cp(ql, kl, vl, 5, 3, group=singles[rank]), ValueError)
    bad["shard-not-divisible"] = _expect_error(lambda: shard_sequence(torch.zeros(1, 50, 2)), ValueError)
    bad["gather-mismatch"] = _expect_error(lambda: gather_sequence(torch.zeros(1, 4 + 2 * rank, 2)), ValueError)
    after, _ = _compare(*_data(1, 48, 4, 2, 4), 5, 3, True, "sparse")
    report["exact"]["after-bad-input"] = after

    # Bytes of a sparse call with top_k = 1 and blocks inside chunks: nothing but the gate's sums moves.
    stats = CommStats()
    moba_attn_func_cp(ql, kl, vl, 48 // (2 * world), 1, method="sparse", stats=stats)
    report["local-only"] = dict(stats.by_phase)
    return report


def _check(world: int):
    reports = run_local(_worker, world)
    failures = []
    for rank, rep in enumerate(reports):
        for key, errs in rep["exact"].items():
            if not max(errs) <= TOL:
                failures.append(f"rank {rank} {key}: max errors {errs}")
        for key, (status, message) in rep["errors"].items():
            if status != "ok":
                failures.append(f"rank {rank} bad input {key}: {message}")
        kv = rep["local-only"].get("sparse:kv", [0, 0])
        if kv != [0, 0]:
            failures.append(f"rank {rank}: sparse top_k=1 moved K/V rows: {rep['local-only']}")
    assert not failures, "\n".join(failures)
    return reports


@pytest.mark.slow
def test_context_parallel_2_ranks():
    reports = _check(2)
    _check_bytes(reports, 2)


@pytest.mark.slow
def test_context_parallel_4_ranks():
    reports = _check(4)
    _check_bytes(reports, 4)


def _check_bytes(reports, world):
    """All-to-all traffic balances over the ranks; Ulysses moves what the cost model says; auto ran
    the method whose remaining traffic is smaller."""
    for key in reports[0]["bytes"]:
        per_rank = [rep["bytes"][key] for rep in reports]
        phases = per_rank[0][3]
        for phase in phases:
            if phase.startswith(("ulysses", "sparse", "backward:")):
                sent = sum(p[3][phase][0] for p in per_rank)
                recv = sum(p[3][phase][1] for p in per_rank)
                assert sent == recv, (key, phase, sent, recv)
        if key.endswith("-ulysses") or per_rank[0][0] == "ulysses":
            name = key.rsplit("-", 2)[0]
            case = next(c for c in CASES if c[0] == name)
            _, batch, seqlen, hq, hkv, d, _, _ = case
            want = cost.ulysses_bytes(seqlen, world, batch, hq, hkv, d, elem=8, backward=True)
            # lse (float64, one value per query head) goes back with the output in these calls.
            want += (world - 1) / world * batch * seqlen / world * hq * 8
            got = sum(s for phase, (s, _) in per_rank[0][3].items() if "ulysses" in phase)
            assert got == pytest.approx(want), (key, got, want)
        assert len({p[0] for p in per_rank}) == 1, f"{key}: ranks ran different methods {per_rank}"
        if key.endswith("-sparse"):
            # The rows fetched are exactly the remote rows of the whole-sequence selection.
            name, kind = key.rsplit("-", 2)[:2]
            _, batch, seqlen, hq, hkv, d, bs, top_k = next(c for c in CASES if c[0] == name)
            q, k, _, _ = _data(batch, seqlen, hq, hkv, d)
            idx = select_blocks(q, k, bs, top_k, causal=kind == "causal")
            want = cost.remote_rows_from_selection(idx, world, bs, causal=kind == "causal")
            got = [p[3].get("sparse:kv", [0, 0])[1] // (2 * hkv * d * 8) for p in per_rank]
            assert got == want, (key, got, want)


def test_ulysses_kv_heads():
    assert cost.ulysses_kv_heads(8, 4, 2) == [[0, 1], [2, 3]]  # split
    assert cost.ulysses_kv_heads(8, 2, 4) == [[0], [0], [1], [1]]  # one per rank (P > Hkv)
    assert cost.ulysses_kv_heads(12, 3, 2) == [[0, 0, 0, 0, 1, 1], [1, 1, 2, 2, 2, 2]]  # replicated


def test_cost_model_orders():
    """At 1M tokens on 32 ranks (Hq 32 / Hkv 8, D 128): Ulysses sends less than a quarter of ring."""
    ring = cost.ring_bytes(1 << 20, 32, 1, 8, 128)
    uly = cost.ulysses_bytes(1 << 20, 32, 1, 32, 8, 128)
    assert uly < ring / 4
    # The sparse method fetching nothing remote costs only its block sums and a count exchange.
    assert cost.sparse_bytes(1 << 20, 32, 1, 8, 128, 512, remote_rows=0) < uly / 10


def test_needs_an_initialised_process_group():
    from moba.distributed import moba_attn_func_cp

    q = torch.zeros(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        moba_attn_func_cp(q, q, q, 4, 2)


def _fail_on_rank_one(rank: int, world: int):
    if rank == 1:
        raise ValueError("rank one fails")
    return rank


def test_run_local_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="rank one fails"):
        run_local(_fail_on_rank_one, 2)
