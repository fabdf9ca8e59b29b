"""MoBA Triton kernels and their launchers, installed as ``moba.triton_kernels``.

* ``gate``: block mean-pooling of keys and the fused gate (scores + top-k in registers).
* ``attention``: forward (out + float32 log-sum-exp), backward dq, backward dk/dv.
* ``decode``: split/merge decoding kernels for one query token per sequence with a KV cache.

Kernels and launchers only (no autograd, no nn): ``moba.ops.triton_impl`` wraps them as
``torch.library`` custom ops and registers the ``"triton"`` backend. Import them only as
``moba.triton_kernels.<module>``: a top-level ``triton_kernels`` would shadow Triton's own.
"""
