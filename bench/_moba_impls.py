"""Third-party ways to compute MoBA, for comparison in ``attn_speed.py``.

* ``official_moba``: a re-implementation, written from the MoBA paper's description
  (Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs", section 2.3
  and its Algorithm 1), of the official algorithm: mean-pooled key chunks score every query,
  the own chunk is always selected and future chunks never; the own chunk is attended
  causally with *dense varlen attention over the chunks*; the (query, chunk) pairs of the
  other selected chunks are gathered, grouped per (chunk, head) and attended densely; the
  two partial results are merged by log-sum-exp. With ``flash_attn`` and CUDA both dense
  steps are ``flash_attn_varlen_func`` calls (forward only here: flash-attn does not
  differentiate its returned LSE, and the official custom backward is not re-implemented);
  otherwise each chunk is a plain PyTorch matmul-softmax (differentiable).
* ``flex_moba``: torch FlexAttention with a MoBA ``BlockMask``, built from
  ``moba.select_blocks`` indices without any O(S^2) tensor: the block structure is
  (query tile of 128 rows) x (MoBA block), and the exact per-query selection is a
  ``mask_mod`` that looks bits up in a (B, Hq, S, ceil(n_blocks / 32)) int32 bitset.

Both take the flash-attn layout: q (B, S, Hq, D), k, v (B, S, Hkv, D), and use only the
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
def official_gate(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """The official MoBA gate (causal): (B, S, Hq, min(top_k, nb)) int64 chunk indices, -1 padded.

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


# ----------------------------------------------------------------------------- official MoBA
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


def official_moba(
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
    """Official-style MoBA (causal only): q (B, S, Hq, D), k, v (B, S, Hkv, D) -> (B, S, Hq, D).

    ``block_indices`` (B, S, Hq, slots), e.g. from ``moba.select_blocks``, replaces the gate.
    ``use_flash`` defaults to "flash_attn importable and CUDA tensors".
    """
    if not causal:
        raise NotImplementedError("the official MoBA algorithm is causal only")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if use_flash is None:
        use_flash = flash_attn_usable(q.device)
    with torch.no_grad():
        idx = official_gate(q, k, block_size, top_k) if block_indices is None else block_indices.long()
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


# ----------------------------------------------------------------------------- FlexAttention
def flex_attention_status(device) -> str | None:
    """None when FlexAttention can run on ``device``, else why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch.nn.attention.flex_attention not importable ({e})"
    return None


def moba_block_mask(block_indices: torch.Tensor, seqlen: int, block_size: int, causal: bool, q_block: int = 128):
    """A FlexAttention ``BlockMask`` with the exact per-query MoBA selection, O(S * n_blocks) memory.

    block_indices: (B, S, Hq, slots) from ``moba.select_blocks``. Block structure: query tiles
    of ``q_block`` rows x MoBA blocks (``BLOCK_SIZE=(q_block, block_size)``); a (tile, block)
    pair is *full* when every query of the tile selected the block and no causal cut falls in
    it, *partial* when some did (then ``mask_mod`` decides per query from a bitset).
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, s, hq, _ = block_indices.shape
    dev = block_indices.device
    nb = -(-seqlen // block_size)
    n_words = -(-nb // 32)
    nq = -(-s // q_block)
    bits = torch.empty(b, hq, s, n_words, dtype=torch.int32, device=dev)
    counts = torch.zeros(b, hq, nq * nb, dtype=torch.int32, device=dev)
    tile = (torch.arange(s, device=dev) // q_block).view(1, s, 1)
    for h in range(hq):  # one head at a time bounds the int64 temporaries to (B, S, slots)
        idx = block_indices[:, :, h].long()  # (B, S, slots)
        valid = idx >= 0
        j = idx.clamp(min=0)
        # Bitset (B, S, words): bit j % 32 of word j // 32 is set when block j is selected.
        words = torch.zeros(b, s, n_words, dtype=torch.int64, device=dev)
        words.scatter_add_(-1, j // 32, torch.where(valid, torch.ones_like(j) << (j % 32), torch.zeros_like(j)))
        bits[:, h] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        # (tile, block) selection counts -> partial / full structure.
        counts[:, h].scatter_add_(-1, (tile * nb + j).masked_fill(~valid, 0).reshape(b, -1),
                                  valid.to(torch.int32).reshape(b, -1))
    counts = counts.view(b, hq, nq, nb)
    tile_len = torch.clamp(s - torch.arange(nq, device=dev) * q_block, max=q_block)
    blk = torch.arange(nb, device=dev)
    full = counts == tile_len[:, None].to(torch.int32)
    full &= (blk * block_size + block_size <= seqlen)[None, :]  # the tail block keeps its mask
    if causal:  # block entirely at or before the tile's first query
        full &= ((blk + 1) * block_size - 1 <= torch.arange(nq, device=dev)[:, None] * q_block)
    partial = (counts > 0) & ~full

    def ordered(m):
        num = m.sum(-1, dtype=torch.int32)
        ind = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, ind.contiguous()

    kv_num, kv_ind = ordered(partial)
    full_num, full_ind = ordered(full)

    def mask_mod(bi, hi, qi, ki):
        blk_k = ki // block_size
        word = bits[bi, hi, qi, blk_k // 32]
        keep = ((word >> (blk_k % 32)) & 1) == 1
        if causal:
            keep = keep & (ki <= qi)
        return keep

    return BlockMask.from_kv_blocks(
        kv_num, kv_ind, full_num, full_ind, BLOCK_SIZE=(q_block, block_size), mask_mod=mask_mod,
        seq_lengths=(seqlen, seqlen),
    )


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
    bm = moba_block_mask(block_indices, q.shape[1], block_size, causal, q_block)
    fn = flex_attention
    if compiled:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED_FLEX
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, scale=scale,
             enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)

