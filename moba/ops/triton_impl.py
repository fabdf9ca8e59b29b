"""The ``"triton"`` backend: fused Triton kernels for the MoBA gate and attention.

``BACKEND`` is the backend; ``moba.ops.registry`` imports this module on first use. The
kernels live in ``moba.triton_kernels`` (``gate.py``: block means + one-pass top-k;
``attention.py``: forward, backward dq, backward dk/dv; see their headers for the work
decomposition). This module wraps them as ``torch.library`` custom ops so that autograd and
``torch.compile`` see one opaque op per direction:

* ``moba::triton_attention_fwd(q, k, v, sorted_indices, cu_q, cu_k, block_size, causal, scale,
  decomposition) -> (out, lse, selection)``
* ``moba::triton_attention_bwd(dout, q, k, v, out, lse, sorted_indices, selection, cu_q, cu_k,
  block_size, causal, scale, decomposition) -> (dq, dk, dv)``
* ``moba::triton_gate(q, k, cu_q, cu_k, block_size, top_k, causal) -> block_indices``

``cu_q`` / ``cu_k`` are host lists of ints (sequence boundaries of the packed queries and
keys; queries aligned to the end of their key sequence, so ``cu_q != cu_k`` - decoding with a
KV cache - is supported). ``sorted_indices`` is ``moba.triton_kernels.attention.sort_block_indices``
of the block indices (int32, ascending, padding replaced by a large value). ``selection`` is
the selection in the layouts the kernels read (rows per key block, gather segments, the
forward's decomposition; ``attention.build_selection``), flat int32, built once on device in
the forward without host syncs and saved for the backward (``moba._core.custom_ops``).

Devices: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton and
this module were imported (the interpreter; it does not support bfloat16 in ``tl.dot``).
dtypes: float16, bfloat16, float32 (fp32 accumulation; on GPUs float32 ``tl.dot`` uses TF32).
Head dims up to 256 (padded to a power of two inside the kernels).
"""

from __future__ import annotations

import os

import torch

from .._core.custom_ops import register_attention_autograd
from .._core.layout import BlockLayout, build_layout, effective_block_size, gate_width, max_blocks
from ..triton_kernels import attention as _attn
from ..triton_kernels import gate as _gate
from .backend import Backend
from .gate import select_packed

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreted_kernels() -> bool:
    """Whether the kernels were decorated in interpreter mode (TRITON_INTERPRET=1 at import)."""
    return type(_attn._fwd_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device) -> str | None:
    """None when the Triton backend can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    interpret_env = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu":
        if not interpret_env:
            return "the Triton kernels need CUDA tensors (set TRITON_INTERPRET=1 to run them on CPU in the Triton interpreter)"
        if not _interpreted_kernels():
            return (
                "TRITON_INTERPRET=1 was set after the Triton kernels were imported; set it before "
                "importing triton / moba's Triton backend"
            )
        return None
    return f"the Triton backend does not support {device.type} tensors"


def _int32(values: list[int], device) -> torch.Tensor:
    """Host ints as an int32 tensor on ``device``: on CUDA through pinned memory, non-blocking
    (a pageable copy would make the host wait for the stream)."""
    host = torch.tensor(values, dtype=torch.int32)
    device = torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


_INTERPRETER_BF16 = ("the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) has no bfloat16 tl.dot (it "
                     "multiplies the raw bit patterns): use float16 / float32 on CPU, or CUDA tensors")


def unsupported_input(q: torch.Tensor) -> str | None:
    """None when the kernels handle q's dtype and head dim (on q's device), else why not."""
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"float16, bfloat16 and float32 only, got {q.dtype}"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and _interpreted_kernels():
        return _INTERPRETER_BF16
    if q.shape[-1] > 256:
        return f"head dims up to 256 only, got {q.shape[-1]}"
    return None


def _check_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in _SUPPORTED_DTYPES:
        raise NotImplementedError(f'backend="triton" supports float16, bfloat16 and float32, got {q.dtype}; use backend="torch"')
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise NotImplementedError(f'backend="triton" supports head dims up to 256, got {q.shape[-1]}; use backend="torch"')
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and _interpreted_kernels():
        raise NotImplementedError(f'backend="triton" with bfloat16 q: {_INTERPRETER_BF16}; or use backend="torch"')


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------
# Custom ops


def _kernel_layout(cu_q: list[int], cu_k: list[int], block_size: int, device) -> _attn.KernelLayout:
    """The launchers' block geometry (no host sync: ``attention.kernel_layout``)."""
    longest = max((b - a for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)), default=1)
    return _attn.kernel_layout(list(cu_q), list(cu_k), effective_block_size(block_size, longest), device)


