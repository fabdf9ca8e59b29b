"""Private core shared by every layer: input checks, the block layout, the accounting.

* ``checks``: argument and q/k/v validation (one place for every public entry point).
* ``layout``: ``BlockLayout`` (packed sequences cut into key blocks) and the gate width.
* ``accounting``: attended (query, key) pairs, attention FLOPs and the GPU peak table that
  ``bench/`` and ``scaling_runs/`` import instead of re-deriving.
* ``custom_ops``: the autograd wiring shared by the torch and Triton custom ops.
* ``sizes``: token counts written as text (``8k``, ``1m``) and ``BLOCK/TOP_K`` settings for every
  command line.
* ``cli``: the command-line convention of every tool in ``bench/`` and ``scaling_runs/`` (parser,
  value types, one-line errors).

Nothing here imports another ``moba`` layer.
"""
