# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test quick zoo coverage lint clean

# torch is pinned to the local CPU wheel first, so nothing can pull a CUDA build later;
# spandrel (the zoo of third-party networks) needs torchvision on paper, so --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,export,mobile]'
	$(PIP) --no-deps spandrel==0.4.2 einops safetensors
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

# extra pytest arguments, e.g. make quick PYTEST_ARGS="-x tests/test_core.py"
PYTEST_ARGS ?=

# the CI suite: every test except the whole spandrel zoo; lists the 15 slowest tests
test: $(STAMP)
	$(PY) -m pytest -m "not zoo" --durations=15 $(PYTEST_ARGS)

# while editing: also leaves out the tests marked slow (fuzz, subprocesses, wheel, ExecuTorch)
quick: $(STAMP)
	$(PY) -m pytest -m "not zoo and not slow" $(PYTEST_ARGS)

# every spandrel architecture, lightened and checked (about 15 minutes on 2 cores)
zoo: $(STAMP)
	$(PY) -m pytest -m zoo

# regenerate docs/coverage.md from a run over the whole zoo
coverage: $(STAMP)
	$(PY) -m benchmarks.zoo_coverage

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
