"""KV-cache sparse decoding: incremental block means, decode == prefill, crop, Triton decode kernel."""

import os
import sys
import textwrap

import pytest
import torch

import moba
from moba._core.layout import build_layout
from moba.decode import BlockMeanState, decode_attention_torch, moba_decode
from moba.ops.gate import block_means, pad_block_means
from tests._helpers import ROOT
from tests._subprocess import run_child


def _means_from_scratch(k_rows):
    """Padded block means recomputed from the keys of every row: list of (L_b, Hkv, D)."""
    cu = [0]
    for k in k_rows:
        cu.append(cu[-1] + k.shape[0])
    layout = build_layout(cu, cu, BS, "cpu")
    return pad_block_means(block_means(torch.cat(k_rows), layout), layout)


BS = 5


def test_incremental_block_means_after_appends_and_crop():
    torch.manual_seed(0)
    b, lk, hkv, d = 2, 63, 2, 8
    keys = torch.randn(b, lk, hkv, d)
    starts = [0, 4]  # row 1 is left-padded by 4
    state = BlockMeanState(BS)
    length = 7
    state.update(keys[:, :length], starts, length)  # "prefill"
    for n_new in [1, 1, 3, 1, 2, 5, 1, 1, 4, 1, 6, 1, 1, 2, 1, 1, 1, 3, 1, 1, 1, 1, 1, 2, 1]:
        if length + n_new > lk:
            break
        length += n_new
        state.update(keys[:, :length], starts, n_new)
        expected = _means_from_scratch([keys[r, starts[r] : length] for r in range(b)])
        torch.testing.assert_close(state.padded_means(), expected, rtol=1e-5, atol=1e-6)
    assert state.lengths == [length - s for s in starts]
    # crop 9 tokens (not on a block boundary), then append 2 different tokens
    other = torch.randn(b, 2, hkv, d)
    cropped = torch.cat([keys[:, : length - 9], other], dim=1)
    state.update(cropped, starts, 2)
    expected = _means_from_scratch([cropped[r, starts[r] :] for r in range(b)])
    torch.testing.assert_close(state.padded_means(), expected, rtol=1e-5, atol=1e-6)
    # the folded-in work after the crop is only the partial block + the new tokens
    assert state.lengths == [cropped.shape[1] - s for s in starts]


