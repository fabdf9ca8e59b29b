"""Autograd for the attention custom ops, shared by the PyTorch path and the Triton backend.

Both register a pair of ``torch.library.custom_op``s with one calling convention:

    fwd(q, k, v, block_indices, *args) -> (out, lse)
    bwd(dout, q, k, v, out, lse, block_indices, *args) -> (dq, dk, dv)

where ``args`` are non-tensor settings (sequence boundaries, block size, causal, scale, ...).
"""

from __future__ import annotations


def register_attention_autograd(fwd_op, bwd_op) -> None:
    """Make ``fwd_op`` differentiable through ``bwd_op``: q, k, v get gradients; the block
    indices and the settings get none, and the log-sum-exp output carries none."""

    def setup_context(ctx, inputs, output):
        q, k, v, block_indices, *args = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, block_indices, out, lse)
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        q, k, v, block_indices, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout.contiguous(), q, k, v, out, lse, block_indices, *ctx.args)
        return (dq, dk, dv, None) + (None,) * len(ctx.args)

    fwd_op.register_autograd(backward, setup_context=setup_context)
