"""MoBA Triton kernels and their launchers, installed as ``moba.triton_kernels``.

* ``gate``: block mean-pooling of keys and the fused gate (scores + top-k in registers).
* ``attention``: forward (out + float32 log-sum-exp), backward dq, backward dk/dv.
* ``decode``: split/merge decoding kernels for one query token per sequence with a KV cache.
* ``versions``: the Triton releases the kernels are checked on (an unchecked one warns once).

Kernels and launchers only (no autograd, no nn): ``moba.ops.triton_impl`` wraps them as
``torch.library`` custom ops and registers the ``"triton"`` backend. Import them only as
``moba.triton_kernels.<module>``: a top-level ``triton_kernels`` would shadow Triton's own.
"""

try:
    import triton as _triton
except ImportError:  # no Triton (not Linux): the modules above cannot be imported either
    pass
else:
    from .versions import check_triton_version

    check_triton_version(_triton.__version__)  # warns once on a release the kernels are not checked on