def test_state_row_edits_follow_beam_reordering():
    torch.manual_seed(1)
    keys = torch.randn(3, 12, 1, 4)
    state = BlockMeanState(BS)
    state.update(keys, [0, 0, 0], 12)
    state.select_rows(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(state.padded_means(), _means_from_scratch([keys[2], keys[2], keys[0]]))
    state.repeat_rows(2)
    assert state.sums.shape[0] == 6 and state.lengths == [12] * 6


@pytest.mark.parametrize("hq,hkv,bs,top_k", [(4, 2, 5, 3), (2, 2, 8, 2), (4, 1, 3, 4)])
def test_decode_equals_prefill(hq, hkv, bs, top_k):
    torch.manual_seed(hq * 10 + bs)
    b, s, d = 2, 41, 16
    q = torch.randn(b, s, hq, d, dtype=torch.float64)
    k = torch.randn(b, s, hkv, d, dtype=torch.float64)
    v = torch.randn(b, s, hkv, d, dtype=torch.float64)
    reference = moba.moba_attn_func(q, k, v, bs, top_k)
    state = BlockMeanState(bs)
    t = 9
    outs = [moba_decode(q[:, :t], k[:, :t], v[:, :t], state, bs, top_k)]  # prefill as a "chunk"
    chunks = iter([1, 1, 3, 1, 2, 1, 4] + [1] * 40)
    while t < s:
        n = min(next(chunks), s - t)
        # the cache is a transformers-style (B, Hkv, L, D) tensor seen through a transpose
        k_cache = k[:, : t + n].transpose(1, 2).contiguous().transpose(1, 2)
        v_cache = v[:, : t + n].transpose(1, 2).contiguous().transpose(1, 2)
        outs.append(moba_decode(q[:, t : t + n], k_cache, v_cache, state, bs, top_k))
        t += n
    torch.testing.assert_close(torch.cat(outs, dim=1), reference, rtol=1e-10, atol=1e-10)


def test_decode_left_padding_and_crop_equal_unpadded_prefill():
    torch.manual_seed(3)
    hq, hkv, d, bs, top_k = 4, 2, 8, 4, 2
    lens = [30, 23]
    seqs = [(torch.randn(n, hq, d, dtype=torch.float64), torch.randn(n, hkv, d, dtype=torch.float64),
             torch.randn(n, hkv, d, dtype=torch.float64)) for n in lens]
    lk = max(lens)
    starts = [lk - n for n in lens]

    def padded(i, total):  # left-padded cache of width `total`: row r holds its first total - starts[r] tokens
        out = torch.zeros(2, total, *seqs[0][i].shape[1:], dtype=torch.float64)
        for r in range(2):
            out[r, starts[r] :] = seqs[r][i][: total - starts[r]]
        return out

    state = BlockMeanState(bs)
    for total in range(8, lk + 1):
        qb, kb, vb = padded(0, total), padded(1, total), padded(2, total)
        out = moba_decode(qb[:, -1:], kb, vb, state, bs, top_k, starts=starts)
        for r in range(2):
            n_real = total - starts[r]
            ref = moba.moba_attn_func(*(x[None, :n_real] for x in seqs[r]), bs, top_k)
            torch.testing.assert_close(out[r, 0], ref[0, -1], rtol=1e-10, atol=1e-10)
    # crop 5 tokens and decode again (speculative decoding rejects tokens)
    kb, vb, qb = padded(1, lk - 5), padded(2, lk - 5), padded(0, lk - 5)
    out = moba_decode(qb[:, -1:], kb, vb, state, bs, top_k, starts=starts)
    for r in range(2):
        n_real = lk - 5 - starts[r]
        ref = moba.moba_attn_func(*(x[None, :n_real] for x in seqs[r]), bs, top_k)
        torch.testing.assert_close(out[r, 0], ref[0, -1], rtol=1e-10, atol=1e-10)


def test_decode_bad_inputs():
    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 6, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        moba_decode(q, k, k, BlockMeanState(2), 2, 2)
    with pytest.raises(ValueError, match="state.block_size"):
        moba_decode(q, k[:, :, :2], k[:, :, :2], BlockMeanState(3), 2, 2)
    with pytest.raises(ValueError, match="decode backend"):
        moba_decode(q, k[:, :, :2], k[:, :, :2], BlockMeanState(2), 2, 2, backend="cuda")


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from moba.decode import BlockMeanState, moba_decode
    from moba.triton_kernels.decode import moba_decode_triton
    torch.manual_seed(0)
    b, lk, lq, hq, hkv, d, bs = 2, 29, 3, 4, 2, 16, 6
    for dtype in (torch.float32, torch.float16):
        kc = torch.randn(b, hkv, lk, d, dtype=dtype).transpose(1, 2)   # transformers cache layout
        vc = torch.randn(b, hkv, lk, d, dtype=dtype).transpose(1, 2)
        q = torch.randn(b, lq, hq, d, dtype=dtype)
        ref, idx = moba_decode(q, kc, vc, BlockMeanState(bs), bs, 3, starts=[0, 4], backend="torch",
                               return_block_indices=True)
        starts, lengths = torch.tensor([0, 4]), torch.tensor([lk, lk - 4])
        for n_splits in (None, 1, 3):
            out = moba_decode_triton(q, kc, vc, idx, starts, lengths, bs, d ** -0.5, n_splits=n_splits)
            err = (out.float() - ref.float()).abs().max().item()
            assert err <= (1e-5 if dtype == torch.float32 else 2e-3), (dtype, n_splits, err)
        # the public path with backend="triton" runs the kernel under the interpreter too
        out = moba_decode(q, kc, vc, BlockMeanState(bs), bs, 3, starts=[0, 4], backend="triton")
        assert (out.float() - ref.float()).abs().max().item() <= 2e-3
    print("OK")
    """
)


def _run(script: str, **env) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env, PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1")
    proc = run_child([sys.executable, "-c", script], env=full_env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_triton_decode_kernel_interpreter():
    pytest.importorskip("triton")
    assert "OK" in _run(_INTERPRETER_SCRIPT, TRITON_INTERPRET="1")


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from moba.triton_kernels.decode import (_moba_decode_merge_kernel, _moba_decode_split_kernel,
                                            decode_launch_config)
    target = GPUTarget("cuda", 90, 32)
    ints = ["stride_qb", "stride_ql", "stride_qh", "stride_qd", "stride_kb", "stride_kl", "stride_kh",
            "stride_kd", "stride_vb", "stride_vl", "stride_vh", "stride_vd", "stride_ib", "stride_il",
            "stride_ih", "stride_iw", "Lq", "n_heads", "n_slots", "block_size", "tiles_per_block",
            "units_per_split"]
    for dt, (rows, hq, group, slots, bs, d) in [("bf16", (1, 32, 4, 3, 512, 128)), ("fp16", (8, 8, 1, 4, 100, 64))]:
        cfg = decode_launch_config(rows, hq, slots, bs, d)
        sig = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "IDX": "*i32", "START": "*i64", "LEN": "*i64",
               "O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32"}
        sig.update({n: "i64" for n in ints}, scale="fp32")
        const = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], N_SPLITS=cfg["N_SPLITS"])
        sig.update({c: "constexpr" for c in const})
        split = triton.compile(triton.compiler.ASTSource(fn=_moba_decode_split_kernel, signature=sig,
                                                         constexprs=const), target=target)
        sig = {"O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32", "OUT": "*" + dt}
        sig.update({n: "i64" for n in ["stride_ob", "stride_ol", "stride_oh", "stride_od", "Lq", "n_heads"]})
        const = dict(HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], N_SPLITS=cfg["N_SPLITS"], BLOCK_S=cfg["BLOCK_S"])
        sig.update({c: "constexpr" for c in const})
        merge = triton.compile(triton.compiler.ASTSource(fn=_moba_decode_merge_kernel, signature=sig,
                                                         constexprs=const), target=target)
        for kernel in (split, merge):
            assert ".target sm_90" in kernel.asm["ptx"] and len(kernel.asm["cubin"]) > 0
            assert kernel.metadata.shared <= 228 * 1024
        print(dt, cfg["N_SPLITS"], split.metadata.shared)
    print("OK")
    """
)


