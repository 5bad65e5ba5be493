# `make demo` and `make test` do the whole set-up: each creates .venv on first use.
# On a CPU-only machine torch==2.13.0 resolves to the CPU wheel; on a GPU machine to the CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test,eval,bnb,distributed]"
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps open_clip_torch
	touch $@

demo: venv
	$(PY) -m engine demo --out build/demo

# Two workers: CI's two cores (tests/conftest.py gives each one torch thread).
test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2

bench: venv
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build
