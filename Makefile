# Two commands on a fresh machine: `make demo` and `make test`.
# constraints.txt pins torch to the local CPU build so pip never pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
# Test processes: one per core this process may use (nproc), at most 8 (each holds torch and Dask).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 8 ] && n=8; echo $$n)

.PHONY: demo test bench docs install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lsfov demo --out lsfov-demo.zarr --overwrite

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(PY) benchmarks/run.py

docs: install  # the API reference (the docstrings), to docs/_build/html/index.html
	$(PY) -m sphinx -W -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) lsfov-demo.zarr lsfov-demo.png docs/_build
