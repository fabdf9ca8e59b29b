# The two commands the README promises: `make test` and `make demo`.
# Both create .venv when it is missing and are safe to run again.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so no later step pulls a multi-GB CUDA build on a
# CPU machine. On a GPU machine: `make test TORCH_SPEC=torch` (or any version you use).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)

.PHONY: test demo operator-demo bench speed roofline lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench,scaling,hf]"
	rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --timeout=900

demo: $(STAMP)
	$(PY) -m scaling_runs.demo

operator-demo: $(STAMP)
	$(PY) -m moba.demo

bench: $(STAMP)
	$(PY) bench/torch_path_cpu.py

speed: $(STAMP)
	$(PY) bench/attn_speed.py $(ARGS)

roofline: $(STAMP)
	$(PY) bench/roofline.py $(RESULTS) --out $(or $(OUT),roofline.png)

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
