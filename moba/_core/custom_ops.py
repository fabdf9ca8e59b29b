"""Autograd for the attention custom ops, shared by the PyTorch path and the Triton backend.

Both register a pair of ``torch.library.custom_op``s with one calling convention:

    fwd(q, k, v, block_indices, *args) -> (out, lse, *saved)
    bwd(dout, q, k, v, out, lse, block_indices, *saved, *args) -> (dq, dk, dv)

where ``args`` are non-tensor settings (sequence boundaries, block size, causal, scale, ...)
and ``saved`` are optional extra forward outputs the backward reuses (the Triton backend's
selection layout, built once in the forward); they carry no gradient.
"""

from __future__ import annotations


def register_attention_autograd(fwd_op, bwd_op) -> None:
    """Make ``fwd_op`` differentiable through ``bwd_op``: q, k, v get gradients; the block
    indices and the settings get none, and the log-sum-exp and saved outputs carry none."""

    def setup_context(ctx, inputs, output):
        q, k, v, block_indices, *args = inputs
        out, lse, *saved = output
        ctx.save_for_backward(q, k, v, block_indices, out, lse, *saved)
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(lse, *saved)

    def backward(ctx, dout, _dlse, *_dsaved):
        q, k, v, block_indices, out, lse, *saved = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout.contiguous(), q, k, v, out, lse, block_indices, *saved, *ctx.args)
        return (dq, dk, dv, None) + (None,) * len(ctx.args)

    fwd_op.register_autograd(backward, setup_context=setup_context)
