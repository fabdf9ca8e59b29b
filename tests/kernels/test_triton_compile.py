"""Ahead-of-time GPU compiles of every Triton kernel configuration, no GPU needed.

Each kernel and each tile configuration the launchers can launch (enumerated from the same
config tables they use, through ``kernel_configs``) is compiled for sm_90 (H100) and sm_80
(A100) in float16 and bfloat16. The test fails on a compile error or on shared memory above
the target's limit; for sm_90 it asserts that the attention kernels (fp16/bf16 ``tl.dot``)
use wgmma, and so does the gate's tf32x3 score dot in the 64-row tiles (D <= 128).

Compiles run in a subprocess with TRITON_INTERPRET unset: Triton decides interpreter mode at
decoration time, so this works in any session (also one started with TRITON_INTERPRET=1).
Two worker processes share the compiles; Triton's on-disk cache makes reruns fast. No time
limit: the child is killed only if it stalls (``tests._subprocess.run_child``), and its process
pool goes with it.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from tests._subprocess import run_child

SHARED_LIMIT = {90: 232448, 80: 166912}

_WORKER = textwrap.dedent(
    """
    import json, sys
    from concurrent.futures import ProcessPoolExecutor

    def compile_all(job):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from moba.triton_kernels import attention, gate
        cc, dtype, part, n_parts = job
        results = []
        jobs = [(mod.__name__, cfg) for mod in (attention, gate) for cfg in mod.kernel_configs(dtype)]
        for i, (module, (name, fn, sig, const, warps, stages)) in enumerate(jobs):
            if i % n_parts != part:
                continue
            entry = dict(cc=cc, dtype=dtype, module=module, name=name)
            try:
                signature = dict(sig, **{key: "constexpr" for key in const})
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=const),
                    target=GPUTarget("cuda", cc, 32),
                    options=dict(num_warps=warps, num_stages=stages),
                )
                entry.update(shared=compiled.metadata.shared, wgmma="wgmma" in compiled.asm["ptx"])
            except Exception as exc:  # reported by the test
                entry.update(error=f"{type(exc).__name__}: {exc}"[:3000])
            results.append(entry)
            print(f"compiled sm_{cc} {dtype} {name}", flush=True)  # progress for the stall watchdog
        return results

    if __name__ == "__main__":
        cc, dtype = int(sys.argv[1]), sys.argv[2]
        n = 2
        with ProcessPoolExecutor(n) as pool:
            parts = list(pool.map(compile_all, [(cc, dtype, p, n) for p in range(n)]))
        print("RESULTS " + json.dumps([r for part in parts for r in part]))
    """
)


def _compile(cc: int, dtype: str, tmp_path) -> list[dict]:
    script = tmp_path / "compile_worker.py"
    script.write_text(_WORKER)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = run_child([sys.executable, str(script), str(cc), dtype], env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    return json.loads(line[len("RESULTS ") :])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("cc", [90, 80])
def test_every_kernel_config_compiles(cc, dtype, tmp_path):
    from moba.triton_kernels import attention, gate

    results = _compile(cc, dtype, tmp_path)
    expected = {name for mod in (attention, gate) for name, *_ in mod.kernel_configs(dtype)}
    assert {r["name"] for r in results} == expected
    errors = [f"{r['name']}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    too_big = [f"{r['name']}: {r['shared']} B" for r in results if r["shared"] > SHARED_LIMIT[cc]]
    assert not too_big, f"shared memory above the sm_{cc} limit {SHARED_LIMIT[cc]}: {too_big}"
    if cc == 90:
        # (the dk/dv partial reduce and the backward's delta are plain sums: no matmul)
        no_wgmma = [r["name"] for r in results if r["module"].endswith(".attention") and not r["wgmma"]
                    and not r["name"].startswith(("dkdv_reduce", "delta_"))]
        assert not no_wgmma, f"attention kernels without wgmma on sm_90: {no_wgmma}"
        gate_64_rows = [r for r in results if r["name"].startswith(("gate_d64_", "gate_d128_"))]
        assert gate_64_rows and all(r["wgmma"] for r in gate_64_rows), "gate score dot without wgmma on sm_90"
