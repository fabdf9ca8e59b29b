"""Benchmarks and reports. Each runs as a module from the repository root or as a file from
anywhere (``python bench/attn_speed.py --help``); options as in ``docs/command_line.md``:

    python -m bench.attn_speed --help       # attention speed and memory, providers side by side
    python -m bench.torch_path_cpu          # the PyTorch path on CPU (``make bench``)
    python -m bench.roofline --help         # roofline plot of attn_speed / generate_speed results
    python -m bench.perf_model --help       # modelled H100/H200 kernel times (no GPU needed)
    python -m bench.generate_speed --help   # plain / speculative / tree decoding speed
    python -m bench.kernel_report --help    # static sm_90 compile report (no GPU needed)
    python -m bench.device_check --help     # one prepared check on a lent GPU

Shared pieces: ``_common`` (run metadata, SDPA runner, OOM test), ``providers`` (attn_speed's
provider registry), ``_attn_model`` (FLOP/byte model; pair counts from ``moba._core.accounting``),
``_moba_impls`` (other MoBA implementations to compare against).
"""
