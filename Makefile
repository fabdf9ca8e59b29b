# The two commands the README promises: `make test` and `make demo`.
# Both create .venv when it is missing and are safe to run again.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so no later step pulls a multi-GB CUDA build on a
# CPU machine. On a GPU machine: `make test TORCH_SPEC=torch` (or any version you use).
TORCH_SPEC ?= torch==2.13.0
# Every package the tests use, at exact versions (see the file's header; `make lock` renews it).
CONSTRAINTS ?= constraints.txt
PIP_VERSION := 26.3
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py $(CONSTRAINTS) | cksum | cut -d' ' -f1)
# The integration tests that `test-latest` / `test-oldest` run against other transformers releases.
INTEGRATION_TESTS := tests/integrations/test_transformers.py tests/generate/test_generate.py
# The declared lower bounds (pyproject.toml) that `test-oldest` installs.
OLDEST := "transformers==4.56.0" "einops==0.7.0"

# Other Triton releases the kernels' static checks run on (`make kernel-matrix`; the list in
# pyproject.toml [tool.moba] checked-triton): 3.6 is the torch 2.11 line's.
TRITON_MATRIX ?= 3.6.0
# The static kernel checks: the kernel report's assertions (compiled for sm_90/sm_80, no GPU).
KERNEL_TESTS := tests/bench/test_kernel_report.py tests/kernels/test_triton_versions.py

.PHONY: venv test fuzz demo operator-demo bench speed roofline lint clean lock test-latest test-oldest kernel-matrix

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "pip==$(PIP_VERSION)"

$(STAMP): $(PY) pyproject.toml setup.py $(CONSTRAINTS)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation -c $(CONSTRAINTS) -e ".[test,bench,scaling,hf,triton]"
	rm -f $(VENV)/.installed-* && touch $@

# The environment alone (what `make test` / `make demo` create first).
venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal

# The differential fuzzers (tests/fuzz) on fresh random examples, round after round, until
# FUZZ_SECONDS have passed (a round never stops half-way; the first failure stops and prints its
# one-line reproducer). FUZZ_SCALE multiplies the examples of a round (1 = make test's counts).
FUZZ_SECONDS ?= 600
FUZZ_SCALE ?= 1
fuzz: $(STAMP)
	@end=$$(( $$(date +%s) + $(FUZZ_SECONDS) )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do \
	  round=$$((round + 1)); seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
	  echo "fuzz round $$round: seed $$seed (rerun: MOBA_FUZZ_RANDOM=1 MOBA_FUZZ_SEED=$$seed MOBA_FUZZ_SCALE=$(FUZZ_SCALE) $(PY) -m pytest tests/fuzz --hypothesis-seed=$$seed)"; \
	  MOBA_FUZZ_RANDOM=1 MOBA_FUZZ_SEED=$$seed MOBA_FUZZ_SCALE=$(FUZZ_SCALE) \
	    $(PY) -m pytest -q -x -n 2 -p no:cacheprovider tests/fuzz --hypothesis-seed=$$seed || exit 1; \
	done

demo: $(STAMP)
	$(PY) -m scaling_runs.demo

operator-demo: $(STAMP)
	$(PY) -m moba.demo

bench: $(STAMP)
	$(PY) -m bench.torch_path_cpu

speed: $(STAMP)
	$(PY) -m bench.attn_speed $(ARGS)

roofline: $(STAMP)
	$(PY) -m bench.roofline $(RESULTS) --out $(or $(OUT),roofline.png)

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check .

# The newest releases of everything (no constraints; torch stays pinned): integration tests.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip "$(TORCH_SPEC)"
	.venv-latest/bin/python -m pip install --quiet --upgrade -e ".[test,bench,scaling,hf,triton]"
	.venv-latest/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	.venv-latest/bin/python -m pytest -q -n 2 $(INTEGRATION_TESTS)

# The declared lower bounds (transformers 4.56, einops 0.7; torch stays pinned): integration tests.
test-oldest:
	rm -rf .venv-oldest && $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --upgrade pip "$(TORCH_SPEC)"
	.venv-oldest/bin/python -m pip install --quiet -e ".[test,bench,scaling,hf,triton]" $(OLDEST)
	.venv-oldest/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	.venv-oldest/bin/python -m pytest -q -n 2 $(INTEGRATION_TESTS)

# The static kernel checks on the locked Triton, then on every release of TRITON_MATRIX, each in
# its own venv (.venv-triton<version>: torch stays pinned, only triton differs; no GPU needed).
kernel-matrix: $(STAMP)
	$(PY) -m pytest -q -n 0 $(KERNEL_TESTS)
	set -e; for v in $(TRITON_MATRIX); do \
	  venv=.venv-triton$$v; \
	  if ! $$venv/bin/python -c "import triton, sys; sys.exit(triton.__version__ != '$$v')" 2>/dev/null; then \
	    rm -rf $$venv && $(PYTHON) -m venv $$venv; \
	    $$venv/bin/python -m pip install --quiet "pip==$(PIP_VERSION)" "$(TORCH_SPEC)"; \
	    grep -v '^triton==' $(CONSTRAINTS) > $$venv/constraints.txt; \
	    $$venv/bin/python -m pip install --quiet -c $$venv/constraints.txt setuptools wheel "triton==$$v"; \
	    $$venv/bin/python -m pip install --quiet --no-build-isolation -c $$venv/constraints.txt -e ".[test,triton]"; \
	  fi; \
	  $$venv/bin/python -c "import triton; print('triton', triton.__version__)"; \
	  $$venv/bin/python -m pytest -q -n 0 $(KERNEL_TESTS); \
	done

# Re-resolve the newest releases and freeze them into constraints.txt (then run `make test`).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "pip==$(PIP_VERSION)" "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install --quiet setuptools wheel -e ".[test,bench,scaling,hf,triton]"
	{ sed -n '/^#/p' $(CONSTRAINTS); .venv-lock/bin/python -m pip freeze --all | grep -v -e '^-e' -e '^#' -e '^pip==' \
	  | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-lock .venv-triton* build *.egg-info .pytest_cache