def test_triton_decode_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    assert "OK" in _run(_COMPILE_SCRIPT)


def test_decode_torch_path_reads_only_selected_blocks():
    """Garbage (NaN) in unselected cache blocks and in the padding must not reach the output."""
    torch.manual_seed(5)
    b, lk, hq, hkv, d, bs = 1, 20, 2, 1, 4, 4
    q = torch.randn(b, 1, hq, d)
    k = torch.randn(b, lk, hkv, d)
    v = torch.randn(b, lk, hkv, d)
    idx = torch.tensor([[[[0, 4, -1], [2, 4, -1]]]])  # blocks 0/2 and the own block 4
    v_bad = v.clone()
    v_bad[:, 4:8] = float("nan")  # block 1: selected by nobody
    out = decode_attention_torch(q, k, v_bad, idx, torch.tensor([0]), torch.tensor([lk]), bs, d**-0.5)
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,lq,block_size", [(1, 1, 512), (4, 3, 100)])
def test_triton_decode_kernel_cuda(dtype, batch, lq, block_size):
    """On CUDA: the Triton decode kernel against the float64 truth, within 2x the error of the
    PyTorch decode path run on the same low-precision inputs (docs/design.md tolerance rule)."""
    dev = "cuda"
    hq, hkv, d, lk, top_k = 16, 4, 128, 4000, 3
    kc = torch.randn(batch, hkv, lk, d, device=dev, dtype=dtype).transpose(1, 2)
    vc = torch.randn(batch, hkv, lk, d, device=dev, dtype=dtype).transpose(1, 2)
    q = torch.randn(batch, lq, hq, d, device=dev, dtype=dtype)
    starts = [0] + [17 * i for i in range(1, batch)]
    _, idx = moba_decode(q, kc, vc, BlockMeanState(block_size), block_size, top_k, starts=starts, backend="torch",
                         return_block_indices=True)
    args = (idx, torch.tensor(starts, device=dev), torch.tensor([lk - s for s in starts], device=dev),
            block_size, d**-0.5)
    truth = decode_attention_torch(q.double(), kc.double(), vc.double(), *args)
    torch_path = decode_attention_torch(q, kc, vc, *args)
    from moba.triton_kernels.decode import moba_decode_triton

    for n_splits in (None, 1, 7):
        out = moba_decode_triton(q, kc, vc, *args, n_splits=n_splits)
        err = (out.double() - truth).abs().max().item()
        ref_err = (torch_path.double() - truth).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, (n_splits, err, ref_err)
    auto = moba_decode(q, kc, vc, BlockMeanState(block_size), block_size, top_k, starts=starts)  # auto: Triton
    assert (auto.double() - truth).abs().max().item() <= 2 * ref_err + 1e-6


def test_decode_zero_rows():
    """A batch of zero rows gives an empty output (and empty block indices)."""
    q, kc = torch.randn(0, 2, 4, 8), torch.randn(0, 5, 2, 8)
    out, idx = moba_decode(q, kc, kc, BlockMeanState(4), 4, 2, backend="torch", return_block_indices=True)
    assert out.shape == q.shape and idx.shape[:3] == (0, 2, 4)
