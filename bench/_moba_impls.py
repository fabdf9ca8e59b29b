"""Other ways to compute MoBA, for comparison in ``attn_speed.py``.

* ``paper_reimpl_moba`` (provider ``moba-paper-reimpl``): our re-implementation, written from
  the MoBA paper's description (Lu et al., 2025, "MoBA: Mixture of Block Attention for
  Long-Context LLMs", section 2.3 and its Algorithm 1), of the official algorithm; it is *not*
  the official code. Mean-pooled key chunks score every query, the own chunk is always
  selected and future chunks never; the own chunk is attended causally with *dense varlen
  attention over the chunks*; the (query, chunk) pairs of the other selected chunks are
  gathered, grouped per (chunk, head) and attended densely; the two partial results are merged
  by log-sum-exp. With ``flash_attn`` and CUDA both dense steps are ``flash_attn_varlen_func``
  calls (forward only here: flash-attn does not differentiate its returned LSE, and the
  official custom backward is not re-implemented); otherwise each chunk is a plain PyTorch
  matmul-softmax (differentiable).
* ``load_official_moba`` (provider ``moba-official``): the real official code,
  ``moba_attn_varlen`` from a checkout of https://github.com/MoonshotAI/MoBA (needs CUDA and
  flash-attn). Both packages install the top-level name ``moba``, so the official one cannot
  be imported next to ours: its ``moba/moba_efficient.py`` (self-contained: torch, flash_attn,
  einops) is loaded from the checkout under another module name.
* ``flex_moba``: torch FlexAttention with the MoBA ``BlockMask`` of ``moba.flex_block_mask``.

All take the flash-attn layout: q (B, S, Hq, D), k, v (B, S, Hkv, D), and use only the
public API of ``moba``.
"""

from __future__ import annotations

import torch

import moba

# Bound on the elements of one chunk of float32 scores in the PyTorch fallbacks.
_CHUNK_ELEMENTS = 1 << 24


def flash_attn_usable(device) -> bool:
    if torch.device(device).type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- gate