def _selection_numel(q, k, sorted_indices, cu_q, cu_k, block_size, decomposition) -> int:
    """Length of the flat selection the forward returns (for the fake: static in the inputs)."""
    longest = max((b - a for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)), default=1)
    bs = effective_block_size(block_size, longest)
    nbs = [-(-(b - a) // bs) for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)]
    sizes = _attn.selection_sizes(q.shape[0], q.shape[1], k.shape[1], sorted_indices.shape[-1],
                                  (sum(nbs), max(nbs, default=0)), list(cu_q), decomposition != "union")
    return sum(sizes)


@torch.library.custom_op("moba::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sorted_indices: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    block_size: int,
    causal: bool,
    scale: float,
    decomposition: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    lay = _kernel_layout(cu_q, cu_k, block_size, q.device)
    return _attn.attention_forward(q, k, v, sorted_indices.contiguous(), lay, causal, scale, decomposition)


@triton_attention_fwd.register_fake
def _(q, k, v, sorted_indices, cu_q, cu_k, block_size, causal, scale, decomposition="auto"):
    n = _selection_numel(q, k, sorted_indices, cu_q, cu_k, block_size, decomposition)
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32), q.new_empty((n,), dtype=torch.int32)


@torch.library.custom_op("moba::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sorted_indices: torch.Tensor,
    selection: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    block_size: int,
    causal: bool,
    scale: float,
    decomposition: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    lay = _kernel_layout(cu_q, cu_k, block_size, q.device)
    return _attn.attention_backward(dout, q, k, v, out, lse, sorted_indices.contiguous(), selection, lay, causal, scale,
                                    decomposition)


@triton_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, sorted_indices, selection, cu_q, cu_k, block_size, causal, scale, decomposition="auto"):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


register_attention_autograd(triton_attention_fwd, triton_attention_bwd)


@torch.library.custom_op("moba::triton_gate", mutates_args=())
def triton_gate(
    q: torch.Tensor, k: torch.Tensor, cu_q: list[int], cu_k: list[int], block_size: int, top_k: int, causal: bool
) -> torch.Tensor:
    layout = build_layout(cu_q, cu_k, block_size, q.device)
    return _gate.gate_select(
        _last_dim_contiguous(q), _last_dim_contiguous(k), cu_q, _int32(cu_q, q.device), _int32(cu_k, q.device),
        layout.q_pos, layout.q_seq, layout.seq_n_blocks, layout.block_offset, layout.block_start, layout.block_len,
        layout.block_size, top_k, causal, nb_max=layout.max_blocks_per_seq,
    )


@triton_gate.register_fake
def _(q, k, cu_q, cu_k, block_size, top_k, causal):
    return q.new_empty((q.shape[0], q.shape[1], gate_width(max_blocks(cu_k, block_size), top_k)), dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# Public functions and the backend


def triton_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    block_size: int,
    block_indices: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    decomposition: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention with the Triton kernels (autograd through q, k, v).

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D), Hq % Hkv == 0; cu_q / cu_k: host lists of the
    (N + 1) sequence boundaries of queries and keys (queries aligned to the end of their keys);
    block_indices: (Tq, Hq, n_slots) local block indices, -1 padded, in any slot order.
    decomposition: "auto", "union" (per query tile) or "gather" (per super-tile and key block) for
    the forward and dq kernels (see ``moba.triton_kernels.attention``); results agree up to
    rounding. Returns out (Tq, Hq, D) in q.dtype and lse (Tq, Hq) float32 (natural log of the
    softmax denominator of the scaled scores).

    Example:
        >>> out, lse = triton_attention_packed(q, k, v, [0, 4096], [0, 4096], 512, idx, True, 64 ** -0.5)
    """
    _check_supported(q, k, v)
    sorted_indices = _attn.sort_block_indices(block_indices)
    out, lse, _ = triton_attention_fwd(
        q, k, v, sorted_indices, list(cu_q), list(cu_k), int(block_size), bool(causal), float(softmax_scale), decomposition
    )
    return out, lse


def _attention_lse(q, k, v, layout: BlockLayout, block_indices, causal, scale):
    return triton_attention_packed(q, k, v, layout.cu_q, layout.cu_k, layout.block_size, block_indices, causal, scale)


def _attention(q, k, v, layout: BlockLayout, block_indices, causal, scale):
    return _attention_lse(q, k, v, layout, block_indices, causal, scale)[0]


def _select(q, k, layout: BlockLayout, top_k, causal):
    _check_supported(q, k, k)
    nb_max = layout.max_blocks_per_seq
    # top_k >= the block count selects every block: clamp, so an int64 custom-op argument
    # never overflows (any integer top_k is legal).
    top_k = gate_width(nb_max, top_k)
    if top_k - 1 < nb_max - 1 and _gate.gate_sort_width(top_k - 1) is None:
        # The kernel sorts the selection in registers; wide (non-dense) selections use the torch gate.
        return select_packed(q, k, layout, top_k, causal)
    return triton_gate(q, k, list(layout.cu_q), list(layout.cu_k), layout.block_size, int(top_k), bool(causal))


#: The ``"triton"`` backend; ``moba.ops.registry`` registers it on first use (no import side effect).
BACKEND = Backend(
    name="triton",
    attention=_attention,
    select=_select,
    unavailable_reason=unavailable_reason,
    unsupported_input=unsupported_input,
    attention_lse=_attention_lse,  # every kernel is deterministic (no atomics)
)

__all__ = ["BACKEND", "triton_attention_bwd", "triton_attention_fwd", "triton_attention_packed", "triton_gate", "unavailable_reason"]