def paper_reimpl_gate(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """The paper's MoBA gate (causal): (B, S, Hq, min(top_k, nb)) int64 chunk indices, -1 padded.

    Chunk representative = mean of its keys; score = q . mean in float32; the own chunk gets
    +inf (always selected), future chunks and the own chunk's successors -inf; top-k.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nb = -(-s // block_size)
    pad = nb * block_size - s
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pad))
    lens = torch.clamp(s - torch.arange(nb, device=k.device) * block_size, max=block_size).float()
    means = kp.view(b, nb, block_size, hkv, d).sum(2) / lens[None, :, None, None]  # (B, nb, Hkv, D)
    width = min(top_k, nb)
    out = torch.empty(b, s, hq, width, dtype=torch.long, device=q.device)
    chunks = torch.arange(nb, device=q.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * nb))
    for t0 in range(0, s, step):
        t1 = min(s, t0 + step)
        qc = q[:, t0:t1].float().view(b, t1 - t0, hkv, g, d)
        score = torch.einsum("bthgd,bnhd->bthgn", qc, means).reshape(b, t1 - t0, hq, nb)
        own = (torch.arange(t0, t1, device=q.device) // block_size)[None, :, None, None]
        score = score.masked_fill(chunks > own, float("-inf")).masked_fill(chunks == own, float("inf"))
        val, idx = score.topk(width, dim=-1)
        out[:, t0:t1] = idx.masked_fill(val == float("-inf"), -1)
    return out


# ----------------------------------------------------------------------------- MoBA re-implemented from the paper
def _dense_lse(q, k, v, scale, causal):
    """(N, Hq, L, D) x (N, Hkv, L, D) -> float32 out (N, Hq, L, D) and LSE (N, Hq, L), in chunks."""
    n, hq, length, d = q.shape
    g = hq // k.shape[1]
    outs, lses = [], []
    step = max(1, _CHUNK_ELEMENTS // max(1, hq * length * length))
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril() if causal else None
    for a in range(0, n, step):
        qa = q[a : a + step].float()
        ka = k[a : a + step].float().repeat_interleave(g, dim=1)
        va = v[a : a + step].float().repeat_interleave(g, dim=1)
        s = torch.matmul(qa, ka.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), va))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _self_part_torch(q, k, v, block_size, scale):
    """Own chunk, causal: out (B, S, Hq, D) float32 and LSE (B, S, Hq)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    nfull = s // block_size
    outs, lses = [], []
    if nfull:
        def split(x, h):
            return x[:, : nfull * block_size].reshape(b * nfull, block_size, h, d).transpose(1, 2)

        o, lse = _dense_lse(split(q, hq), split(k, hkv), split(v, hkv), scale, True)
        outs.append(o.transpose(1, 2).reshape(b, nfull * block_size, hq, d))
        lses.append(lse.transpose(1, 2).reshape(b, nfull * block_size, hq))
    if s > nfull * block_size:
        t0 = nfull * block_size
        o, lse = _dense_lse(q[:, t0:].transpose(1, 2), k[:, t0:].transpose(1, 2), v[:, t0:].transpose(1, 2), scale, True)
        outs.append(o.transpose(1, 2))
        lses.append(lse.transpose(1, 2))
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _gathered_pairs(idx, block_size):
    """Non-own (query, head, chunk) selections sorted by (batch, chunk, head): b, t, h, j tensors."""
    s = idx.shape[1]
    own = (torch.arange(s, device=idx.device) // block_size)[None, :, None, None]
    b_, t_, h_, slot = ((idx >= 0) & (idx != own)).nonzero(as_tuple=True)
    j_ = idx[b_, t_, h_, slot]
    hq = idx.shape[2]
    nb = -(-s // block_size)
    key = (b_ * nb + j_) * hq + h_
    order = torch.argsort(key, stable=True)
    return b_[order], t_[order], h_[order], j_[order], key[order]


def _moba_part_torch(q, k, v, block_size, scale, sel):
    """Attention of the gathered (query, head) rows over their chunk: out (N, D) f32, LSE (N,)."""
    b_, t_, h_, j_, key = sel
    hq, d = q.shape[2], q.shape[3]
    g = hq // k.shape[2]
    outs, lses = [], []
    if key.numel() == 0:
        return q.new_zeros(0, d, dtype=torch.float32), q.new_zeros(0, dtype=torch.float32)
    chunk_key = key // hq  # b * nb + j
    groups, counts = torch.unique_consecutive(chunk_key, return_counts=True)
    start = 0
    for cnt in counts.tolist():
        sl = slice(start, start + cnt)
        start += cnt
        bb = int(b_[sl][0])
        j = int(j_[sl][0])
        heads = h_[sl]
        hcount = torch.bincount(heads, minlength=hq)
        first = torch.cumsum(hcount, 0) - hcount
        pos = torch.arange(cnt, device=q.device) - first[heads]
        n_max = int(hcount.max())
        rows = q[bb, t_[sl], heads].float()  # (cnt, D)
        qpad = torch.zeros(hq, n_max, d, device=q.device, dtype=torch.float32).index_put((heads, pos), rows)
        k0, k1 = j * block_size, min(q.shape[1], (j + 1) * block_size)
        kj = k[bb, k0:k1].float().transpose(0, 1).repeat_interleave(g, dim=0)  # (Hq, L, D)
        vj = v[bb, k0:k1].float().transpose(0, 1).repeat_interleave(g, dim=0)
        sc = torch.matmul(qpad, kj.transpose(-1, -2)) * scale  # (Hq, n_max, L)
        lse = torch.logsumexp(sc, dim=-1)
        o = torch.matmul(torch.exp(sc - lse[..., None]), vj)
        outs.append(o[heads, pos])
        lses.append(lse[heads, pos])
    return torch.cat(outs), torch.cat(lses)


def _flash_parts(q, k, v, block_size, scale, sel):  # pragma: no cover - needs CUDA + flash-attn
    """The two dense steps with flash_attn_varlen_func (forward only)."""
    from flash_attn import flash_attn_varlen_func

    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nb = -(-s // block_size)
    bounds = [min(s, i * block_size) for i in range(nb + 1)]
    cu = torch.tensor([bi * s + x for bi in range(b) for x in bounds[:-1]] + [b * s], dtype=torch.int32, device=q.device)
    o, lse, _ = flash_attn_varlen_func(
        q.reshape(b * s, hq, d), k.reshape(b * s, hkv, d), v.reshape(b * s, hkv, d), cu, cu,
        block_size, block_size, softmax_scale=scale, causal=True, return_attn_probs=True,
    )
    self_out = o.float().view(b, s, hq, d)
    self_lse = lse.float()[:, : b * s].transpose(0, 1).reshape(b, s, hq)  # flash-attn: (Hq, total)
    b_, t_, h_, j_, key = sel
    if key.numel() == 0:
        return self_out, self_lse, q.new_zeros(0, d, dtype=torch.float32), q.new_zeros(0, dtype=torch.float32)
    groups, counts = torch.unique_consecutive(key, return_counts=True)
    cu_q = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
    gb = groups // (nb * hq)
    gj = (groups // hq) % nb
    gh = groups % hq
    tok = gj[:, None] * block_size + torch.arange(block_size, device=q.device)[None, :]  # past chunks are complete
    km = k[gb[:, None], tok, (gh // g)[:, None]].reshape(-1, 1, d)
    vm = v[gb[:, None], tok, (gh // g)[:, None]].reshape(-1, 1, d)
    cu_k = (torch.arange(groups.numel() + 1, device=q.device) * block_size).to(torch.int32)
    qm = q[b_, t_, h_].reshape(-1, 1, d)
    om, lsem, _ = flash_attn_varlen_func(
        qm, km, vm, cu_q, cu_k, int(counts.max()), block_size, softmax_scale=scale, causal=False,
        return_attn_probs=True,
    )
    return self_out, self_lse, om.float().view(-1, d), lsem.float()[0, : qm.shape[0]]


def paper_reimpl_moba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_indices: torch.Tensor | None = None,
    use_flash: bool | None = None,
) -> torch.Tensor:
    """MoBA as the paper describes the official algorithm (causal only), re-implemented here:
    q (B, S, Hq, D), k, v (B, S, Hkv, D) -> (B, S, Hq, D).

    ``block_indices`` (B, S, Hq, slots), e.g. from ``moba.select_blocks``, replaces the gate.
    ``use_flash`` defaults to "flash_attn importable and CUDA tensors".
    """
    if not causal:
        raise NotImplementedError("the paper's MoBA algorithm (and the official code) is causal only")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if use_flash is None:
        use_flash = flash_attn_usable(q.device)
    with torch.no_grad():
        idx = paper_reimpl_gate(q, k, block_size, top_k) if block_indices is None else block_indices.long()
        sel = _gathered_pairs(idx, block_size)
    if use_flash:
        self_out, self_lse, part_out, part_lse = _flash_parts(q, k, v, block_size, scale, sel)
    else:
        self_out, self_lse = _self_part_torch(q, k, v, block_size, scale)
        part_out, part_lse = _moba_part_torch(q, k, v, block_size, scale, sel)
    b_, t_, h_ = sel[0], sel[1], sel[2]
    # Log-sum-exp merge: lse = log(exp(self) + sum exp(parts)), out = sum exp(lse_i - lse) out_i.
    flat = ((b_ * q.shape[1]) + t_) * q.shape[2] + h_
    m = self_lse.detach().reshape(-1).clone()
    m = m.scatter_reduce(0, flat, part_lse.detach(), reduce="amax")
    total = torch.exp(self_lse.reshape(-1) - m).index_add(0, flat, torch.exp(part_lse - m[flat]))
    lse = m + torch.log(total)
    out = self_out.reshape(-1, q.shape[-1]) * torch.exp(self_lse.reshape(-1) - lse)[:, None]
    out = out.index_add(0, flat, part_out * torch.exp(part_lse - lse[flat])[:, None])
    return out.view(q.shape).to(q.dtype)


# ----------------------------------------------------------------------------- the official package
#: Environment variable naming a checkout of https://github.com/MoonshotAI/MoBA.
OFFICIAL_SRC_ENV = "MOBA_OFFICIAL_SRC"


def load_official_moba(src: str | None, device) -> tuple[object | None, str | None]:
    """The official ``moba_attn_varlen`` and None, or None and why it cannot run here.

    ``src``: a checkout of MoonshotAI/MoBA (the folder holding ``moba/moba_efficient.py``) or
    that file; None reads ``$MOBA_OFFICIAL_SRC``.
    """
    import importlib.util
    import os
    from pathlib import Path

    if torch.device(device).type != "cuda":
        return None, "the official MoBA package needs CUDA (flash-attn kernels)"
    if not flash_attn_usable(device):
        return None, "the official MoBA package needs flash-attn (pip install flash-attn)"
    src = src or os.environ.get(OFFICIAL_SRC_ENV)
    if not src:
        return None, (f"no official MoBA source: pass --official_moba_src or set ${OFFICIAL_SRC_ENV} to a checkout "
                      "of https://github.com/MoonshotAI/MoBA (it cannot be pip-installed next to this package: "
                      "both are the top-level module `moba`)")
    path = Path(src)
    path = path if path.suffix == ".py" else path / "moba" / "moba_efficient.py"
    if not path.is_file():
        return None, f"{path} does not exist (expected a MoonshotAI/MoBA checkout)"
    spec = importlib.util.spec_from_file_location("moba_official_efficient", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return None, f"loading {path} failed: {type(e).__name__}: {e}"
    fn = getattr(module, "moba_attn_varlen", None)
    if fn is None:
        return None, f"{path} has no moba_attn_varlen"
    return fn, None


def official_moba(fn, q, k, v, block_size: int, top_k: int) -> torch.Tensor:
    """Run the official ``moba_attn_varlen`` on (B, S, Hq, D) inputs (causal, default scale).

    The official code takes packed (T, H, D) tensors with as many KV heads as query heads, so
    K/V are repeated for GQA (as its transformers wrapper does).
    """
    b, s, hq, d = q.shape
    g = hq // k.shape[2]
    cu = torch.arange(b + 1, dtype=torch.int32, device=q.device) * s
    kk = k.repeat_interleave(g, dim=2).reshape(b * s, hq, d)
    vv = v.repeat_interleave(g, dim=2).reshape(b * s, hq, d)
    return fn(q.reshape(b * s, hq, d), kk, vv, cu, s, block_size, top_k).view(b, s, hq, d)


# ----------------------------------------------------------------------------- FlexAttention
def flex_attention_status(device) -> str | None:
    """None when FlexAttention can run on ``device``, else why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch.nn.attention.flex_attention not importable ({e})"
    return None


_COMPILED_FLEX = None


def flex_moba(
    q, k, v, block_size, top_k, causal=True, softmax_scale=None, block_indices=None, compiled=None, q_block=128
):
    """MoBA through FlexAttention: (B, S, Hq, D) layout in and out; gate = ``moba.select_blocks``.

    ``compiled`` defaults to True on CUDA (the fused kernel) and False on CPU (eager: a
    reference-speed path that materialises scores, for correctness only).
    """
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if compiled is None:
        compiled = q.device.type == "cuda"
    if block_indices is None:
        with torch.no_grad():
            block_indices = moba.select_blocks(q, k, block_size, top_k, causal)
    bm = moba.flex_block_mask(q, k, block_size, causal=causal, block_indices=block_indices, q_block=q_block,
                              layout="bshd")
    fn = flex_attention
    if compiled:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED_FLEX
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, scale=scale,
             enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)

